"""Argument normalisation and validation for condconv2d: the one place every backend's inputs
are checked (the C++ operators repeat the checks for callers that use ``torch.ops`` directly)."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

Padding = Union[int, str, Sequence[int]]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The largest value the C++ operators (int64) take; sizes computed from the arguments (padded
# input, output bytes) must fit too.
INT64_MAX = 2 ** 63 - 1


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def pair(value, name: str, minimum: int) -> Tuple[int, int]:
    """``value`` as an (h, w) pair of ints >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt, tuple, list)):
        raise TypeError(f"condconv2d: argument '{name}' must be an int or a pair of ints, "
                        f"got {type(value).__name__}")
    values = (value, value) if isinstance(value, (int, torch.SymInt)) else tuple(value)
    if len(values) != 2 or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)
                                   for v in values):
        raise ValueError(f"condconv2d: argument '{name}' must be an int or a pair of ints, "
                         f"got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"condconv2d: argument '{name}' must be >= {minimum}, got {value!r}")
    if any(v > INT64_MAX for v in values):
        raise ValueError(f"condconv2d: argument '{name}' must be <= 2**63 - 1, got {value!r}")
    return values[0], values[1]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int]:
    """TF "SAME" padding of one dimension: output ceil(size / stride); the odd pixel goes after.

    The total is ``max((ceil(size / stride) - 1) * stride + span - size, 0)`` (span: the
    dilated kernel), which depends on ``size`` only through ``size % stride``. Computed from
    that remainder as a plain int, so that under ``torch.compile`` with a symbolic ``size`` the
    padding is a constant behind one guard on the remainder, instead of a ``Max`` of floor
    divisions that nests through every strided layer (exponential tracing time)."""
    span = (kernel - 1) * dilation + 1
    # The remainder found by comparison: for a symbolic size each test is a guard on the
    # remainder, and the result a plain int (size % stride itself would stay symbolic).
    remainder = (next(r for r in range(stride) if size % stride == r) if stride <= 16
                 else size % stride)
    total = max(span - (remainder or stride), 0)
    return total // 2, total - total // 2


def resolve_padding(padding: Padding, input_hw: Sequence[int], kernel_hw: Sequence[int],
                    stride: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right).

    Accepts an int, (ph, pw), (top, bottom, left, right), ``"same"`` (TensorFlow's SAME,
    asymmetric when the total is odd) or ``"valid"`` (no padding)."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, 0, 0, 0
        if mode == "same":
            top, bottom = same_padding(input_hw[0], kernel_hw[0], stride[0], dilation[0])
            left, right = same_padding(input_hw[1], kernel_hw[1], stride[1], dilation[1])
            return top, bottom, left, right
        raise ValueError(f"condconv2d: argument 'padding' must be an int, a pair, a 4-tuple "
                         f"(top, bottom, left, right), 'same' or 'valid', got {padding!r}")
    if isinstance(padding, bool) or not isinstance(padding, (int, torch.SymInt, tuple, list)):
        raise TypeError(f"condconv2d: argument 'padding' must be an int, a tuple or a string, "
                        f"got {type(padding).__name__}")
    values = (padding,) if isinstance(padding, (int, torch.SymInt)) else tuple(padding)
    if not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in values):
        raise TypeError(f"condconv2d: argument 'padding' must hold ints, got {padding!r}")
    if len(values) == 1:
        values = values * 4
    elif len(values) == 2:
        values = (values[0], values[0], values[1], values[1])
    elif len(values) != 4:
        raise ValueError(f"condconv2d: argument 'padding' must have 1, 2 or 4 values, "
                         f"got {padding!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"condconv2d: argument 'padding' must be >= 0, got {padding!r}")
    if any(v > INT64_MAX for v in values):
        raise ValueError(f"condconv2d: argument 'padding' must be <= 2**63 - 1, got {padding!r}")
    return tuple(values)


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                dilation: int) -> int:
    return (size + pad_before + pad_after - (kernel - 1) * dilation - 1) // stride + 1


