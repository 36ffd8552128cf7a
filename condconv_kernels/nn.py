"""CondConv layers and the dynamic-convolution family on the fused op.

- :class:`CondConv2d`: a convolution with ``num_experts`` kernels mixed per example; parameters
  are state-dict compatible with ``timm.layers.CondConv2d``.
- :class:`CondConvRouting`: global average pool -> Linear(in, E) -> sigmoid, the routing
  function of EfficientNet-CondConv, shared by the convolutions of one block.
- :class:`DynamicConv2d`: Dynamic Convolution (Chen et al., CVPR 2020): its own attention
  (softmax over K kernels with a temperature) mixes the kernels and the biases; state dicts of
  the reference implementation (``Dynamic_conv2d``) load unchanged.
- :class:`ODConv2d`: Omni-Dimensional Dynamic Convolution (Li et al., ICLR 2022): kernel,
  input-channel, output-channel and spatial attentions, the last three as the op's per-example
  scales; state dicts of the official ``ODConv2d`` load unchanged.

Every layer runs on every backend and, under :func:`condconv_kernels.export.decomposed`, with
standard PyTorch operations only (ONNX export with a dynamic batch).
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _args, reference
from .ops import autocast_inputs, condconv2d, normalise_arguments

__all__ = ["CondConv2d", "CondConvRouting", "DynamicConv2d", "ODConv2d", "layer_padding"]


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
        raise ValueError(f"layer_padding: argument 'padding' must be '', 'same', 'valid', an int "
                         f"or a tuple, got {padding!r}")
    return padding


class FusedConv2d(nn.Module):
    """What the layers on the fused op share: the convolution's arguments, the backend, and the
    ``decompose`` switch (:func:`condconv_kernels.export.decomposed`): when True the layer
    computes with standard PyTorch ops only (unfold + batched matmul,
    :func:`condconv_kernels.reference.condconv2d_unfold`) instead of the ``condconv`` op, for
    ONNX export, where custom ops have no translation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding,
                 dilation, groups: int, backend: str, counts=()):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels),
                           ("groups", groups)) + tuple(counts):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: argument '{arg}' must be a positive int, "
                                 f"got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: argument 'groups' = {groups} must divide "
                             f"in_channels ({in_channels}) and out_channels ({out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _args.pair(kernel_size, "kernel_size", 1)
        self.stride = _args.pair(stride, "stride", 1)
        self.dilation = _args.pair(dilation, "dilation", 1)
        self.groups = groups
        self.backend = backend
        self.decompose = False
        self.padding = layer_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.weight_shape = (out_channels, in_channels // groups) + self.kernel_size

    def convolve(self, x, routing, weight, bias=None, in_scale=None, out_scale=None,
                 tap_scale=None) -> torch.Tensor:
        """:func:`condconv_kernels.condconv2d` with this layer's arguments; weight (E, Cout,
        Cin/groups, kh, kw)."""
        if self.decompose:
            scales = (in_scale, out_scale, tap_scale)
            stride, pad, dilation, autocast = normalise_arguments(
                x, routing, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                scales)
            tensors = (x, routing, weight, bias) + scales
            # Checked as the fused op checks them, after the autocast rule; computed from the
            # tensors as given (under autocast, PyTorch's matmuls cast them themselves).
            if autocast:
                tensors = autocast_inputs(*tensors)
            _args.check_tensors(*tensors[:4], stride, pad, dilation, self.groups, *tensors[4:])
            return reference.condconv2d_unfold(x, routing, weight, bias, stride, pad, dilation,
                                               self.groups, in_scale=in_scale,
                                               out_scale=out_scale, tap_scale=tap_scale)
        return condconv2d(x, routing, weight, bias, self.stride, self.padding, self.dilation,
                          self.groups, in_scale=in_scale, out_scale=out_scale,
                          tap_scale=tap_scale, backend=self.backend)

    #: Which per-example scales the layer gives the op: (in_scale, out_scale, tap_scale).
    scales = (False, False, False)

    def mix_madds(self) -> int:
        """Multiply-adds per example of making the layer's kernel: the expert mix and one
        multiply per kernel element for each scale (the op's FLOP formula)."""
        return (self.num_experts + sum(self.scales)) * math.prod(self.weight_shape)

    def _conv_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"groups={self.groups}")


