"""CondConv in plain PyTorch: the ground truth every backend is tested against and the unfused
baseline every benchmark measures against.

Three forms that compute the same thing::

    W_b = s_b * sum_e routing[b, e] * weight[e]
    bias_b = out_scale[b] * sum_e routing[b, e] * bias[e]
    out[b] = conv2d(pad(x[b]), W_b, bias_b, stride, dilation, groups)

with the optional per-example scales (1 where absent; ODConv's attentions)
``s_b[co, ci, i, j] = out_scale[b, co] * in_scale[b, group(co) * Cin/g + ci] * tap_scale[b, i, j]``.

- :func:`condconv2d_loop`: one ``F.conv2d`` per example (the TF reference, literally).
- :func:`condconv2d_grouped`: timm's trick: the B mixed kernels stacked into one grouped
  convolution over a (1, B*Cin, H, W) view. This is the *unfused baseline*: it materialises the
  B x Cout x Cin/g x kh x kw mixed kernels.
- :func:`condconv2d_unfold`: unfold + batched matmul; no data-dependent group count, so it
  exports to ONNX with a dynamic batch.

All take ``padding`` as (top, bottom, left, right) and ``stride``/``dilation`` as pairs (see
:func:`condconv_kernels.condconv2d` for the normalising public entry point). Shapes::

    x (B, Cin, H, W), routing (B, E), weight (E, Cout, Cin/groups, kh, kw), bias (E, Cout),
    in_scale (B, Cin), out_scale (B, Cout), tap_scale (B, kh, kw) -> (B, Cout, Ho, Wo)
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._args import backward_mask, suggest_memory_format
from ._epilogue import Scales, finish_grads, fold_scaled_kernel_grads

__all__ = ["mix", "condconv2d_loop", "condconv2d_grouped", "condconv2d_unfold",
           "forward", "backward"]


def mix(routing: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Per-example expert mix: (B, E) x (E, *shape) -> (B, *shape), in params' dtype."""
    E = params.shape[0]
    mixed = torch.matmul(routing.to(params.dtype), params.reshape(E, -1))
    return mixed.reshape((routing.shape[0],) + tuple(params.shape[1:]))


def _pad(x: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    top, bottom, left, right = padding
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom))


def _split_padding(x: torch.Tensor, padding: Sequence[int]):
    """(x, conv padding): symmetric padding goes to the convolution itself (as timm's layer
    passes its static padding to F.conv2d); asymmetric padding is applied to x first (as timm's
    conv2d_same does)."""
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return x, (top, left)
    return _pad(x, padding), (0, 0)


