"""The dense 1x1 kernel gradient as batched matrix products (cuBLAS), not in a Triton kernel.

Experimental: used only with ``CONDCONV_TRITON_BATCHED=1`` (``_env.py``) until a GPU run has
measured it against the dense kernel gradient (``dense.dense_bwd_w_kernel``).

Why: the dense kernel gradient folds each example's G_b = grad_out_b x_b^T into the E experts'
gradients and into grad_routing one example after another, and on an H200 that fold, not the
memory, is its cost: 313 us for the 192 -> 1152 layer at 7x7 and batch 256 (`wr` in the GPU
kit's kernel-gradient ablation), 162 us at 14x14 (80 -> 480), against ~15-20 us for the static
layer's weight gradient. Here a chunk of examples' G_b is one batched product (float32 sums,
stored in x's dtype), and the folds are two matrix products over the chunk (float32 results:
``out_dtype`` on CUDA)::

    G[b]            = grad_out[b] (Cout x P)  @  x[b]^T (P x Cin)        one bmm
    grad_weight    += routing[chunk]^T (E x Bc)  @  G (Bc x |W|)          one mm
    grad_routing[b] = G (Bc x |W|)  @  W^T (|W| x E)                       one bmm over column slices

(the rules are ``_epilogue.fold_kernel_grads``'s, the same as the depthwise kernel gradient's
and the reference's). The chunks keep G within ``CHUNK_BYTES`` however large the batch (the
memory it takes, and a chunk that may partly stay in L2 between its write and its two reads).
Every product is deterministic (fixed shapes, the chunks' sums in a fixed order).

Traffic at 192 -> 1152, 7x7, batch 256, bfloat16: G is 113 MB, written once and read twice
(340 MB, ~80 us at the H200's 4.2 TB/s if none of it stays in L2), the bmm's reads of grad_out
and x 34 MB: predicted 100-130 us against the fused kernel's 313.

Scope: 1x1, stride 1, no padding, groups = 1, float16 / bfloat16, no per-example scales, x and
grad_out each with its pixels one strided dimension (contiguous or channels_last), at most
``MAX_PIXELS`` pixels an example (one product's fp32 chain over the pixels: the tensor cores'
truncating accumulation, `gpu-h200-analysis.md`); every other call keeps the dense kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._epilogue import fold_kernel_grads

# G's bytes per chunk of examples (the last chunk may be smaller).
CHUNK_BYTES = 64 << 20
# The most pixels an example may have here: longer chains of tensor-core sums drift
# (test_gpu_kernel_gradient_over_a_long_reduction); the dense kernel sums in two levels.
MAX_PIXELS = 1 << 16
DTYPES = (torch.float16, torch.bfloat16)


def eligible(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
             stride: Sequence[int], padding: Sequence[int], groups: int,
             scales: Sequence[Optional[torch.Tensor]] = ()) -> bool:
    """Whether the kernel gradient of this call can take the batched products: see the
    module's scope."""
    E, cout, cin_g, kh, kw = weight.shape
    pixels = grad_out.shape[2] * grad_out.shape[3]
    return (kh == kw == 1 and tuple(stride) == (1, 1) and not any(padding) and groups == 1
            and x.dtype in DTYPES and all(s is None for s in scales)
            and 0 < pixels <= MAX_PIXELS
            and all(t.stride(2) == t.shape[3] * t.stride(3) for t in (x, grad_out)))


def chunk(batch: int, kernel_numel: int, itemsize: int) -> int:
    """Examples per chunk: G (chunk x |W|) within CHUNK_BYTES, the chunks of one size."""
    most = max(1, CHUNK_BYTES // (kernel_numel * itemsize))
    chunks = -(-batch // most)
    return -(-batch // chunks)


def kernel_grads(grad_out: torch.Tensor, x: torch.Tensor, routing: torch.Tensor,
                 weight: torch.Tensor, need_r: bool, need_w: bool, acc: torch.dtype
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_routing (B, E) in ``acc``, grad_weight in weight's shape and dtype) of a 1x1 layer
    (``eligible``), None where not wanted; the bias's share of grad_routing is the caller's
    (``finish_grads``)."""
    B = x.shape[0]
    N = weight[0].numel()
    X = x.flatten(2)  # (B, Cin, P): a view for contiguous and channels_last tensors
    D = grad_out.flatten(2)  # (B, Cout, P)
    step = chunk(B, N, x.element_size())
    routing_rows, grad_weight = [], None
    for b0 in range(0, B, step):
        rows = slice(b0, min(B, b0 + step))
        G = torch.bmm(D[rows], X[rows].transpose(1, 2)).view(-1, N)
        r, w = fold_kernel_grads(G, routing[rows], weight, need_r, need_w, acc,
                                 weight_dtype=acc)
        routing_rows.append(r)
        if need_w:
            grad_weight = w if grad_weight is None else grad_weight.add_(w)
    grad_routing = None
    if need_r:
        grad_routing = routing_rows[0] if len(routing_rows) == 1 else torch.cat(routing_rows)
    return grad_routing, None if grad_weight is None else grad_weight.to(weight.dtype)
