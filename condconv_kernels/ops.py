"""The registered ``condconv`` operators and the public :func:`condconv2d`.

Operators (``torch.ops.condconv``):

- ``condconv2d(x, routing, weight, bias?, stride[2], padding[4], dilation[2], groups, backend,
  in_scale?, out_scale?, tap_scale?)``: the differentiable op; ``backend`` is a concrete backend
  name (never ``auto``).
- ``condconv2d_backward(grad_out, x, routing, weight, bias?, stride, padding, dilation, groups,
  backend, output_mask, in_scale?, out_scale?, tap_scale?) -> (grad_x, grad_routing,
  grad_weight, grad_bias, grad_in_scale, grad_out_scale, grad_tap_scale)``: the handwritten
  backward; ``output_mask`` has an entry per gradient (7), or 4 (the given scales' gradients
  then all come back); gradients not asked for, and those of absent scales, come back as empty
  tensors.
- ``native_forward`` / ``native_backward``: the C++ kernels (csrc/), bound per dispatch key.

Each op has a fake implementation (output strides follow x's memory format), the forward op a
handwritten autograd formula, an autocast rule and a FLOP formula.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _args, backends, reference

__all__ = ["condconv2d"]

_lib = torch.library.Library("condconv", "FRAGMENT")


# Every backend's forward takes (x, routing, weight, bias, stride, padding, dilation, groups,
# in_scale, out_scale, tap_scale); its backward (grad_out, the same up to groups, output_mask
# with an entry per gradient (7: _args.backward_mask), the scales) and returns the seven
# gradients, None where not asked for.


def _native_forward(*args):
    return torch.ops.condconv.native_forward(*args)


def _native_backward(*args):
    mask, scales = args[-4], args[-3:]
    grads = torch.ops.condconv.native_backward(*args[:-4], list(mask[:4]), *scales,
                                               list(mask[4:]))
    return tuple(g if m else None for g, m in zip(grads, mask))


def _on_device(t: Tensor):
    """The device guard a Triton launch needs: Triton launches on the current CUDA device,
    whatever device the tensors are on (a no-op where they are on it)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _triton_forward(*args):
    from . import triton as triton_backend  # imported on first use: triton is optional
    with _on_device(args[0]):
        return triton_backend.forward(*args)


def _triton_backward(*args):
    from . import triton as triton_backend
    with _on_device(args[0]):
        return triton_backend.backward(*args)


_FORWARD = {"reference": reference.forward, "cpu": _native_forward, "cuda": _native_forward,
            "triton": _triton_forward}
_BACKWARD = {"reference": reference.backward, "cpu": _native_backward, "cuda": _native_backward,
             "triton": _triton_backward}


def _empty_output(x, weight, stride, padding, dilation):
    shape = _args.out_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=_args.suggest_memory_format(x))


def _check_backend(backend):
    if backend not in _FORWARD:
        raise ValueError(f"condconv2d: argument 'backend' must be one of {tuple(_FORWARD)}, "
                         f"got {backend!r}")


# The backends written in Python: their arguments are checked here, by the C++ check operator
# (the C++ kernels check theirs).
_PYTHON_BACKENDS = ("reference", "triton")


@torch.library.custom_op("condconv::condconv2d", mutates_args=())
def _condconv2d(x: Tensor, routing: Tensor, weight: Tensor, bias: Optional[Tensor],
                stride: List[int], padding: List[int], dilation: List[int], groups: int,
                backend: str, in_scale: Optional[Tensor] = None,
                out_scale: Optional[Tensor] = None, tap_scale: Optional[Tensor] = None) -> Tensor:
    _check_backend(backend)
    return _forward_impl(x, routing, weight, bias, stride, padding, dilation, groups, backend,
                         in_scale, out_scale, tap_scale)


# Plain eager calls' signatures that passed the checks, with what the forward derives from
# them: (the useful stride, the output's memory format). At most _MAX_CHECKED, then anew.
_CHECKED: dict = {}
_MAX_CHECKED = 4096


