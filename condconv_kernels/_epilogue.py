"""The backward's epilogue for the backends written in Python (reference, triton), the same
rules as the C++ backends' ``csrc/epilogue.h``. With G_b the kernel gradient of example b and
gsum the grad_out summed over pixels (B, Cout)::

    grad_weight[e]     = sum_b routing[b, e] G_b           grad_bias = routing^T gsum
    grad_routing[b, e] = <G_b, W[e]> + <gsum[b], bias[e]>
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def fold_kernel_grads(G: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
                      need_r: bool, need_w: bool, acc: torch.dtype
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_routing in ``acc``, grad_weight in weight's dtype and shape) from G (B, |W|) in
    ``acc``; None where not wanted."""
    grad_routing = grad_weight = None
    if need_r:
        grad_routing = G @ weight.reshape(weight.shape[0], -1).to(acc).t()
    if need_w:
        grad_weight = (routing.to(acc).t() @ G).reshape(weight.shape).to(weight.dtype)
    return grad_routing, grad_weight


def finish_bias_grads(grad_out: torch.Tensor, routing: torch.Tensor,
                      bias: Optional[torch.Tensor], grad_routing: Optional[torch.Tensor],
                      need_b: bool, acc: torch.dtype):
    """The bias's share: grad_bias = routing^T gsum (if ``need_b``), and gsum bias^T added to
    ``grad_routing`` (the kernels' <G_b, W_e> part, in ``acc``, or None when not wanted), which
    is returned in routing's dtype."""
    grad_bias = None
    if bias is not None and (grad_routing is not None or need_b):
        gsum = grad_out.sum((2, 3), dtype=acc)
        if need_b:
            grad_bias = (routing.to(acc).t() @ gsum).to(bias.dtype)
        if grad_routing is not None:
            grad_routing = grad_routing + gsum @ bias.to(acc).t()
    if grad_routing is not None:
        grad_routing = grad_routing.to(routing.dtype)
    return grad_routing, grad_bias
