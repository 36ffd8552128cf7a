"""Argument normalisation for condconv2d, and the checks only Python can make.

The rules on the tensors are stated once, in C++ (``check_inputs`` in csrc/ops.cpp): the C++
kernels run it themselves, the backends written in Python call it as an operator
(:func:`check_tensors`). What stays here is what C++ cannot see: Python objects (padding strings
and tuples, pairs, ints past int64, arguments that are not tensors) and autocast's mixed dtypes."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from . import backends

Padding = Union[int, str, Sequence[int]]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The largest value the C++ operators (int64) take; sizes computed from the arguments (padded
# input, output bytes) must fit too.
INT64_MAX = 2 ** 63 - 1


def pair(value, name: str, minimum: int) -> Tuple[int, int]:
    """``value`` as an (h, w) pair of ints >= ``minimum``."""
    kind = type(value)  # the common cases first (every eager call comes here)
    if kind is int and minimum <= value <= INT64_MAX:
        return value, value
    if (kind is tuple or kind is list) and len(value) == 2 and type(value[0]) is int \
            and type(value[1]) is int and minimum <= min(value) and max(value) <= INT64_MAX:
        return value[0], value[1]
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


def useful_stride(x_shape, weight_shape, stride, padding, dilation) -> List[int]:
    """``stride`` cut to at most one past the last window start of each dimension: the same
    output (a longer stride reads the first window alone), with index products inside int64 in
    every kernel and in oneDNN. The C++ kernels cut it the same way in ``check_inputs``."""
    cut = []
    for size, kernel, s, before, after, d in zip(x_shape[2:], weight_shape[3:], stride,
                                                 padding[0::2], padding[1::2], dilation):
        cut.append(min(s, max(size + before + after - (kernel - 1) * d, 1)))
    return cut


SCALE_NAMES = ("in_scale", "out_scale", "tap_scale")


def check_objects(x, routing, weight, bias, groups, scales=(None, None, None)) -> None:
    """What the C++ check cannot see: arguments that are not tensors (None for ``bias`` and the
    ``scales``, (in_scale, out_scale, tap_scale)) and a ``groups`` that is not an int or does
    not fit int64. Raises TypeError/ValueError naming the argument."""
    for name, t in (("x", x), ("routing", routing), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"condconv2d: argument '{name}' must be a Tensor, "
                            f"got {type(t).__name__}")
    for name, t in (("bias", bias),) + tuple(zip(SCALE_NAMES, scales)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"condconv2d: argument '{name}' must be a Tensor or None, "
                            f"got {type(t).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)):
        raise TypeError(f"condconv2d: argument 'groups' must be an int, "
                        f"got {type(groups).__name__}")
    if groups > INT64_MAX:
        raise ValueError(f"condconv2d: argument 'groups' must be >= 1 (and <= 2**63 - 1), "
                         f"got {groups}")


def check_autocast_dtypes(x, routing, weight, bias, *scales) -> None:
    """Under autocast the floating dtypes may differ (the autocast rule casts them before any
    kernel runs, and the tensor check then sees one dtype): each must be floating."""
    named = (("x", x), ("routing", routing), ("weight", weight), ("bias", bias))
    for name, t in named + tuple(zip(SCALE_NAMES, scales)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"condconv2d: argument '{name}' must be a floating tensor "
                            f"(float32, float64, float16 or bfloat16), got {t.dtype}")


def _checkable(*tensors) -> bool:
    """Whether the C++ check can run now: the extension loaded, not traced (an operator call
    would enter the trace), every size concrete (a symbolic size under ``torch.compile`` is
    checked when the compiled graph runs, by the real operator)."""
    if not backends.native_status()[0] or torch._C._get_tracing_state() is not None:
        return False
    return not any(isinstance(s, torch.SymInt) for t in tensors if t is not None
                   for s in t.shape)


def check_tensors(x, routing, weight, bias, stride, padding, dilation, groups, in_scale=None,
                  out_scale=None, tap_scale=None) -> None:
    """The rules on the tensors (ranks, shapes, dtypes, devices, geometry, sizes past int64),
    stated once, in C++ (``check_inputs`` in csrc/ops.cpp, which the C++ kernels run themselves):
    ``stride``/``dilation`` are pairs and ``padding`` a resolved 4-tuple. Raises TypeError /
    ValueError naming the argument. Without the C++ extension (the reference backend alone)
    PyTorch's own operators check the arguments."""
    if _checkable(x, routing, weight, bias, in_scale, out_scale, tap_scale):
        torch.ops.condconv.check_inputs(x, routing, weight, bias, stride, padding, dilation,
                                        groups, in_scale, out_scale, tap_scale)