def _forward_impl(x, routing, weight, bias, stride, padding, dilation, groups, backend,
                  *scales, memo=False):
    """The forward op's computation, checks included (here for the Python backends and the empty
    batch, which never reach a kernel; in C++ for the C++ kernels). ``memo`` (plain eager calls
    of plain tensors, concrete sizes): a signature (``_args.signature`` and the other arguments)
    met before skips the checks and what follows from it alone."""
    key = None
    if memo and x.shape[0] > 0:
        key = (backend, _args.signature(x, routing, weight, bias, *scales), tuple(stride),
               tuple(padding), tuple(dilation), groups)
        known = _CHECKED.get(key)
        if known is not None:
            useful, memory_format = known
            out = _FORWARD[backend](x, routing, weight, bias, useful, padding, dilation, groups,
                                    *scales)
            return out.contiguous(memory_format=memory_format)
    if backend in _PYTHON_BACKENDS or x.shape[0] == 0:
        _args.check_tensors(x, routing, weight, bias, stride, padding, dilation, groups, *scales)
    if x.shape[0] == 0:
        return _empty_output(x, weight, stride, padding, dilation)
    stride = _args.useful_stride(x.shape, weight.shape, stride, padding, dilation)
    memory_format = _args.suggest_memory_format(x)
    out = _FORWARD[backend](x, routing, weight, bias, stride, padding, dilation, groups, *scales)
    if key is not None:
        if len(_CHECKED) >= _MAX_CHECKED:
            _CHECKED.clear()
        _CHECKED[key] = (stride, memory_format)
    return out.contiguous(memory_format=memory_format)


def _eager_forward(*args):
    return _forward_impl(*args, memo=True)


@_condconv2d.register_fake
def _condconv2d_fake(x, routing, weight, bias, stride, padding, dilation, groups, backend,
                     in_scale=None, out_scale=None, tap_scale=None):
    _check_backend(backend)
    _args.check_tensors(x, routing, weight, bias, stride, padding, dilation, groups, in_scale,
                        out_scale, tap_scale)
    return _empty_output(x, weight, stride, padding, dilation)


def _grad_like(grad: Optional[Tensor], like: Optional[Tensor], wanted: bool, x: Tensor,
               memory_format=torch.contiguous_format) -> Tensor:
    """A gradient in its final layout; an empty tensor where it was not asked for."""
    if not wanted:
        return x.new_empty((0,))
    if grad is None:  # empty batch
        return torch.zeros_like(like, memory_format=memory_format)
    return grad.contiguous(memory_format=memory_format)


