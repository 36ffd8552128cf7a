"""condconv_kernels: CondConv (conditionally parameterised convolutions) as fused kernels.

    condconv2d(x, routing, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
               *, in_scale=None, out_scale=None, tap_scale=None, backend="auto") -> Tensor
    available_backends(device="cpu") -> list[str]
    convert_model(model, kind="condconv" | "dynamic" | "odconv", num_experts=4, ...) -> model
    condconv_kernels.nn: CondConv2d, CondConvRouting, DynamicConv2d, ODConv2d
    condconv_kernels.reference: the plain-PyTorch ground truth and unfused baseline
"""
import warnings as _warnings

from . import backends as _backends
from .backends import available_backends
from .ops import condconv2d
from . import nn, reference
from .convert import convert_model

__all__ = ["condconv2d", "available_backends", "convert_model", "nn", "reference"]
__version__ = "0.1.0"

if not _backends.native_status()[0]:
    _warnings.warn(f"condconv_kernels: {_backends.native_status()[1]}; the 'cpu' and 'cuda' "
                   "backends are unavailable, the reference backend is used instead",
                   RuntimeWarning, stacklevel=2)