def check_inputs(x, routing, weight, bias, stride, padding, dilation, groups,
                 autocast: bool = False) -> None:
    """Validates types, ranks, shapes, dtypes and devices; ``stride``/``dilation`` are pairs and
    ``padding`` a resolved 4-tuple. Raises TypeError/ValueError naming the argument.

    With ``autocast`` (autocast enabled for x's device) the floating dtypes may differ: the op's
    autocast rule casts them before any kernel runs."""
    for name, t in (("x", x), ("routing", routing), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"condconv2d: argument '{name}' must be a Tensor, "
                            f"got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"condconv2d: argument 'bias' must be a Tensor or None, "
                        f"got {type(bias).__name__}")
    if x.dim() != 4:
        raise ValueError(f"condconv2d: argument 'x' must be 4-D (B, Cin, H, W), got "
                         f"{x.dim()}-D with shape {_shape(x)}")
    if routing.dim() != 2:
        raise ValueError(f"condconv2d: argument 'routing' must be 2-D (B, E), got shape "
                         f"{_shape(routing)}")
    if weight.dim() != 5:
        raise ValueError(f"condconv2d: argument 'weight' must be 5-D (E, Cout, Cin/groups, kh, "
                         f"kw), got shape {_shape(weight)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"condconv2d: argument 'x' must be float32, float64, float16 or "
                        f"bfloat16, got {x.dtype}")
    mixed_ok = autocast and x.dtype != torch.float64
    if mixed_ok:
        for name, t in (("routing", routing), ("weight", weight), ("bias", bias)):
            if t is not None and t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"condconv2d: argument '{name}' must be a floating tensor "
                                f"(float32, float64, float16 or bfloat16), got {t.dtype}")
    elif weight.dtype != x.dtype:
        raise TypeError(f"condconv2d: argument 'weight' must have x's dtype {x.dtype}, "
                        f"got {weight.dtype}")
    elif routing.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"condconv2d: argument 'routing' must have x's dtype {x.dtype} or "
                        f"float32, got {routing.dtype}")
    for name, t in (("routing", routing), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"condconv2d: argument '{name}' must be on x's device {x.device}, "
                             f"got {t.device}")
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)):
        raise TypeError(f"condconv2d: argument 'groups' must be an int, "
                        f"got {type(groups).__name__}")
    if groups < 1 or groups > INT64_MAX:
        raise ValueError(f"condconv2d: argument 'groups' must be >= 1 (and <= 2**63 - 1), "
                         f"got {groups}")

    B, cin, H, W = x.shape
    E, cout, cin_g, kh, kw = weight.shape
    if min(E, cout, cin_g, kh, kw) < 1:
        raise ValueError(f"condconv2d: argument 'weight' must have non-zero sizes, "
                         f"got {_shape(weight)}")
    if tuple(routing.shape) != (B, E):
        raise ValueError(f"condconv2d: argument 'routing' must have shape (B, E) = ({B}, {E}) "
                         f"from x's batch and weight's experts, got {_shape(routing)}")
    if cin % groups or cout % groups:
        raise ValueError(f"condconv2d: argument 'groups' = {groups} must divide x's channels "
                         f"({cin}) and weight's Cout ({cout})")
    if cin_g * groups != cin:
        raise ValueError(f"condconv2d: argument 'weight' must have Cin/groups = {cin // groups} "
                         f"in dim 2 for x with {cin} channels and groups={groups}, "
                         f"got shape {_shape(weight)}")
    if bias is not None:
        if tuple(bias.shape) != (E, cout):
            raise ValueError(f"condconv2d: argument 'bias' must have shape (E, Cout) = "
                             f"({E}, {cout}), got {_shape(bias)}")
        if bias.dtype != x.dtype and not mixed_ok:
            raise TypeError(f"condconv2d: argument 'bias' must have x's dtype {x.dtype}, "
                            f"got {bias.dtype}")
    span_h = (kh - 1) * dilation[0] + 1
    span_w = (kw - 1) * dilation[1] + 1
    padded_h = H + padding[0] + padding[1]
    padded_w = W + padding[2] + padding[3]
    if padded_h > INT64_MAX or padded_w > INT64_MAX:
        raise ValueError(f"condconv2d: argument 'padding' = {tuple(padding)} makes the padded "
                         f"input larger than 2**63 - 1 ({padded_h}x{padded_w})")
    if span_h > padded_h or span_w > padded_w:
        raise ValueError(f"condconv2d: argument 'weight' has a dilated kernel of "
                         f"{span_h}x{span_w}, larger than the padded input of "
                         f"{padded_h}x{padded_w}")
    shape = out_shape(x.shape, weight.shape, stride, padding, dilation)
    nbytes = shape[0] * shape[1] * shape[2] * shape[3] * x.element_size()
    if shape[2] * shape[3] * max(shape[1], 1) * x.element_size() > INT64_MAX or \
            nbytes > INT64_MAX:
        raise ValueError(f"condconv2d: the output of shape {shape} would be larger than 2**63 - "
                         f"1 bytes (arguments 'x', 'weight', 'padding')")


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for devices autocast does not know
    (meta, ...), where torch raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output of x's layout gets (mirrors Tensor.suggest_memory_format)."""
    try:
        from torch._prims_common import suggest_memory_format as _suggest
    except ImportError:  # older torch: the same rule, spelled out
        from torch._prims_common import are_strides_like_channels_last

        def _suggest(t):
            like = are_strides_like_channels_last(t.shape, t.stride())
            return torch.channels_last if like else torch.contiguous_format
    return _suggest(x)


def out_shape(x_shape, weight_shape, stride, padding, dilation) -> Tuple[int, int, int, int]:
    B, _, H, W = x_shape
    _, cout, _, kh, kw = weight_shape
    return (B, cout,
            output_size(H, kh, stride[0], padding[0], padding[1], dilation[0]),
            output_size(W, kw, stride[1], padding[2], padding[3], dilation[1]))
