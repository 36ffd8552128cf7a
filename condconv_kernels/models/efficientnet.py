"""EfficientNet and EfficientNet-CondConv, with timm's module names and state-dict layout.

``create_model("tf_efficientnet_cc_b0_8e", pretrained_path="ckpt.safetensors")`` builds a model
and loads a timm checkpoint unchanged. ``tf_`` models use TensorFlow's conventions (BatchNorm
eps 1e-3, "same" padding); the others PyTorch's (eps 1e-5, symmetric padding).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .blocks import (BatchNormAct2d, BlockArgs, Conv2dPadded, build_blocks,
                     decode_block_string, round_channels)

__all__ = ["EfficientNet", "ModelSpec", "create_model", "list_models", "load_checkpoint",
           "save_checkpoint",
           "B0_STAGES", "B0_CONDCONV_STAGES", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNet-B0 (Tan & Le, 2019), one string per stage.
B0_STAGES = ["ds_r1_k3_s1_e1_c16_se0.25", "ir_r2_k3_s2_e6_c24_se0.25",
             "ir_r2_k5_s2_e6_c40_se0.25", "ir_r3_k3_s2_e6_c80_se0.25",
             "ir_r3_k5_s1_e6_c112_se0.25", "ir_r4_k5_s2_e6_c192_se0.25",
             "ir_r1_k3_s1_e6_c320_se0.25"]
# EfficientNet-CondConv-B0 (Yang et al., 2019): CondConv in the last three stages.
B0_CONDCONV_STAGES = B0_STAGES[:4] + [s + "_cc4" for s in B0_STAGES[4:]]

# (width, depth, resolution, dropout, crop fraction) of B0..B7.
_SCALING = {0: (1.0, 1.0, 224, 0.2, 0.875), 1: (1.0, 1.1, 240, 0.2, 0.882),
            2: (1.1, 1.2, 260, 0.3, 0.890), 3: (1.2, 1.4, 300, 0.3, 0.904),
            4: (1.4, 1.8, 380, 0.4, 0.922), 5: (1.6, 2.2, 456, 0.4, 0.934),
            6: (1.8, 2.6, 528, 0.5, 0.942), 7: (2.0, 3.1, 600, 0.5, 0.949)}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named model: architecture, scaling and its evaluation preprocessing."""
    stages: Tuple[str, ...]
    width: float
    depth: float
    input_size: int
    drop_rate: float
    crop_pct: float
    tf: bool
    experts_multiplier: int = 1
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD


def _registry() -> Dict[str, ModelSpec]:
    specs = {}
    for b, (w, d, res, drop, crop) in _SCALING.items():
        for tf in (False, True):
            specs[f"{'tf_' if tf else ''}efficientnet_b{b}"] = ModelSpec(
                tuple(B0_STAGES), w, d, res, drop, crop, tf)
    for name, b, experts in (("cc_b0_4e", 0, 1), ("cc_b0_8e", 0, 2), ("cc_b1_8e", 1, 2)):
        w, d, res, drop, crop = _SCALING[b]
        for tf in (False, True):
            specs[f"{'tf_' if tf else ''}efficientnet_{name}"] = ModelSpec(
                tuple(B0_CONDCONV_STAGES), w, d, res, drop, crop, tf, experts)
    return specs


MODELS = _registry()


def list_models() -> List[str]:
    """The EfficientNet(-CondConv) models, then the converted ResNet-18 / MobileNetV2 ones
    (:mod:`condconv_kernels.models.converted`)."""
    from .converted import converted_models
    return sorted(MODELS) + converted_models()


