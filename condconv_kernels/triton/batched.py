"""Dense 1x1 CondConv as batched matrix products (cuBLAS) over chunks of examples, not in a
Triton kernel: forward, grad_x and the kernel gradient.

Experimental: used only with ``CONDCONV_TRITON_BATCHED=1`` (or the passes it names, ``_env.py``)
until a GPU run has measured it against the dense kernels (``dense.py``).

Why: on the 1x1 layers of EfficientNet-CondConv at batch 256 an H200 measured the fused dense
kernels at 2-16x the static layer: the forward 89-163 us (the static one 14-30), the kernel
gradient 133-272 us (the static weight gradient 17-40), where its per-example fold, not its
traffic, is the cost. A 1x1 convolution of one example is a matrix product, so for a chunk of
Bc examples (B x C x P: x and grad_out viewed as channels x pixels)::

    forward      M      = routing[chunk] (Bc x E)  @  W (E x |W|)       the chunk's kernels
                 out[b] = M_b (Cout x Cin)  @  x[b] (Cin x P)  (+ bias)  one bmm
    grad_x       M as above;  grad_x[b] = M_b^T  @  grad_out[b]          one bmm
    kernel grad  G[b]   = grad_out[b] (Cout x P)  @  x[b]^T (P x Cin)    one bmm
                 grad_weight += routing[chunk]^T G,  grad_routing[chunk] = G W^T

(the folds are ``_epilogue.fold_kernel_grads``, the rule the depthwise kernel gradient and the
reference use; grad_routing over column slices of |W|). The mixed kernels M and the kernel
gradients G of a chunk are written to memory, at most ``CHUNK_BYTES`` of them (32 MB: within the
L2 cache of an H100, 50 MB, so that the products reading them back find much of them there), in
one buffer a call that every chunk reuses (the same addresses chunk after chunk).
Every product is one cuBLAS call: the mixed kernels summed in float32 and rounded to x's dtype,
as the fused kernels round theirs for the tensor cores (float32 routing weights, which autocast
keeps, enter as two half parts, ``_epilogue.routing_parts``, not rounded to half); G in float32
(``out_dtype``), as the fused kernel gradient keeps it: rounded to half, the examples' G_b that
cancel in grad_weight's sum over the batch would leave errors of several times the result's own
rounding. Sums follow PyTorch's matmul settings for split-K reductions (as any nn.Linear
does); float16 with ``allow_fp16_accumulation`` keeps the dense kernels. Deterministic.

Predicted on the H200 (bench/results/gpu-h200-analysis.md, item 26): the kernel gradient
2-3x faster than the fused kernel at batch 256 on the 14x14 layers, 1.2-2x on the 7x7 ones; the
forward ~3x faster on the 14x14 layers, about even on the 7x7 ones. Host cost: two to four
launches a chunk, where the fused kernels make one a pass, which eager calls pay on the host.

Scope: 1x1, stride 1, no padding, groups = 1, float16 (without ``allow_fp16_accumulation``) /
bfloat16, no per-example scales, the tensors read (x; grad_out for grad_x and the kernel
gradient) with their pixels one strided dimension (contiguous or channels_last), and for the
kernel gradient at most ``MAX_PIXELS`` pixels an example (one product's float32 chain over the
pixels: the tensor cores' truncating accumulation, gpu-h200-analysis.md); every other call
keeps the dense kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._epilogue import float32_products, fold_kernel_grads, fp16_accumulation, routing_parts

# Bytes of mixed kernels or kernel gradients per chunk of examples (the last chunk may be
# smaller).
CHUNK_BYTES = 32 << 20
# The most pixels an example may have in the kernel gradient here: longer chains of
# tensor-core sums drift (test_gpu_kernel_gradient_over_a_long_reduction); the dense kernel
# sums in two levels.
MAX_PIXELS = 1 << 16
DTYPES = (torch.float16, torch.bfloat16)


def eligible(read: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
             padding: Sequence[int], groups: int,
             scales: Sequence[Optional[torch.Tensor]] = (),
             also: Optional[torch.Tensor] = None) -> bool:
    """Whether a pass that reads ``read`` (x for the forward, grad_out for grad_x) can take the
    batched products: see the module's scope. ``also``: the kernel gradient's second tensor
    (grad_out beside x), which must keep its pixels at one stride too, and then at most
    MAX_PIXELS of them."""
    kh, kw = weight.shape[3:]
    tensors = (read,) if also is None else (read, also)
    return (kh == kw == 1 and tuple(stride) == (1, 1) and not any(padding) and groups == 1
            and read.dtype in DTYPES and all(s is None for s in scales)
            and not (read.dtype == torch.float16 and fp16_accumulation())
            and all(t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)
            and (also is None or 0 < also.shape[2] * also.shape[3] <= MAX_PIXELS))


def chunk(batch: int, kernel_numel: int, itemsize: int) -> int:
    """Examples per chunk: a chunk's kernels (chunk x |W|) within CHUNK_BYTES, the chunks of
    one size."""
    most = max(1, CHUNK_BYTES // (kernel_numel * itemsize))
    chunks = max(1, -(-batch // most))
    return max(1, -(-batch // chunks))


def _chunks(batch: int, weight: torch.Tensor, itemsize: int):
    """The row ranges of the batch, chunk by chunk, for kernels of ``itemsize`` bytes."""
    step = chunk(batch, weight[0].numel(), itemsize)
    return [slice(b0, min(batch, b0 + step)) for b0 in range(0, batch, step)]


class _Mixer:
    """The examples' kernels sum_e routing[b, e] W[e], chunk by chunk, as (rows, Cout, Cin) in
    ``dtype``: one product of the routing weights (``routing_parts``: float32 routing as two
    half parts) and the experts (stacked to match), float32 sums rounded to ``dtype``, as the
    fused kernels round their float32 mix for the tensor cores."""

    def __init__(self, routing: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype):
        E, self.cout, self.cin = weight.shape[:3]
        self.R = routing_parts(routing, dtype)
        W = weight.reshape(E, -1).to(dtype)
        self.W = W if self.R.shape[1] == E else torch.cat([W, W])
        self.buffer = None

    def __call__(self, rows: slice) -> torch.Tensor:
        """The kernels of the examples ``rows``, in one buffer that every chunk reuses (the
        first is the largest): the same addresses, which L2 may still hold, chunk after
        chunk."""
        n = rows.stop - rows.start
        if self.buffer is None:
            self.buffer = self.W.new_empty((n, self.W.shape[1]))
        return torch.mm(self.R[rows], self.W, out=self.buffer[:n]).view(n, self.cout, self.cin)

    def bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The mixed biases (B, Cout) in the same way."""
        b = bias.to(self.W.dtype)
        return self.R @ (b if self.R.shape[1] == bias.shape[0] else torch.cat([b, b]))