class CondConv2d(FusedConv2d):
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
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, backend, (("num_experts", num_experts),))
        self.num_experts = num_experts
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
        return self.convolve(x, routing_weights, self.expert_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{self._conv_repr()}, bias={self.bias is not None}, "
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


def _kaiming_normal_fan_out_(module: nn.Module) -> None:
    """1x1 convolutions as the reference attentions initialise them: Kaiming normal (fan_out,
    ReLU), zero biases; BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _pooled(x: torch.Tensor, layer: str) -> torch.Tensor:
    """x averaged over its pixels: (B, C, H, W) -> (B, C)."""
    if x.dim() != 4:
        raise ValueError(f"{layer}: argument 'x' must be 4-D (B, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    return x.mean((2, 3))


def _fc(conv: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` (kept as the reference implementations' state dicts name it) applied to
    pooled features (B, C) as the matrix product it is: a convolution call costs several times
    more on tensors of one pixel. (Forward hooks on ``conv`` do not run.)"""
    return F.linear(a, conv.weight.flatten(1), conv.bias)


class DynamicConvAttention(nn.Module):
    """Dynamic Convolution's attention over K kernels: global average pool -> fc1 (1x1, no bias)
    -> ReLU -> fc2 (1x1) -> softmax(. / temperature). (B, C, H, W) -> (B, K).

    ``fc1`` has ``int(in_planes * ratio) + 1`` outputs (K for a 3-channel input), as the
    reference implementation."""

    def __init__(self, in_planes: int, ratio: float, K: int, temperature: float):
        super().__init__()
        hidden = K if in_planes == 3 else int(in_planes * ratio) + 1
        self.fc1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, K, 1, bias=True)
        self.temperature = temperature
        _kaiming_normal_fan_out_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _fc(self.fc2, F.relu(_fc(self.fc1, _pooled(x, "DynamicConv2d"))))
        return torch.softmax(a / self.temperature, dim=1)


class DynamicConv2d(FusedConv2d):
    """Dynamic Convolution (Chen et al., CVPR 2020) on the fused op.

    ``pi = softmax(fc2(relu(fc1(avgpool(x)))) / T)`` over the K kernels;
    ``W_b = sum_k pi[b, k] W_k``, ``bias_b = sum_k pi[b, k] bias_k``;
    ``out[b] = conv2d(x[b], W_b, bias_b)``. The mixed kernels are never stored (the fused op),
    and groups > 1 is supported.

    Args:
        in_planes, out_planes, kernel_size, stride, dilation, groups: as ``nn.Conv2d``.
        padding: int, tuple, ``"same"`` (TensorFlow's) or ``"valid"`` (default 0).
        ratio: the attention's hidden width, ``int(in_planes * ratio) + 1``.
        bias: whether each kernel has a bias.
        K: the number of kernels.
        temperature: the softmax temperature, annealed by :meth:`update_temperature` (the
            paper starts at 30-34 and reaches 1 in the first epochs).
        backend: passed to :func:`condconv_kernels.condconv2d`.

    Parameters, as the reference implementation's ``Dynamic_conv2d``: ``weight`` (K, out_planes,
    in_planes/groups, k, k), ``bias`` (K, out_planes), ``attention.fc1.weight``,
    ``attention.fc2.{weight, bias}``.

    Shapes: (B, in_planes, H, W) -> (B, out_planes, Ho, Wo).
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size, ratio: float = 0.25,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True, K: int = 4,
                 temperature: float = 34, backend: str = "auto"):
        super().__init__(in_planes, out_planes, kernel_size, stride, padding, dilation, groups,
                         backend, (("K", K),))
        if not temperature >= 1:
            raise ValueError(f"DynamicConv2d: argument 'temperature' must be >= 1, "
                             f"got {temperature!r}")
        self.K = K
        self.attention = DynamicConvAttention(in_planes, ratio, K, temperature)
        self.weight = nn.Parameter(torch.empty((K,) + self.weight_shape))
        self.bias = nn.Parameter(torch.zeros(K, out_planes)) if bias else None
        for k in range(K):
            nn.init.kaiming_uniform_(self.weight.data[k])

    @property
    def num_experts(self) -> int:
        return self.K

    @property
    def temperature(self) -> float:
        return self.attention.temperature

    def update_temperature(self) -> float:
        """One annealing step, as the reference: the temperature drops by 3, down to 1.
        Returns the new temperature."""
        self.attention.temperature = max(1, self.attention.temperature - 3)
        return self.attention.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.attention(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"{self._conv_repr()}, bias={self.bias is not None}, K={self.K}, "
                f"temperature={self.temperature}, backend={self.backend!r}")


class ODConvAttention(nn.Module):
    """ODConv's four attentions from one squeeze: ``a = relu(bn(fc(avgpool(x))))``, then
    ``channel = sigmoid(channel_fc(a) / T)`` (B, Cin), ``filter = sigmoid(filter_fc(a) / T)``
    (B, Cout; none for a depthwise layer), ``spatial = sigmoid(spatial_fc(a) / T)`` (B, k, k;
    none for 1x1) and ``kernel = softmax(kernel_fc(a) / T)`` (B, E; ones for E = 1).
    ``fc`` has ``max(int(in_planes * reduction), 16)`` outputs, as the official implementation.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size: Tuple[int, int],
                 groups: int, reduction: float, kernel_num: int, min_channel: int = 16):
        super().__init__()
        hidden = max(int(in_planes * reduction), min_channel)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = 1.0
        self.fc = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.channel_fc = nn.Conv2d(hidden, in_planes, 1, bias=True)
        depthwise = in_planes == groups == out_planes
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_planes, 1, bias=True)
        taps = kernel_size[0] * kernel_size[1]
        self.spatial_fc = None if taps == 1 else nn.Conv2d(hidden, taps, 1, bias=True)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(hidden, kernel_num, 1, bias=True)
        _kaiming_normal_fan_out_(self)

    def forward(self, x: torch.Tensor):
        """(kernel (B, E), channel (B, Cin), filter (B, Cout) or None, spatial (B, kh, kw) or
        None)."""
        a = F.relu(self.bn(_fc(self.fc, _pooled(x, "ODConv2d"))[:, :, None, None]).flatten(1))
        t = self.temperature

        def head(fc):
            return None if fc is None else _fc(fc, a) / t
        kernel = head(self.kernel_fc)
        kernel = (torch.softmax(kernel, dim=1) if kernel is not None
                  else a.new_ones(x.shape[0], 1))
        filt, spatial = head(self.filter_fc), head(self.spatial_fc)
        return (kernel, torch.sigmoid(head(self.channel_fc)),
                None if filt is None else torch.sigmoid(filt),
                None if spatial is None else torch.sigmoid(spatial).view(-1, *self.kernel_size))