@torch.library.custom_op("condconv::condconv2d_backward", mutates_args=())
def _condconv2d_backward(grad_out: Tensor, x: Tensor, routing: Tensor, weight: Tensor,
                         bias: Optional[Tensor], stride: List[int], padding: List[int],
                         dilation: List[int], groups: int, backend: str,
                         output_mask: List[bool], in_scale: Optional[Tensor] = None,
                         out_scale: Optional[Tensor] = None, tap_scale: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_backend(backend)
    return _backward_impl(grad_out, x, routing, weight, bias, stride, padding, dilation, groups,
                          backend, output_mask, in_scale, out_scale, tap_scale)


def _backward_impl(grad_out, x, routing, weight, bias, stride, padding, dilation, groups, backend,
                   output_mask, *scales, checked=False, placeholders=True):
    """The backward op's computation, checks included (as :func:`_forward_impl`).
    ``checked``: the arguments were checked already (the eager path's backward: the forward
    checked the saved inputs, and autograd hands a gradient of the output's shape, dtype and
    device); ``placeholders=False``: None for a gradient not asked for, instead of the op's
    empty tensor."""
    mask = _args.backward_mask(output_mask, scales)
    if (backend in _PYTHON_BACKENDS and not checked) or x.shape[0] == 0:
        _args.check_backward_tensors(grad_out, x, routing, weight, bias, stride, padding,
                                     dilation, groups, mask, *scales)
    if x.shape[0] == 0:
        grads = (None,) * 7
    else:
        stride = _args.useful_stride(x.shape, weight.shape, stride, padding, dilation)
        grads = _BACKWARD[backend](grad_out, x, routing, weight, bias, stride, padding,
                                   dilation, groups, mask, *scales)
    likes = (x, routing, weight, bias) + tuple(scales)
    formats = (_args.suggest_memory_format(x),) + (torch.contiguous_format,) * 6
    return tuple(_grad_like(g, like, wanted, x, fmt) if wanted or placeholders else None
                 for g, like, wanted, fmt in zip(grads, likes, mask, formats))


@_condconv2d_backward.register_fake
def _condconv2d_backward_fake(grad_out, x, routing, weight, bias, stride, padding, dilation,
                              groups, backend, output_mask, in_scale=None, out_scale=None,
                              tap_scale=None):
    _check_backend(backend)
    scales = (in_scale, out_scale, tap_scale)
    mask = _args.backward_mask(output_mask, scales)
    _args.check_backward_tensors(grad_out, x, routing, weight, bias, stride, padding, dilation,
                                 groups, mask, *scales)

    def fake(like, wanted, memory_format=torch.contiguous_format):
        if not wanted:
            return x.new_empty((0,))
        return torch.empty_like(like, memory_format=memory_format)
    return ((fake(x, mask[0], _args.suggest_memory_format(x)),)
            + tuple(fake(like, wanted) for like, wanted in
                    zip((routing, weight, bias) + scales, mask[1:])))


def _setup_context(ctx, inputs, output):
    x, routing, weight, bias, stride, padding, dilation, groups, backend, *scales = inputs
    ctx.save_for_backward(x, routing, weight, bias, *scales)
    ctx.conv_args = (stride, padding, dilation, groups, backend)


def _backward(ctx, grad_out, run=torch.ops.condconv.condconv2d_backward):
    x, routing, weight, bias, *scales = ctx.saved_tensors
    stride, padding, dilation, groups, backend = ctx.conv_args
    # Trailing scales left at their defaults may be missing from the inputs.
    scales = tuple(scales) + (None,) * (3 - len(scales))
    needs = tuple(ctx.needs_input_grad) + (False,) * (12 - len(ctx.needs_input_grad))
    # One entry per gradient: the scales' only where given and wanted (each costs work).
    mask = ([bool(m) for m in needs[:3]] + [bool(needs[3]) and bias is not None]
            + [s is not None and bool(need) for s, need in zip(scales, needs[9:12])])
    grads = run(grad_out, x, routing, weight, bias, stride, padding, dilation, groups, backend,
                mask, *scales)
    return (tuple(g if m else None for g, m in zip(grads[:4], mask[:4])) + (None,) * 5
            + tuple(g if m else None for g, m in zip(grads[4:], mask[4:])))


_condconv2d.register_autograd(_backward, setup_context=_setup_context)


class _EagerCondConv2d(torch.autograd.Function):
    """The differentiable op without the custom-op layer, for plain eager calls on the kernel
    backends: the same forward, saved tensors and backward (:func:`_backward` with the backward
    op's computation called directly). The layer's dispatch, schema handling and second argument
    check cost hundreds of microseconds of host time per forward + backward, more than a layer's
    GPU time at small sizes, and the GPU then waits for the host."""

    @staticmethod
    def forward(ctx, x, routing, weight, bias, stride, padding, dilation, groups, backend,
                in_scale, out_scale, tap_scale):
        inputs = (x, routing, weight, bias, stride, padding, dilation, groups, backend, in_scale,
                  out_scale, tap_scale)
        _setup_context(ctx, inputs, None)
        return _forward_impl(*inputs, memo=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # not differentiable, as the op's backward op has no formula
        return _backward(ctx, grad_out, run=functools.partial(_backward_impl, checked=True,
                                                              placeholders=False))


if backends.native_status()[0]:
    @torch.library.register_fake("condconv::native_forward")
    def _native_forward_fake(x, routing, weight, bias, stride, padding, dilation, groups,
                             in_scale=None, out_scale=None, tap_scale=None):
        _args.check_tensors(x, routing, weight, bias, stride, padding, dilation, groups,
                            in_scale, out_scale, tap_scale)
        return _empty_output(x, weight, stride, padding, dilation)

    @torch.library.register_fake("condconv::native_backward")
    def _native_backward_fake(grad_out, x, routing, weight, bias, stride, padding, dilation,
                              groups, output_mask, in_scale=None, out_scale=None,
                              tap_scale=None):
        return _condconv2d_backward_fake(grad_out, x, routing, weight, bias, stride, padding,
                                         dilation, groups, "cpu", output_mask, in_scale,
                                         out_scale, tap_scale)


def _autocast_kernel(device_type: str):
    """Autocast rule: x, weight and bias run in the autocast dtype; routing stays float32 so
    the expert mix is computed (and accumulated) in float32. float64 inputs are left alone."""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset, x, routing, weight, bias, stride, padding, dilation, groups, backend,
               in_scale=None, out_scale=None, tap_scale=None):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            x, routing, weight, bias, *scales = autocast_inputs(x, routing, weight, bias,
                                                                in_scale, out_scale, tap_scale)
            return torch.ops.condconv.condconv2d(x, routing, weight, bias, stride, padding,
                                                 dilation, groups, backend, *scales)
    return kernel


def autocast_inputs(x, routing, weight, bias, *scales):
    """The autocast rule on the tensors: x, weight and bias in the autocast dtype of x's device,
    routing and the scales in float32 (the mix and its scaling computed in float32); everything
    as it is when x is float64 (or on another device)."""
    device_type = x.device.type
    if x.dtype == torch.float64:
        return (x, routing, weight, bias) + scales
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t, dtype):
        if t is None or t.device.type != device_type or t.dtype == torch.float64:
            return t
        return t.to(dtype)
    return ((cast(x, dtype), cast(routing, torch.float32), cast(weight, dtype), cast(bias, dtype))
            + tuple(cast(s, torch.float32) for s in scales))