def _conv_dtype(x: torch.Tensor, groups: int, cin_g: int) -> torch.dtype:
    """The dtype the reference's ATen convolutions (forward and backward) run in: x's, except
    where an ATen CPU convolution bug (torch 2.13, oneDNN 3.x) would reach the result, which then
    runs in float32 (one rounding at the end). ``x`` is the convolution's input as passed to it
    (after any explicit padding), ``groups``/``cin_g`` the convolution's own.

    - bfloat16 with ``groups == 1`` and an odd ``cin_g``: oneDNN's jit_bf16 "first convolution"
      kernel pairs the last input channel with the neighbouring pixel times a zero weight, so a
      NaN/Inf in x reaches outputs whose window does not contain it (0 * NaN = NaN);
    - float16/bfloat16 inputs 1 or 2 pixels high or wide: reported to segfault (float16: a 1x1
      input, stride (1, 2), padding 1, dilation 2) or to return values 60-150% off (bfloat16:
      3x3/5x5 kernels, stride 2, padding k // 2) on some CPUs (not reproduced on AVX512-BF16
      without AMX or AVX512-FP16, where float16 does not use oneDNN).
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float16, torch.bfloat16):
        return x.dtype
    if x.shape[-2] <= 2 or x.shape[-1] <= 2:
        return torch.float32
    if x.dtype == torch.bfloat16 and groups == 1 and cin_g % 2 == 1:
        return torch.float32
    return x.dtype


def _conv2d(x, kernels, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """``F.conv2d``, in float32 where :func:`_conv_dtype` says so.

    Also: oneDNN's channels_last convolution (float32/bfloat16 on CPU) skips the taps that fall
    in the zero padding, so NaN/Inf kernels (a NaN routing weight) leave windows lying in the
    padding finite, where 0 * NaN is NaN on every other path; x goes NCHW for such kernels."""
    if any(padding if isinstance(padding, (tuple, list)) else (padding,)) and \
            x.device.type == "cpu" and \
            suggest_memory_format(x) == torch.channels_last and not bool(kernels.isfinite().all()):
        x = x.contiguous()
    dtype = _conv_dtype(x, groups, kernels.shape[1])
    if dtype == x.dtype:
        return F.conv2d(x, kernels, bias, stride, padding, dilation, groups)
    return F.conv2d(x.to(dtype), kernels.to(dtype), None if bias is None else bias.to(dtype),
                    stride, padding, dilation, groups).to(x.dtype)


def _conv2d_backward(grad_out, x, kernels, stride, padding, dilation, groups, output_mask):
    """(grad_x, grad_kernels) of ``F.conv2d`` without bias, in float32 where :func:`_conv_dtype`
    says so (the gradients come back in x's dtype)."""
    dtype = _conv_dtype(x, groups, kernels.shape[1])
    grad_x, grad_kernels, _ = torch.ops.aten.convolution_backward(
        grad_out.to(dtype), x.to(dtype), kernels.to(dtype), None, list(stride), list(padding),
        list(dilation), False, [0, 0], groups, list(output_mask) + [False])
    if dtype != x.dtype:
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        grad_kernels = None if grad_kernels is None else grad_kernels.to(x.dtype)
    return grad_x, grad_kernels


def condconv2d_loop(x, routing, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0),
                    dilation=(1, 1), groups=1, *, in_scale=None, out_scale=None,
                    tap_scale=None) -> torch.Tensor:
    """One ``F.conv2d`` per example with its mixed kernel (the TF reference); the scales
    multiplied into each example's kernel one by one."""
    kernels = mix(routing, weight)
    biases = mix(routing, bias) if bias is not None else None
    cout, cin_g = weight.shape[1], weight.shape[2]
    xp = _pad(x, padding)
    outs = []
    for b in range(x.shape[0]):
        kernel, bias_b = kernels[b], None if biases is None else biases[b]
        if out_scale is not None:
            kernel = kernel * out_scale[b].to(kernel.dtype)[:, None, None, None]
            bias_b = None if bias_b is None else bias_b * out_scale[b].to(bias_b.dtype)
        if in_scale is not None:  # output channel co reads input channels of its group
            rows = torch.stack([in_scale[b, (co // (cout // groups)) * cin_g:][:cin_g]
                                for co in range(cout)])
            kernel = kernel * rows.to(kernel.dtype)[:, :, None, None]
        if tap_scale is not None:
            kernel = kernel * tap_scale[b].to(kernel.dtype)[None, None]
        outs.append(_conv2d(xp[b:b + 1], kernel, bias_b, tuple(stride), 0, tuple(dilation),
                            groups))
    return torch.cat(outs, 0)


def _mixed(routing, weight, bias, groups, scales: Scales):
    """(B, |W|) kernels and (B, Cout) biases (or None) of the examples, scaled."""
    kernels = mix(routing, weight).flatten(1)
    # The scales multiplied in float32 (float64 for float64), rounded once, as the kernels do.
    acc = torch.float64 if kernels.dtype == torch.float64 else torch.float32
    factor = scales.kernel_factor(weight.shape, groups, acc)
    if factor is not None:
        kernels = (kernels.to(acc) * factor).to(kernels.dtype)
    biases = scales.scale_bias(mix(routing, bias)) if bias is not None else None
    return kernels, biases


def condconv2d_grouped(x, routing, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0),
                       dilation=(1, 1), groups=1, *, in_scale=None, out_scale=None,
                       tap_scale=None) -> torch.Tensor:
    """timm's grouped-convolution form: the unfused baseline."""
    B, cin, H, W = x.shape
    E, cout = weight.shape[:2]
    kernels, biases = _mixed(routing, weight, bias, groups, Scales(in_scale, out_scale, tap_scale))
    kernels = kernels.reshape((B * cout,) + tuple(weight.shape[2:]))
    biases = biases.reshape(B * cout) if biases is not None else None
    xp, conv_pad = _split_padding(x, padding)
    xp = xp.reshape(1, B * cin, xp.shape[-2], xp.shape[-1])
    out = _conv2d(xp, kernels, biases, tuple(stride), conv_pad, tuple(dilation), groups * B)
    return out.reshape(B, cout, out.shape[-2], out.shape[-1])


def condconv2d_unfold(x, routing, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0),
                      dilation=(1, 1), groups=1, *, in_scale=None, out_scale=None,
                      tap_scale=None) -> torch.Tensor:
    """unfold (im2col) + batched matmul with the mixed kernels; dynamic-batch friendly."""
    B, cin, H, W = x.shape
    E, cout, cin_g, kh, kw = weight.shape
    xp = _pad(x, padding)
    ho = (xp.shape[-2] - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    wo = (xp.shape[-1] - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    cols = F.unfold(xp, (kh, kw), dilation=tuple(dilation), stride=tuple(stride))
    cols = cols.reshape(B, groups, cin_g * kh * kw, ho * wo)
    kernels, biases = _mixed(routing, weight, bias, groups, Scales(in_scale, out_scale, tap_scale))
    kernels = kernels.reshape(B, groups, cout // groups, cin_g * kh * kw)
    out = torch.matmul(kernels, cols).reshape(B, cout, ho, wo)
    if biases is not None:
        out = out + biases.reshape(B, cout, 1, 1)
    return out


def _out_of_memory(exc: RuntimeError, x: torch.Tensor) -> RuntimeError:
    """An allocation failure of PyTorch's convolution, named: it copies a strided or padded x
    into a dense buffer (a huge stride-0 view of x becomes a huge allocation)."""
    return RuntimeError(f"condconv2d: backend 'reference' ran out of memory for argument 'x' of "
                        f"shape {tuple(x.shape)} and strides {x.stride()} (PyTorch's convolution "
                        f"copies x densely; backend 'cpu' reads only the windows): {exc}")


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def forward(x, routing, weight, bias, stride, padding, dilation, groups, in_scale=None,
            out_scale=None, tap_scale=None) -> torch.Tensor:
    """The reference backend's forward: the grouped form, in x's memory format."""
    try:
        out = condconv2d_grouped(x, routing, weight, bias, stride, padding, dilation, groups,
                                 in_scale=in_scale, out_scale=out_scale, tap_scale=tap_scale)
    except (RuntimeError, MemoryError) as exc:
        if _is_out_of_memory(exc):
            raise _out_of_memory(exc, x) from exc
        raise
    return out.contiguous(memory_format=suggest_memory_format(x))


def backward(grad_out, x, routing, weight, bias, stride, padding, dilation, groups,
             output_mask: Sequence[bool], in_scale=None, out_scale=None,
             tap_scale=None) -> Tuple[Optional[torch.Tensor], ...]:
    """The reference backend's backward: the gradients of the grouped form, computed the way
    autograd computes them for the unfused baseline (one grouped ``convolution_backward`` over
    the B materialised kernels, then the chain rule through the mix and the scales). Returns
    (grad_x, grad_routing, grad_weight, grad_bias, grad_in_scale, grad_out_scale,
    grad_tap_scale), None where ``output_mask`` (an entry per gradient, or 4: every given
    scale's; :func:`condconv_kernels._args.backward_mask`) is False."""
    scales = Scales(in_scale, out_scale, tap_scale)
    try:
        return _backward(grad_out, x, routing, weight, bias, stride, padding, dilation, groups,
                         backward_mask(output_mask, scales), scales)
    except (RuntimeError, MemoryError) as exc:
        if _is_out_of_memory(exc):
            raise _out_of_memory(exc, x) from exc
        raise


def _backward(grad_out, x, routing, weight, bias, stride, padding, dilation, groups,
              output_mask, scales: Scales):
    B, cin, H, W = x.shape
    E, cout = weight.shape[:2]
    need_x, need_r, need_w, need_b, *need_s = output_mask
    need_g = need_r or need_w or any(need_s)
    kernels = _mixed(routing, weight, None, groups, scales)[0]
    kernels = kernels.reshape((B * cout,) + tuple(weight.shape[2:]))
    xp, conv_pad = _split_padding(x, padding)
    gout = grad_out.reshape(1, B * cout, grad_out.shape[-2], grad_out.shape[-1])
    grad_xp, grad_kernels = _conv2d_backward(
        gout, xp.reshape(1, B * cin, xp.shape[-2], xp.shape[-1]), kernels, stride, conv_pad,
        dilation, groups * B, [need_x, need_g])
    grad_x = grad_routing = grad_weight = grad_bias = None
    if need_x:
        grad_x = grad_xp.reshape(B, cin, xp.shape[-2], xp.shape[-1])
        if xp is not x:  # asymmetric padding was applied to x: drop its gradient
            top, _, left, _ = padding
            grad_x = grad_x[:, :, top:top + H, left:left + W]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale_grads = (None, None, None)
    if need_g:
        grad_routing, grad_weight, scale_grads = fold_scaled_kernel_grads(
            grad_kernels.reshape(B, -1).to(acc), routing, weight, scales, groups, need_r,
            need_w, acc, need_s)
    grad_routing, grad_bias, *scale_grads = finish_grads(grad_out, routing, bias, grad_routing,
                                                         need_b, acc, scales, scale_grads)
    return (grad_x, grad_routing, grad_weight, grad_bias, *scale_grads)
