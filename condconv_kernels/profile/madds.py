"""Multiply-adds and parameters, counted as the EfficientNet and CondConv papers count them.

Convention (per example, one forward pass):

- every convolution: Cout * Ho * Wo * (Cin / groups) * kh * kw;
- a CondConv layer: its convolution plus the expert mix, E * |W| (|W| = one expert's kernel);
- every Linear (routing functions, classifier): in_features * out_features;
- squeeze-excitation: one multiply-add per element for its global pool and one for its gating
  multiply (2 * C * H * W), its two 1x1 convolutions counted as convolutions;
- BatchNorm, activations, residual additions and the final global pool: not counted.

``FlopCounterMode`` counts 2 FLOPs per multiply-add for the convolution, CondConv (with its mix)
and Linear parts, and nothing for the rest: :func:`flop_counter_part` is that part.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn import FusedConv2d

__all__ = ["LayerCount", "count_madds", "count_params", "madds_breakdown", "flop_counter_part"]


@dataclasses.dataclass
class LayerCount:
    """One counted module: its kind, the multiply-adds per example, its parameters and the input
    shape it saw (batch 1)."""
    name: str
    kind: str            # "conv", "condconv", "linear" or "se"
    madds: int
    mix_madds: int       # CondConv expert mix (included in madds)
    params: int
    input_shape: Tuple[int, ...]


def _conv_madds(module, out_shape) -> int:
    kh, kw = module.kernel_size
    cin_g = module.in_channels // module.groups
    return module.out_channels * out_shape[-2] * out_shape[-1] * cin_g * kh * kw


def madds_breakdown(model: nn.Module, input_size: Union[int, Sequence[int]]) -> List[LayerCount]:
    """Per-module counts, in execution order, from one batch-1 forward pass on zeros.
    ``input_size``: H (square), (H, W) or (C, H, W)."""
    from ..models.blocks import SqueezeExcite
    size = (input_size,) * 2 if isinstance(input_size, int) else tuple(input_size)
    if len(size) == 2:
        size = (3,) + size
    if len(size) != 3:
        raise ValueError(f"count_madds: argument 'input_size' must be H, (H, W) or (C, H, W), "
                         f"got {input_size!r}")
    counts: List[LayerCount] = []
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            shape = tuple(inputs[0].shape)
            own = sum(p.numel() for p in module.parameters(recurse=False))
            if isinstance(module, FusedConv2d):
                mix = module.mix_madds()
                counts.append(LayerCount(name, "condconv", _conv_madds(module, output.shape) + mix,
                                         mix, own, shape))
            elif isinstance(module, nn.Conv2d):
                counts.append(LayerCount(name, "conv", _conv_madds(module, output.shape), 0, own,
                                         shape))
            elif isinstance(module, nn.Linear):
                counts.append(LayerCount(name, "linear", module.in_features * module.out_features,
                                         0, own, shape))
            elif isinstance(module, SqueezeExcite):
                counts.append(LayerCount(name, "se", 2 * math.prod(shape[1:]), 0, 0, shape))
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, FusedConv2d, nn.Linear, SqueezeExcite)):
            hooks.append(module.register_forward_hook(hook(name)))
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1,) + size, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return counts


def count_madds(model: nn.Module, input_size: Union[int, Sequence[int]]) -> int:
    """Multiply-adds per example (see the module docstring for what is counted)."""
    return sum(c.madds for c in madds_breakdown(model, input_size))


def count_params(model: nn.Module) -> int:
    """Number of parameters (every expert of every CondConv layer included)."""
    return sum(p.numel() for p in model.parameters())


def flop_counter_part(counts: List[LayerCount]) -> int:
    """What ``torch.utils.flop_counter`` counts for these layers per example: 2 FLOPs per
    multiply-add of the convolutions (with the CondConv mix) and Linears."""
    return 2 * sum(c.madds for c in counts if c.kind in ("conv", "condconv", "linear"))


def summarize(counts: List[LayerCount]) -> Dict[str, int]:
    """Totals per kind."""
    out: Dict[str, int] = {}
    for c in counts:
        out[c.kind] = out.get(c.kind, 0) + c.madds
    out["mix"] = sum(c.mix_madds for c in counts)
    return out
