"""Dynamic convolutions in any CNN: :func:`convert_model` replaces a model's ``nn.Conv2d``
layers by fused CondConv, DynamicConv or ODConv layers.

    model = torchvision_or_timm_or_your_model()
    convert_model(model, "odconv", num_experts=4, exclude=["conv1"])   # in place, returned

With ``init="copy"`` every expert starts as the original kernel (and bias), so a DynamicConv
conversion computes exactly what the model computed (its attention is a softmax: the mix of K
equal kernels is that kernel) until it is trained; CondConv's sigmoid routing and ODConv's
scales change the output from the start, by a factor per example and channel.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from .nn import CondConv2d, CondConvRouting, DynamicConv2d, ODConv2d

__all__ = ["convert_model", "CondConvBlock", "KINDS"]

KINDS = ("condconv", "dynamic", "odconv")


class CondConvBlock(nn.Module):
    """A CondConv layer with its own routing on the layer's input (the paper's ResNet and
    MobileNet variants): ``conv(x, routing(x))``. Shapes as the ``nn.Conv2d`` it replaces."""

    def __init__(self, conv: CondConv2d):
        super().__init__()
        self.routing = CondConvRouting(conv.in_channels, conv.num_experts)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.routing(x))


def _matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _eligible(name: str, conv: nn.Module, include, exclude) -> bool:
    """A plain nn.Conv2d with zero padding of a form the fused layers take, chosen by the name
    filters."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return False  # PyTorch's "same" is symmetric-or-right-heavy: not TensorFlow's
    if include is not None and not _matches(name, include):
        return False
    return exclude is None or not _matches(name, exclude)


def _fused(conv: nn.Conv2d, kind: str, num_experts: int):
    args = dict(stride=conv.stride, padding=0 if conv.padding == "valid" else conv.padding,
                dilation=conv.dilation, groups=conv.groups)
    if kind == "condconv":
        layer = CondConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                           bias=conv.bias is not None, num_experts=num_experts, **args)
        return CondConvBlock(layer), layer
    if kind == "dynamic":
        layer = DynamicConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                              bias=conv.bias is not None, K=num_experts, **args)
        return layer, layer
    if conv.bias is not None:
        raise ValueError("convert_model: kind 'odconv' has no bias (as the official ODConv2d), "
                         f"but a layer of the model has one; exclude it ({conv})")
    layer = ODConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, kernel_num=num_experts,
                     **args)
    return layer, layer


def _copy_into(layer, conv: nn.Conv2d) -> None:
    """Every expert (and expert bias) set to the original kernel (and bias)."""
    with torch.no_grad():
        weight = layer.expert_weight() if isinstance(layer, CondConv2d) else layer.weight
        weight.copy_(conv.weight.unsqueeze(0).expand_as(weight))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(conv.bias.unsqueeze(0).expand_as(layer.bias))


def convert_model(model: nn.Module, kind: str = "condconv", num_experts: int = 4, *,
                  include: Optional[Iterable[str]] = None,
                  exclude: Optional[Iterable[str]] = None, init: str = "copy",
                  backend: str = "auto") -> nn.Module:
    """Replaces each eligible ``nn.Conv2d`` of ``model`` (in place) by a fused layer, and
    returns the model.

    Args:
        model: any ``nn.Module``.
        kind: ``"condconv"`` (a :class:`CondConvBlock`: CondConv2d with its own sigmoid routing
            on the layer's input), ``"dynamic"`` (:class:`~condconv_kernels.nn.DynamicConv2d`)
            or ``"odconv"`` (:class:`~condconv_kernels.nn.ODConv2d`, for layers without bias).
        num_experts: experts (kernels) per layer.
        include, exclude: ``fnmatch`` patterns on the module names (``model.named_modules()``):
            only names matching one of ``include`` (default: all), none of ``exclude``.
        init: ``"copy"`` (every expert starts as the original kernel and bias; the attentions
            are freshly initialised) or ``"random"`` (the fused layers' own initialisation).
        backend: the layers' backend (``"auto"``).

    Eligible: exactly ``nn.Conv2d`` (not subclasses), zero padding given as ints or
    ``"valid"``. The converted layers keep the original's dtype and device. A model that is
    itself an eligible ``nn.Conv2d`` comes back as its replacement.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model: argument 'model' must be an nn.Module, "
                        f"got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"convert_model: argument 'kind' must be one of {KINDS}, got {kind!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"convert_model: argument 'num_experts' must be a positive int, "
                         f"got {num_experts!r}")
    if init not in ("copy", "random"):
        raise ValueError(f"convert_model: argument 'init' must be 'copy' or 'random', "
                         f"got {init!r}")
    for name, patterns in (("include", include), ("exclude", exclude)):
        if isinstance(patterns, str):
            raise TypeError(f"convert_model: argument '{name}' must be a list of patterns, "
                            f"not one string ({patterns!r})")
    include = None if include is None else list(include)
    exclude = None if exclude is None else list(exclude)
    chosen: List[Tuple[str, nn.Conv2d]] = [
        (name, m) for name, m in model.named_modules() if _eligible(name, m, include, exclude)]
    for name, conv in chosen:
        module, layer = _fused(conv, kind, num_experts)
        layer.backend = backend
        if init == "copy":
            _copy_into(layer, conv)
        module.to(device=conv.weight.device, dtype=conv.weight.dtype)
        if not name:  # the model is itself a convolution
            return module
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    return model
