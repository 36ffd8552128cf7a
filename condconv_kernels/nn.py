"""CondConv layers.

- :class:`CondConv2d`: a convolution with ``num_experts`` kernels mixed per example; parameters
  are state-dict compatible with ``timm.layers.CondConv2d``.
- :class:`CondConvRouting`: global average pool -> Linear(in, E) -> sigmoid, the routing
  function of EfficientNet-CondConv, shared by the convolutions of one block.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _args, reference
from .ops import autocast_inputs, condconv2d, normalise_arguments

__all__ = ["CondConv2d", "CondConvRouting", "layer_padding"]


def layer_padding(padding, kernel_size: Tuple[int, int], stride: Tuple[int, int],
                  dilation: Tuple[int, int]):
    """A layer's ``padding`` argument as the op takes it, with timm's conventions:

    - ``""`` (the default): symmetric ``((stride - 1) + dilation * (k - 1)) // 2`` per side;
    - ``"same"``: TensorFlow SAME; a fixed symmetric padding when that is exact (stride 1 and an
      even dilated extent), otherwise computed from each input's size (may be asymmetric; the
      kernels read the padding in place, x is never copied into a padded buffer);
    - ``"valid"``: none; an int or a tuple: as given."""
    if isinstance(padding, str):
        mode = padding.lower()
        symmetric = tuple(((s - 1) + d * (k - 1)) // 2
                          for k, s, d in zip(kernel_size, stride, dilation))
        if mode == "":
            return symmetric
        if mode == "same":
            static = all(s == 1 and (d * (k - 1)) % 2 == 0
                         for k, s, d in zip(kernel_size, stride, dilation))
            return symmetric if static else "same"
        if mode == "valid":
            return 0
        raise ValueError(f"CondConv2d: argument 'padding' must be '', 'same', 'valid', an int "
                         f"or a tuple, got {padding!r}")
    return padding


class CondConv2d(nn.Module):
    """Conditionally parameterised 2-D convolution (CondConv).

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as ``nn.Conv2d``
            (``groups=in_channels`` makes it depthwise).
        padding: ``""`` (default, timm's symmetric), ``"same"`` (TF), ``"valid"``, int or tuple
            (see :func:`layer_padding`).
        bias: whether each expert has a bias.
        num_experts: E, the number of expert kernels.
        backend: passed to :func:`condconv_kernels.condconv2d` (``"auto"`` by default).

    Attribute ``decompose`` (default False): when True the layer computes with standard
    PyTorch ops only (unfold + batched matmul, :func:`condconv_kernels.reference.condconv2d_unfold`)
    instead of the ``condconv`` op; :func:`condconv_kernels.export.decomposed` sets it for ONNX
    export, where custom ops have no translation.

    Parameters (timm layout): ``weight`` (E, Cout * Cin/groups * kh * kw) in OIHW order,
    ``bias`` (E, Cout).

    Shapes: ``forward(x, routing_weights)`` with x (B, Cin, H, W) and routing_weights (B, E)
    returns (B, Cout, Ho, Wo).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding: Union[str, int, tuple] = "", dilation=1, groups: int = 1,
                 bias: bool = False, num_experts: int = 4, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CondConv2d: argument '{name}' must be a positive int, "
                                 f"got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"CondConv2d: argument 'groups' = {groups} must divide "
                             f"in_channels ({in_channels}) and out_channels ({out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _args.pair(kernel_size, "kernel_size", 1)
        self.stride = _args.pair(stride, "stride", 1)
        self.dilation = _args.pair(dilation, "dilation", 1)
        self.groups = groups
        self.num_experts = num_experts
        self.backend = backend
        self.decompose = False
        self.padding = layer_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.weight_shape = (out_channels, in_channels // groups) + self.kernel_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, math.prod(self.weight_shape),
                                               **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Conv2d`` of the same shape."""
        fan_in = math.prod(self.weight_shape[1:])
        with torch.no_grad():
            for e in range(self.num_experts):
                expert = torch.empty(self.weight_shape, dtype=self.weight.dtype,
                                     device=self.weight.device)
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
                self.weight[e].copy_(expert.flatten())
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    def expert_weight(self) -> torch.Tensor:
        """The weight as (E, Cout, Cin/groups, kh, kw), a view."""
        return self.weight.view((self.num_experts,) + self.weight_shape)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if self.decompose:
            return self._forward_decomposed(x, routing_weights)
        return condconv2d(x, routing_weights, self.expert_weight(), self.bias, self.stride,
                          self.padding, self.dilation, self.groups, backend=self.backend)

    def _forward_decomposed(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        weight = self.expert_weight()
        stride, pad, dilation, autocast = normalise_arguments(
            x, routing_weights, weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups)
        tensors = (x, routing_weights, weight, self.bias)
        if autocast:  # checked as the fused op checks them: after the autocast rule
            tensors = autocast_inputs(*tensors)
        _args.check_tensors(*tensors, stride, pad, dilation, self.groups)
        return reference.condconv2d_unfold(x, routing_weights, weight, self.bias, self.stride,
                                           pad, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, "
                f"num_experts={self.num_experts}, backend={self.backend!r}")


class CondConvRouting(nn.Linear):
    """Routing function: global average pool -> Linear(in_features, num_experts) -> sigmoid.

    A subclass of ``nn.Linear`` so its parameters are ``weight`` (E, in_features) and ``bias``
    (E,), as timm's ``routing_fn``. Shapes: (B, C, H, W) -> (B, E)."""

    def __init__(self, in_features: int, num_experts: int, device=None, dtype=None):
        super().__init__(in_features, num_experts, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"CondConvRouting: argument 'x' must be 4-D (B, C, H, W), got "
                             f"shape {tuple(x.shape)}")
        return torch.sigmoid(F.linear(x.mean((2, 3)), self.weight, self.bias))
