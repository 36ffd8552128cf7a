"""The backward's epilogue for the backends written in Python (reference, triton), the same
rules as the C++ backends' ``csrc/epilogue.h``. With G_b the kernel gradient of example b and
gsum the grad_out summed over pixels (B, Cout)::

    grad_weight[e]     = sum_b routing[b, e] G_b           grad_bias = routing^T gsum
    grad_routing[b, e] = <G_b, W[e]> + <gsum[b], bias[e]>

and, with the per-example scales (``csrc/scales.h`` states the same rules for C++), where
s_b[co, ci, t] = out_scale[b, co] * in_scale[b, group(co) * Cin/g + ci] * tap_scale[b, t] and
the kernel of example b is s_b * M_b (M_b = sum_e routing[b, e] W[e]): the folds above take
s_b * G_b for G_b and out_scale * gsum for gsum, and with Q_b = G_b * M_b::

    grad_out_scale[b, co] = sum_{ci, t} Q_b in_scale tap_scale + gsum[b, co] (routing bias)[b, co]
    grad_in_scale[b, ci]  = sum_{co in ci's group, t} Q_b out_scale tap_scale
    grad_tap_scale[b, t]  = sum_{co, ci} Q_b out_scale in_scale
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch


class Scales(NamedTuple):
    """The optional per-example scales: in (B, Cin), out (B, Cout), tap (B, kh, kw)."""
    in_: Optional[torch.Tensor] = None
    out: Optional[torch.Tensor] = None
    tap: Optional[torch.Tensor] = None

    def any(self) -> bool:
        return self.in_ is not None or self.out is not None or self.tap is not None

    def factors(self, weight_shape, groups: int, dtype: torch.dtype):
        """(out, in, tap) in ``dtype``, shaped to broadcast over (B, groups, Cout/g, Cin/g,
        taps); None where absent."""
        _, cout, cin_g, kh, kw = weight_shape

        def shaped(t, shape):
            return None if t is None else t.to(dtype).reshape(shape)
        B = next(t.shape[0] for t in self if t is not None)
        return (shaped(self.out, (B, groups, cout // groups, 1, 1)),
                shaped(self.in_, (B, groups, 1, cin_g, 1)),
                shaped(self.tap, (B, 1, 1, 1, kh * kw)))

    def kernel_factor(self, weight_shape, groups: int, dtype: torch.dtype):
        """s_b as (B, |W|) in ``dtype``, or None without scales."""
        if not self.any():
            return None
        factor = None
        for f in self.factors(weight_shape, groups, dtype):
            if f is not None:
                factor = f if factor is None else factor * f
        B = factor.shape[0]
        _, cout, cin_g, kh, kw = weight_shape
        return factor.expand(B, groups, cout // groups, cin_g, kh * kw).flatten(1)

    def scale_bias(self, bias_mix: torch.Tensor) -> torch.Tensor:
        """The mixed biases (B, Cout) times out_scale."""
        return bias_mix if self.out is None else bias_mix * self.out.to(bias_mix.dtype)


def scale_grads_from_kernels(G: torch.Tensor, M: torch.Tensor, scales: Scales, weight_shape,
                             groups: int, wanted: Sequence[bool] = (True, True, True)
                             ) -> Tuple[Optional[torch.Tensor], ...]:
    """The kernel terms of (grad_in_scale (B, Cin), grad_out_scale (B, Cout), grad_tap_scale
    (B, taps)) in G's dtype from G and the unscaled mixed kernels M (B, |W|); None where the scale
    is absent or its gradient not ``wanted``."""
    _, cout, cin_g, kh, kw = weight_shape
    B = G.shape[0]
    Q = (G * M).reshape(B, groups, cout // groups, cin_g, kh * kw)
    o, i, t = scales.factors(weight_shape, groups, G.dtype)

    def times(a, b):
        p = Q
        for f in (a, b):
            if f is not None:
                p = p * f
        return p
    want_i, want_o, want_t = wanted
    return (None if i is None or not want_i else times(o, t).sum((2, 4)).flatten(1),
            None if o is None or not want_o else times(i, t).sum((3, 4)).reshape(B, cout),
            None if t is None or not want_t else times(o, i).sum((1, 2, 3)))


def fold_scaled_kernel_grads(G: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
                             scales: Scales, groups: int, need_r: bool, need_w: bool,
                             acc: torch.dtype, wanted: Sequence[bool] = (True, True, True)):
    """:func:`fold_kernel_grads` of s_b * G_b, and the kernel terms of the scales' gradients
    ``wanted`` (:func:`scale_grads_from_kernels`, in ``acc``): (grad_routing, grad_weight,
    scale_grads)."""
    scale_grads = (None, None, None)
    if scales.any():
        if any(w and s is not None for w, s in zip(wanted, scales)):
            M = routing.to(acc) @ weight.reshape(weight.shape[0], -1).to(acc)
            scale_grads = scale_grads_from_kernels(G, M, scales, weight.shape, groups, wanted)
        G = G * scales.kernel_factor(weight.shape, groups, acc)
    return fold_kernel_grads(G, routing, weight, need_r, need_w, acc) + (scale_grads,)


def fold_kernel_grads(G: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
                      need_r: bool, need_w: bool, acc: torch.dtype,
                      weight_dtype: Optional[torch.dtype] = None
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_routing in ``acc``, grad_weight in weight's shape and ``weight_dtype``, weight's
    dtype by default) from G (B, |W|), None where not wanted. Every caller passes G in ``acc``;
    a half G also works (its products then summed in float32 by :func:`float32_products`,
    float32 routing carried by :func:`routing_parts`)."""
    grad_routing = grad_weight = None
    E = weight.shape[0]
    if need_r:
        grad_routing = _inner_products(G, weight.reshape(E, -1).to(G.dtype)).to(acc)
    if need_w:
        R = routing_parts(routing, G.dtype)
        g = float32_products(torch.mm, R.t(), G)
        if R.shape[1] > E:  # the two parts' products, added
            g = g[:E] + g[E:]
        grad_weight = g.reshape(weight.shape).to(weight_dtype or weight.dtype)
    return grad_routing, grad_weight