def signature(*tensors) -> tuple:
    """What the checks and the kernels' launches read of a call's tensors (each None or a
    tensor of concrete sizes): shape, strides, dtype, device and whether its address is a
    multiple of 16 (Triton specializes pointers on it). Calls of equal signatures and equal
    other arguments pass or fail the same checks (and, under the same switches, launch the same
    kernels)."""
    return tuple(None if t is None else
                 (t.shape, t.stride(), t.dtype, t.device, not t.data_ptr() & 15)
                 for t in tensors)


def backward_mask(output_mask, scales) -> Tuple[bool, ...]:
    """The backward's ``output_mask`` as one flag per gradient (grad_x, grad_routing,
    grad_weight, grad_bias, grad_in_scale, grad_out_scale, grad_tap_scale): given with 4 entries
    (the scales' gradients then all come back, where the scale is given) or 7. ``scales``:
    (in_scale, out_scale, tap_scale), each None where absent. ValueError naming the argument
    for another length or a scale's gradient asked for without the scale."""
    mask = tuple(bool(m) for m in output_mask)
    if len(mask) not in (4, 7):
        raise ValueError(f"condconv2d_backward: argument 'output_mask' must have 4 or 7 entries "
                         f"(grad_x, grad_routing, grad_weight, grad_bias[, grad_in_scale, "
                         f"grad_out_scale, grad_tap_scale]), got {len(mask)}")
    if len(mask) == 4:
        return mask + tuple(s is not None for s in scales)
    for name, wanted, s in zip(SCALE_NAMES, mask[4:], scales):
        if wanted and s is None:
            raise ValueError(f"condconv2d_backward: argument 'output_mask' asks for "
                             f"grad_{name} but '{name}' is None")
    return mask


def check_backward_tensors(grad_out, x, routing, weight, bias, stride, padding, dilation, groups,
                           output_mask, in_scale=None, out_scale=None, tap_scale=None) -> None:
    """:func:`check_tensors`, then ``grad_out`` (the output's shape, x's dtype and device) and
    ``output_mask``'s first 4 entries (no grad_bias without a bias): ``check_backward_inputs``
    in csrc/ops.cpp."""
    if _checkable(grad_out, x, routing, weight, bias, in_scale, out_scale, tap_scale):
        torch.ops.condconv.check_backward_inputs(grad_out, x, routing, weight, bias, stride,
                                                 padding, dilation, groups,
                                                 list(output_mask[:4]), in_scale, out_scale,
                                                 tap_scale)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for devices autocast does not know
    (meta, ...), where torch raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output of x's layout gets (mirrors Tensor.suggest_memory_format).

    A 4-D tensor of concrete sizes and strides (every launch on the GPU) is read here in a
    microsecond or two, with torch's rule; otherwise torch's function decides, which costs
    ~15 us of host time a call (it goes through the symbolic-shape guards)."""
    if x.dim() == 4 and x.layout == torch.strided:
        shape, strides = x.shape, x.stride()
        if all(type(n) is int for n in (*shape, *strides)):
            last = _channels_last_strides(shape, strides)
            return torch.channels_last if last else torch.contiguous_format
    return _torch_suggest_memory_format(x)


def _channels_last_strides(shape, strides) -> bool:
    """torch's ``are_strides_like_channels_last_or_false`` for 4-D integer sizes and strides:
    the dimensions in channels_last order (C, W, H, N) with non-decreasing strides, each at
    least the previous one's extent, no empty dimension, C's stride not 0 and N's not equal to
    the extent before it when that is C's stride (ambiguous cases are NCHW)."""
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * shape[d]
    return True


try:
    from torch._prims_common import suggest_memory_format as _torch_suggest_memory_format
except ImportError:  # older torch: the same rule, spelled out
    from torch._prims_common import are_strides_like_channels_last

    def _torch_suggest_memory_format(t):
        like = are_strides_like_channels_last(t.shape, t.stride())
        return torch.channels_last if like else torch.contiguous_format


def out_shape(x_shape, weight_shape, stride, padding, dilation) -> Tuple[int, int, int, int]:
    B, _, H, W = x_shape
    _, cout, _, kh, kw = weight_shape
    return (B, cout,
            output_size(H, kh, stride[0], padding[0], padding[1], dilation[0]),
            output_size(W, kw, stride[1], padding[2], padding[3], dilation[1]))