class ODConv2d(FusedConv2d):
    """Omni-Dimensional Dynamic Convolution (Li et al., ICLR 2022) on the fused op.

    With the attentions of :class:`ODConvAttention`,
    ``out[b] = filter[b] * conv2d(x[b] * channel[b], sum_e kernel[b, e] (spatial[b] * W_e))``:
    the channel, filter and spatial attentions are the op's ``in_scale``, ``out_scale`` and
    ``tap_scale``, applied where the kernels mix (no pass over x or the output, no mixed kernels
    stored).

    Args:
        in_planes, out_planes, kernel_size, stride, dilation, groups: as ``nn.Conv2d``.
        padding: int, tuple, ``"same"`` (TensorFlow's) or ``"valid"`` (default 0).
        reduction: the attention's hidden width, ``max(int(in_planes * reduction), 16)``.
        kernel_num: E, the number of kernels.
        backend: passed to :func:`condconv_kernels.condconv2d` (the scales need ``cpu`` or
            ``reference`` for now: ``auto`` picks the reference backend for CUDA tensors).

    Parameters, as the official ``ODConv2d``: ``weight`` (kernel_num, out_planes,
    in_planes/groups, k, k) and ``attention.{fc, bn, channel_fc, filter_fc, spatial_fc,
    kernel_fc}`` (the last three absent for depthwise, 1x1 and single-kernel layers). No bias.

    Shapes: (B, in_planes, H, W) -> (B, out_planes, Ho, Wo).
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, reduction: float = 0.0625, kernel_num: int = 4,
                 backend: str = "auto"):
        super().__init__(in_planes, out_planes, kernel_size, stride, padding, dilation, groups,
                         backend, (("kernel_num", kernel_num),))
        self.kernel_num = kernel_num
        self.attention = ODConvAttention(in_planes, out_planes, self.kernel_size, groups,
                                         reduction, kernel_num)
        self.scales = (True, self.attention.filter_fc is not None,
                       self.attention.spatial_fc is not None)
        self.weight = nn.Parameter(torch.empty((kernel_num,) + self.weight_shape))
        for e in range(kernel_num):
            nn.init.kaiming_normal_(self.weight.data[e], mode="fan_out", nonlinearity="relu")

    @property
    def num_experts(self) -> int:
        return self.kernel_num

    @property
    def temperature(self) -> float:
        return self.attention.temperature

    def update_temperature(self, temperature: float) -> None:
        """Sets the attentions' temperature (the official schedule anneals it per epoch)."""
        if not temperature > 0:
            raise ValueError(f"ODConv2d: argument 'temperature' must be > 0, "
                             f"got {temperature!r}")
        self.attention.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, channel, filt, spatial = self.attention(x)
        return self.convolve(x, kernel, self.weight, None, in_scale=channel, out_scale=filt,
                             tap_scale=spatial)

    def extra_repr(self) -> str:
        return (f"{self._conv_repr()}, kernel_num={self.kernel_num}, "
                f"temperature={self.temperature}, backend={self.backend!r}")