def routing_parts(routing: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The routing weights (rows, E) as an operand in ``dtype``: themselves (cast) where they
    are no finer than it, else (float32 routing, autocast's rule, against half tensors) (rows,
    2E), the weights rounded to ``dtype`` beside what that rounding left out, also rounded: a
    product with the experts stacked twice ([W; W]) then carries the routing to about twice the
    half dtype's precision (~2^-17 for bfloat16) instead of its own (2^-9), at no cost to a
    product whose reduction over E is short."""
    if torch.finfo(routing.dtype).eps >= torch.finfo(dtype).eps:
        return routing.to(dtype)  # nothing finer than ``dtype`` to carry
    high = routing.to(dtype)
    return torch.cat([high, (routing - high).to(dtype)], 1)  # the difference in routing's dtype


# Whether this PyTorch's mm and bmm take out_dtype (float32 results of half inputs, on CUDA).
_OUT_DTYPE = all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.bmm))


def fp16_accumulation() -> bool:
    """Whether PyTorch's float16 matrix products may sum in float16
    (``torch.backends.cuda.matmul.allow_fp16_accumulation``, off by default): then they cannot
    give float32 results (out_dtype raises) and sum in float16."""
    return bool(getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False))


def conv_tf32() -> bool:
    """Whether PyTorch lets float32 convolutions use TF32: cuDNN's convolution precision
    (``torch.backends.cudnn.conv.fp32_precision``, which reads as the setting in force, the
    legacy ``torch.backends.cudnn.allow_tf32`` included), or that legacy flag itself where the
    newer setting does not exist. (The legacy flag's getter raises once the two APIs are
    mixed.)"""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision is None:
        return bool(torch.backends.cudnn.allow_tf32)
    return precision == "tf32"


def float32_products(op, a: torch.Tensor, b: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """op(a, b) (torch.mm or torch.bmm) with its sums returned in float32 at least (into ``out``
    where given): half inputs multiply in their dtype with float32 results (``out_dtype``;
    float32 split-K sums too) on CUDA, as float32 copies elsewhere (the CPU's products, a
    PyTorch without out_dtype, or float16 products allowed to sum in float16)."""
    into = {} if out is None else {"out": out}
    if a.dtype in (torch.float16, torch.bfloat16):
        if (a.is_cuda and _OUT_DTYPE
                and not (a.dtype == torch.float16 and fp16_accumulation())):
            return op(a, b, out_dtype=torch.float32, **into)
        return op(a.float(), b.float(), **into)
    return op(a, b, **into)


# <G_b, W_e> over at most this many column slices, each at least SLICE_MIN wide.
SLICES, SLICE_MIN = 64, 2048


def _inner_products(G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """G (B, N) @ W (E, N)^T, a reduction over N columns, in float32 at least: split into
    column slices (a power of two dividing N, up to SLICES, each at least SLICE_MIN wide)
    multiplied as one batched product and summed in order, so that a long reduction over few
    outputs (B x E) still spreads over the device. Deterministic."""
    B, N = G.shape
    s = 1
    while s < SLICES and N % (2 * s) == 0 and N // (2 * s) >= SLICE_MIN:
        s *= 2
    if s == 1:
        return float32_products(torch.mm, G, W.t())
    parts = float32_products(torch.bmm, G.view(B, s, N // s).transpose(0, 1),
                             W.view(W.shape[0], s, N // s).permute(1, 2, 0))
    return parts.sum(0)


def finish_grads(grad_out: torch.Tensor, routing: torch.Tensor, bias: Optional[torch.Tensor],
                 grad_routing: Optional[torch.Tensor], need_b: bool, acc: torch.dtype,
                 scales: Scales = Scales(),
                 scale_grads: Tuple[Optional[torch.Tensor], ...] = (None, None, None)):
    """The bias's share and the gradients' final dtypes: grad_bias = routing^T gsum' (if
    ``need_b``), gsum' bias^T added to ``grad_routing`` (the kernels' <G_b, W_e> part, in
    ``acc``, or None when not wanted), gsum (routing bias) added to the kernel term of
    grad_out_scale (``scale_grads``: the kernel terms of (grad_in_scale, grad_out_scale,
    grad_tap_scale) in ``acc``, None where absent or not asked for); gsum' = out_scale * gsum.
    Returns (grad_routing in routing's dtype, grad_bias, grad_in_scale, grad_out_scale,
    grad_tap_scale), the scales' gradients in their scales' shapes and dtypes."""
    grad_bias = None
    grad_in_scale, grad_out_scale, grad_tap_scale = scale_grads
    if bias is not None and (grad_routing is not None or need_b or grad_out_scale is not None):
        gsum = grad_out.sum((2, 3), dtype=acc)
        if grad_out_scale is not None:
            grad_out_scale = grad_out_scale + gsum * (routing.to(acc) @ bias.to(acc))
        gsum = scales.scale_bias(gsum)
        if need_b:
            grad_bias = (routing.to(acc).t() @ gsum).to(bias.dtype)
        if grad_routing is not None:
            grad_routing = grad_routing + gsum @ bias.to(acc).t()
    if grad_routing is not None:
        grad_routing = grad_routing.to(routing.dtype)
    shaped = tuple(None if g is None else g.reshape(s.shape).to(s.dtype)
                   for g, s in zip((grad_in_scale, grad_out_scale, grad_tap_scale), scales))
    return (grad_routing, grad_bias) + shaped
