"""Swapping timm's CondConv layers for the fused ones.

``convert(model)`` replaces every ``timm.layers.CondConv2d`` in a timm model (EfficientNet-CondConv
and any other network that uses it) by :class:`condconv_kernels.nn.CondConv2d`, in place. The new
layers *share* the old layers' ``weight`` and ``bias`` Parameters (same objects, so optimizers,
state dicts and checkpoints keep working) and take the same ``forward(x, routing_weights)``
arguments, so the surrounding timm blocks are unchanged.

timm's layer is recognised by its class (``timm.layers.CondConv2d``, or one of its subclasses)
when timm is importable, otherwise by its interface: ``weight`` (E, Cout*Cin/groups*kh*kw),
``bias`` (E, Cout) or None, ``weight_shape``, ``num_experts``, ``dynamic_padding``,
``padding``, ``stride``, ``dilation``, ``groups``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .nn import CondConv2d

__all__ = ["convert", "is_timm_condconv"]

_ATTRIBUTES = ("weight", "bias", "weight_shape", "num_experts", "dynamic_padding", "padding",
               "stride", "dilation", "groups", "in_channels", "out_channels", "kernel_size")


def _timm_class() -> Optional[type]:
    try:
        from timm.layers import CondConv2d as TimmCondConv2d
    except Exception:  # timm missing, or unusable (e.g. torchvision missing)
        return None
    return TimmCondConv2d


def is_timm_condconv(module: nn.Module) -> bool:
    """Whether ``module`` is a timm-style CondConv2d (and not already a fused one)."""
    if isinstance(module, CondConv2d):
        return False
    cls = _timm_class()
    if cls is not None and isinstance(module, cls):
        return True
    return type(module).__name__ == "CondConv2d" and all(hasattr(module, a) for a in _ATTRIBUTES)


def _fused_like(old: nn.Module, backend: str) -> CondConv2d:
    # timm: dynamic_padding means TF "same" computed per input (its stored padding is 0);
    # otherwise `padding` is the static symmetric (ph, pw).
    padding = "same" if old.dynamic_padding else tuple(int(p) for p in old.padding)
    weight = old.weight
    new = CondConv2d(old.in_channels, old.out_channels, tuple(old.kernel_size), tuple(old.stride),
                     padding, tuple(old.dilation), old.groups, bias=old.bias is not None,
                     num_experts=old.num_experts, backend=backend, device="meta",
                     dtype=weight.dtype)
    if tuple(new.weight_shape) != tuple(old.weight_shape) or new.weight.shape != weight.shape:
        raise ValueError(f"convert: a timm CondConv2d has weight {tuple(weight.shape)} for "
                         f"weight_shape {tuple(old.weight_shape)}; expected "
                         f"{tuple(new.weight.shape)}")
    new.weight = weight  # shared, not copied
    new.bias = old.bias
    new.train(old.training)
    return new


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replaces every timm CondConv2d in ``model`` (in place; ``model`` itself too if it is one)
    by a fused :class:`~condconv_kernels.nn.CondConv2d` sharing its parameters; returns the
    model. Outputs are unchanged up to floating-point rounding.

    Args:
        model: a timm model (or any module tree containing timm CondConv2d layers).
        backend: the fused layers' backend (``"auto"``: triton/cuda on GPU, cpu on CPU).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: argument 'model' must be an nn.Module, "
                        f"got {type(model).__name__}")
    if is_timm_condconv(model):
        return _fused_like(model, backend)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_timm_condconv(child):
                setattr(parent, name, _fused_like(child, backend))
    return model