class EfficientNet(nn.Module):
    """EfficientNet: stem conv 3x3/2 -> stages of blocks -> 1x1 head conv -> pool -> classifier.

    Args:
        stages: one :class:`BlockArgs` or block string per stage (e.g. ``B0_STAGES``).
        width, depth: channel and repeat multipliers (compound scaling).
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_channels, stem_channels, head_channels: before width scaling (stem and head).
        drop_rate: dropout before the classifier. drop_path_rate: stochastic depth of the last
            block (linear in the block index).
        tf_same: TensorFlow "same" padding (else symmetric). bn_eps: BatchNorm epsilon.
        experts_multiplier: multiplies the ``cc`` expert counts of block strings.
        backend: condconv2d backend of the CondConv layers.

    Shapes: (B, in_channels, H, W) -> (B, num_classes); ``forward_features`` gives
    (B, head_channels * width rounded, H/32, W/32).
    """

    def __init__(self, stages: Sequence[Union[BlockArgs, str]], width: float = 1.0,
                 depth: float = 1.0, num_classes: int = 1000, in_channels: int = 3,
                 stem_channels: int = 32, head_channels: int = 1280, drop_rate: float = 0.2,
                 drop_path_rate: float = 0.0, tf_same: bool = False, bn_eps: float = 1e-5,
                 experts_multiplier: int = 1, backend: str = "auto"):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"EfficientNet: argument 'num_classes' must be >= 0, "
                             f"got {num_classes}")
        if not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError("EfficientNet: 'drop_rate' and 'drop_path_rate' must be in [0, 1)")
        args = [decode_block_string(s, experts_multiplier) if isinstance(s, str) else s
                for s in stages]
        self.stage_args = args
        stem = round_channels(stem_channels, width)
        self.conv_stem = Conv2dPadded(in_channels, stem, 3, 2, tf_same=tf_same)
        self.bn1 = BatchNormAct2d(stem, bn_eps)
        self.blocks, channels = build_blocks(args, stem, width, depth, bn_eps, tf_same,
                                             drop_path_rate, backend)
        self.num_features = round_channels(head_channels, width)
        self.conv_head = Conv2dPadded(channels, self.num_features, 1, tf_same=tf_same)
        self.bn2 = BatchNormAct2d(self.num_features, bn_eps)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.classifier = (nn.Linear(self.num_features, num_classes) if num_classes
                           else nn.Identity())
        self.pretrained_cfg: Dict[str, object] = {}
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m is self.classifier:
                bound = 1.0 / m.weight.shape[0] ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"EfficientNet: argument 'x' must be 4-D (B, C, H, W), got shape "
                             f"{tuple(x.shape)}")
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        return self.bn2(self.conv_head(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(features).flatten(1)
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(name: str, pretrained_path: Optional[str] = None, num_classes: int = 1000,
                 drop_rate: Optional[float] = None, drop_path_rate: float = 0.0,
                 backend: str = "auto", condconv: bool = True, pretrained: bool = False,
                 **kwargs) -> EfficientNet:
    """A model by name (``list_models()``; ``<resnet18|mobilenetv2>-<kind><experts>`` for the
    converted networks of :mod:`~condconv_kernels.models.converted`), optionally loading a checkpoint (a timm ``.pth`` or
    ``.safetensors`` state dict loads unchanged). ``model.pretrained_cfg`` holds its input size,
    crop fraction, interpolation and mean/std. ``condconv=False`` builds the same architecture
    with static convolutions in place of the CondConv layers (the baseline of a CondConv model).

    ``pretrained=True`` loads the released ImageNet weights of the models that have them
    (:func:`~condconv_kernels.models.pretrained.pretrained_models`): downloaded once into the
    torch hub cache, hash-checked, loaded strictly (see
    :func:`~condconv_kernels.models.pretrained.download_weights` for working offline)."""
    from .converted import create_converted, is_converted_name
    if is_converted_name(name):
        if pretrained or pretrained_path is not None:
            raise ValueError(f"create_model: argument 'pretrained': {name} has no released "
                             f"weights")
        return create_converted(name, num_classes, condconv, backend)
    if name not in MODELS:
        raise ValueError(f"create_model: unknown model name {name!r}; known models: "
                         f"{', '.join(list_models())}")
    if pretrained:
        from .pretrained import PRETRAINED_URLS, download_weights, pretrained_models
        if pretrained_path is not None:
            raise ValueError("create_model: give either argument 'pretrained' or "
                             "'pretrained_path', not both")
        if name not in PRETRAINED_URLS or not condconv or num_classes != 1000:
            why = ("has no released weights" if name not in PRETRAINED_URLS else
                   "with condconv=False has no released weights" if not condconv else
                   f"has released weights for 1000 classes, not num_classes={num_classes}")
            raise ValueError(f"create_model: argument 'pretrained': {name} {why}; models with "
                             f"released weights: {', '.join(pretrained_models())}")
        pretrained_path = download_weights(PRETRAINED_URLS[name])
    spec = MODELS[name]
    stages = spec.stages if condconv else tuple(re.sub(r"_cc\d+", "", s) for s in spec.stages)
    model = EfficientNet(stages, spec.width, spec.depth, num_classes,
                         drop_rate=spec.drop_rate if drop_rate is None else drop_rate,
                         drop_path_rate=drop_path_rate, tf_same=spec.tf,
                         bn_eps=1e-3 if spec.tf else 1e-5,
                         experts_multiplier=spec.experts_multiplier, backend=backend, **kwargs)
    model.pretrained_cfg = {"architecture": name, "input_size": (3, spec.input_size,
                                                                 spec.input_size),
                            "crop_pct": spec.crop_pct, "interpolation": spec.interpolation,
                            "mean": spec.mean, "std": spec.std, "num_classes": num_classes}
    if pretrained_path is not None:
        load_checkpoint(model, pretrained_path)
    return model


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_checkpoint: argument 'path' must be a path, "
                        f"got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: checkpoint file {str(path)!r} does not exist")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure is the file's fault: say which file
        raise ValueError(f"load_checkpoint: could not read checkpoint {str(path)!r} "
                         f"({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load_checkpoint: {str(path)!r} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Loads a state dict (``.safetensors`` or a torch ``.pth``/``.pt``, possibly wrapped in
    ``{"state_dict": ...}``) into ``model``. Everything is checked before anything is copied:
    on a mismatch the model is left untouched and the error lists missing and unexpected keys
    and wrong shapes. Floating tensors are cast to the model's dtypes."""
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if wrong or (strict and (missing or unexpected)):
        def head(items):
            return ", ".join(items[:10]) + (f" ... (+{len(items) - 10} more)" if len(items) > 10
                                            else "")
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture",
                                                                 type(model).__name__)
        parts = [f"load_checkpoint: {str(path)!r} does not fit the model {arch}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {head(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {head(wrong)}")
        raise ValueError("\n  ".join(parts))
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() else v
            for k, v in state.items() if k in own}
    model.load_state_dict(cast, strict=strict)
    return model


def save_checkpoint(model: nn.Module, path: str) -> str:
    """Writes ``model.state_dict()`` to ``path`` atomically: into a temporary file in the same
    folder, then renamed over ``path``, so an interrupted save never leaves a truncated file.
    ``.safetensors`` paths are written with safetensors, others with ``torch.save``."""
    import tempfile
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(state, tmp)
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