def _channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) == 1


def forward(x: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out (B, Cout, H, W), allocated by the caller (x's memory format), filled chunk by chunk:
    out_b = M_b x_b + routing_b bias, computed as (pixels x Cout) = x_b^T M_b^T where out is
    channels_last (each chunk's product writes its rows of out in place)."""
    X, O = x.flatten(2), out.flatten(2)  # (B, Cin, P), (B, Cout, P): views
    mix = _Mixer(routing, weight, x.dtype)
    mixed_bias = None if bias is None else mix.bias(bias)  # (B, Cout)
    for rows in _chunks(x.shape[0], weight, x.element_size()):
        M = mix(rows)
        if _channels_last(out):
            a, b, o = X[rows].transpose(1, 2), M.transpose(1, 2), O[rows].transpose(1, 2)
            c = None if bias is None else mixed_bias[rows, None, :]
        else:
            a, b, o = M, X[rows], O[rows]
            c = None if bias is None else mixed_bias[rows, :, None]
        if c is None:
            torch.bmm(a, b, out=o)
        else:
            torch.baddbmm(c, a, b, out=o)
    return out


def grad_x(grad_out: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """grad_x into ``out`` (B, Cin, H, W), allocated by the caller: grad_x_b = M_b^T grad_out_b,
    as (pixels x Cin) = grad_out_b^T M_b where ``out`` is channels_last."""
    D, O = grad_out.flatten(2), out.flatten(2)  # (B, Cout, P), (B, Cin, P)
    mix = _Mixer(routing, weight, grad_out.dtype)
    for rows in _chunks(grad_out.shape[0], weight, grad_out.element_size()):
        M = mix(rows)
        if _channels_last(out):
            torch.bmm(D[rows].transpose(1, 2), M, out=O[rows].transpose(1, 2))
        else:
            torch.bmm(M.transpose(1, 2), D[rows], out=O[rows])
    return out


def kernel_grads(grad_out: torch.Tensor, x: torch.Tensor, routing: torch.Tensor,
                 weight: torch.Tensor, need_r: bool, need_w: bool, acc: torch.dtype
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_routing (B, E) in ``acc``, grad_weight in weight's shape and dtype), None where not
    wanted; the bias's share of grad_routing is the caller's (``finish_grads``)."""
    N = weight[0].numel()
    X, D = x.flatten(2), grad_out.flatten(2)  # (B, Cin, P), (B, Cout, P)
    w_acc = weight.to(acc)  # once, not in every chunk's fold
    chunks = _chunks(x.shape[0], weight, torch.finfo(acc).bits // 8)
    # One buffer for every chunk's G (the first chunk is the largest): the same addresses,
    # which L2 may still hold, chunk after chunk.
    buffer = torch.empty((chunks[0].stop, D.shape[1], X.shape[1]), dtype=acc, device=x.device)
    routing_rows, grad_weight = [], None
    for rows in chunks:
        G = float32_products(torch.bmm, D[rows], X[rows].transpose(1, 2),
                             out=buffer[:rows.stop - rows.start]).view(-1, N)
        r, w = fold_kernel_grads(G, routing[rows], w_acc, need_r, need_w, acc,
                                 weight_dtype=acc)
        routing_rows.append(r)
        if need_w:
            grad_weight = w if grad_weight is None else grad_weight.add_(w)
    grad_routing = None
    if need_r:
        grad_routing = routing_rows[0] if len(routing_rows) == 1 else torch.cat(routing_rows)
    return grad_routing, None if grad_weight is None else grad_weight.to(weight.dtype)