for _device_type in ("cpu", "cuda"):
    _lib.impl("condconv2d", _autocast_kernel(_device_type),
              "Autocast" + torch._C._dispatch_key_for_device(_device_type), with_keyset=True)


def _conv_madds(x_shape, weight_shape, out_shape) -> int:
    return math.prod(out_shape) * math.prod(weight_shape[2:])


def _mix_madds(routing_shape, weight_shape) -> int:
    return routing_shape[0] * routing_shape[1] * math.prod(weight_shape[1:])


def _scale_madds(routing_shape, weight_shape, *scale_shapes) -> int:
    """One multiply per kernel element and example for each scale given."""
    return (routing_shape[0] * math.prod(weight_shape[1:])
            * sum(shape is not None for shape in scale_shapes))


@register_flop_formula(torch.ops.condconv.condconv2d)
def _condconv2d_flops(x_shape, routing_shape, weight_shape, bias_shape, stride, padding,
                      dilation, groups, backend, in_scale_shape=None, out_scale_shape=None,
                      tap_scale_shape=None, *, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add: the convolution plus the B*E*|W| expert mix (and B*|W| per
    scale)."""
    return 2 * (_conv_madds(x_shape, weight_shape, out_shape)
                + _mix_madds(routing_shape, weight_shape)
                + _scale_madds(routing_shape, weight_shape, in_scale_shape, out_scale_shape,
                               tap_scale_shape))


@register_flop_formula(torch.ops.condconv.condconv2d_backward)
def _condconv2d_backward_flops(grad_out_shape, x_shape, routing_shape, weight_shape, bias_shape,
                               stride, padding, dilation, groups, backend, output_mask,
                               in_scale_shape=None, out_scale_shape=None, tap_scale_shape=None,
                               *, out_shape=None, **kwargs) -> int:
    """grad_x: a transposed convolution with the re-mixed kernel; grad_routing / grad_weight:
    the per-example kernel gradient, times the scales, then E dot products / E axpys of |W| per
    example; each scale's gradient asked for a product and a sum over |W| per example."""
    shapes = (in_scale_shape, out_scale_shape, tap_scale_shape)
    mask = _args.backward_mask(output_mask, shapes)
    conv = _conv_madds(x_shape, weight_shape, grad_out_shape)
    mix = _mix_madds(routing_shape, weight_shape)
    scale = _scale_madds(routing_shape, weight_shape, *shapes)
    asked = _scale_madds(routing_shape, weight_shape,
                         *(s if wanted else None for s, wanted in zip(shapes, mask[4:])))
    madds = 0
    if mask[0]:
        madds += conv + mix + scale
    if mask[1] or mask[2]:
        madds += conv + mix * (int(mask[1]) + int(mask[2])) + scale + 2 * asked
    elif asked:
        madds += conv + 2 * asked
    return 2 * madds


_PLAIN = (torch.Tensor, torch.nn.Parameter, type(None))


def _plain_eager(*tensors) -> bool:
    """True when the ``condconv2d`` op layer may be skipped: plain tensors or parameters (no
    fake/functional/subclass tensors), not tracing, compiling or under a functorch transform, no
    Python dispatch or function mode (FlopCounterMode, ...). Called on every eager call: plain
    comparisons, no generators."""
    for t in tensors:
        if type(t) not in _PLAIN:
            return False
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    if torch._C._is_torch_function_mode_enabled() or \
            torch._C._are_functorch_transforms_active():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode() is None


def _records_gradient(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _eager(x, routing, weight, bias, stride, padding, dilation, groups, backend, autocast,
           scales):
    """A plain eager call on a kernel backend (cpu, cuda, triton), without the custom-op layer:
    where ``autocast`` (autocast on for x's device), the autocast rule applied here (nothing
    inside is cast again, as under the op's autocast kernel), then :class:`_EagerCondConv2d`
    where a gradient is recorded, else the forward alone (for cpu and cuda the C++ op, whose name
    a profiler shows; the triton backend's forward gets a profiler range named as the op).
    ``scales``: (in_scale, out_scale, tap_scale), each None where absent."""
    if autocast:
        x, routing, weight, bias, *scales = autocast_inputs(x, routing, weight, bias, *scales)
        with torch.autocast(x.device.type, enabled=False):
            return _eager(x, routing, weight, bias, stride, padding, dilation, groups, backend,
                          False, scales)
    if _records_gradient(x, routing, weight, bias, *scales):
        run = _EagerCondConv2d.apply
    elif backend != "triton" and x.shape[0] > 0:
        return torch.ops.condconv.native_forward(x, routing, weight, bias, stride, padding,
                                                 dilation, groups, *scales)
    else:
        run = _eager_forward
    args = (x, routing, weight, bias, stride, padding, dilation, groups, backend, *scales)
    if backend == "triton" and torch._C._autograd._profiler_enabled():
        with torch.autograd.profiler.record_function("condconv::condconv2d"):
            return run(*args)
    return run(*args)


def normalise_arguments(x, routing, weight, bias, stride, padding, dilation, groups,
                        scales=(None, None, None)):
    """The Python half of a call's checks, and its normalised arguments: (stride, padding,
    dilation, autocast) with stride and dilation (h, w) pairs, padding (top, bottom, left, right)
    and ``autocast`` whether autocast is on for x's device. The tensors themselves are checked
    later, once, by the C++ check, on the dtypes the autocast rule gives them. ``scales``:
    (in_scale, out_scale, tap_scale)."""
    _args.check_objects(x, routing, weight, bias, groups, scales)
    if x.dim() != 4 or weight.dim() != 5:
        # Ranks first: "same" padding reads x's and weight's last two sizes.
        _args.check_tensors(x, routing, weight, bias, (1, 1), (0, 0, 0, 0), (1, 1), groups)
    stride_hw = _args.pair(stride, "stride", 1)
    dilation_hw = _args.pair(dilation, "dilation", 1)
    pad = _args.resolve_padding(padding, x.shape[-2:], weight.shape[-2:], stride_hw, dilation_hw)
    autocast = _args.autocast_enabled(x.device.type)
    if autocast and x.dtype != torch.float64:  # float64 inputs are left to the tensor check
        _args.check_autocast_dtypes(x, routing, weight, bias, *scales)
    return stride_hw, pad, dilation_hw, autocast


def condconv2d(x: Tensor, routing: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               stride=1, padding: _args.Padding = 0, dilation=1, groups: int = 1, *,
               in_scale: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
               tap_scale: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Conditionally parameterised convolution (CondConv, Yang et al. 2019) and its family.

    For each example b, with kernel ``W_b = sum_e routing[b, e] * weight[e]`` (and likewise the
    bias), ``out[b] = conv2d(x[b], W_b, bias_b, stride, padding, dilation, groups)``. The
    backends mix the experts inside the convolution: the dense layers' B mixed kernels are never
    stored (the CPU's depthwise path stores its B mixed C x kh x kw kernels, the size of B output
    pixels per channel; the ``reference`` backend stores all of them, as timm does).

    The optional per-example scales (ODConv's channel, filter and spatial attentions; Dynamic
    Convolution needs none) multiply the kernel and the bias::

        W_b[co, ci, i, j] = out_scale[b, co] * in_scale[b, g * Cin/groups + ci]
                            * tap_scale[b, i, j] * sum_e routing[b, e] weight[e, co, ci, i, j]
        bias_b = out_scale[b] * sum_e routing[b, e] bias[e]

    (g the group of output channel co), so ``out = out_scale * conv(x * in_scale, ...)`` without
    a pass over x or out: the kernels apply them where they mix. Supported by the ``triton``,
    ``cpu`` and ``reference`` backends (``auto`` picks one of them for a call with scales; the
    ``cuda`` backend, named explicitly, raises NotImplementedError).

    Args:
        x: (B, Cin, H, W), float32/float64/float16/bfloat16, any strides (contiguous,
            channels_last, sliced).
        routing: (B, E) routing weights, already activated (EfficientNet uses a sigmoid);
            x's dtype or float32.
        weight: (E, Cout, Cin/groups, kh, kw) expert kernels, x's dtype.
        bias: (E, Cout) expert biases or None.
        stride, dilation: int or (h, w).
        padding: int, (ph, pw), (top, bottom, left, right), ``"same"`` (TensorFlow's SAME,
            asymmetric when needed) or ``"valid"``.
        groups: as in ``torch.nn.functional.conv2d``; ``groups=Cin`` is depthwise.
        in_scale: (B, Cin) or None; x's dtype or float32.
        out_scale: (B, Cout) or None; x's dtype or float32.
        tap_scale: (B, kh, kw) or None; x's dtype or float32.
        backend: ``"auto"`` (default), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Returns:
        (B, Cout, Ho, Wo) in x's dtype and memory format.

    Differentiable in x, routing, weight, bias and the scales (handwritten backward).
    """
    scales = (in_scale, out_scale, tap_scale)
    stride_hw, pad, dilation_hw, autocast = normalise_arguments(
        x, routing, weight, bias, stride, padding, dilation, groups, scales)
    name = backends.resolve(backend, x.device.type, any(s is not None for s in scales))
    # The two routes into a backend's kernels. Plain eager calls (plain tensors; not compiled,
    # traced or under vmap/grad transforms; no dispatch or function mode) on the kernel backends
    # skip the custom-op layer, whose dispatch and Python kernel cost tens to hundreds of
    # microseconds of host time a call: _eager (autocast rule, autograd.Function). Everything
    # else, and the reference backend always, goes through the condconv::condconv2d op (its
    # autocast kernel, autograd formula, fake implementation and FLOP formula). The tensors are
    # checked once on either route, by the C++ check (csrc/ops.cpp), after the autocast rule.
    conv = (list(stride_hw), list(pad), list(dilation_hw), groups)
    if name != "reference" and _plain_eager(x, routing, weight, bias, *scales):
        return _eager(x, routing, weight, bias, *conv, name, autocast, scales)
    return torch.ops.condconv.condconv2d(x, routing, weight, bias, *conv, name, *scales)
