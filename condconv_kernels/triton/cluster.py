"""The triton backend's dense 1x1 forward and grad_x through the cuda backend's clustered Hopper
kernels (``csrc/cuda/pointwise_cluster.cuh``, and ``pointwise_wgmma.cuh`` in the cluster switch's
mode 3), where ``CONDCONV_TRITON_CLUSTER`` names the pass (``_env.TRITON_CLUSTER``; off until a
GPU run has timed those kernels against the Triton ones).

A pass takes them where the cuda backend would run them rather than its tiled kernels (the
conditions of ``pointwise::fits`` and ``runs_sm90``, checked here before the call): a CUDA device
of compute capability 9.x, an extension with CUDA kernels and the cluster switch on
(``torch.ops.condconv.cuda_pointwise_cluster() != 0``), float16 or bfloat16 tensors, a 1x1
ungrouped layer of stride 1 without padding or per-example scales, at most 8 experts, channel
counts multiples of 8, the tensor it reads channels_last and contiguous and 16-byte aligned.
The kernel gradient stays the triton backend's.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

DTYPES = (torch.float16, torch.bfloat16)
MAX_EXPERTS = 8
EXAMPLES = 4          # a block's examples (pointwise_cluster.cuh: kExamples)
MAX_BLOCKS = 65535 - 4  # blocks of examples the grid's y holds, less a cluster


@functools.lru_cache(maxsize=None)
def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("condconv::native_forward", "CUDA")


@functools.lru_cache(maxsize=None)
def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def eligible(read: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
             padding: Sequence[int], groups: int,
             scales: Sequence[Optional[torch.Tensor]] = ()) -> bool:
    """Whether the pass that reads ``read`` (x for the forward, grad_out for grad_x) would run
    in the clustered kernels (the module's conditions)."""
    E, cout, cin, kh, kw = weight.shape
    B = read.shape[0]
    pixels = read.shape[2] * read.shape[3]
    return (read.is_cuda and read.dtype in DTYPES and weight.dtype == read.dtype
            and kh == kw == 1 and tuple(stride) == (1, 1) and not any(padding) and groups == 1
            and all(s is None for s in scales) and E <= MAX_EXPERTS
            and cin % 8 == 0 and cout % 8 == 0
            and read.is_contiguous(memory_format=torch.channels_last)
            and read.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and -(-B // EXAMPLES) <= MAX_BLOCKS and B * pixels < 2 ** 31
            and _has_cuda_kernels() and _hopper(read.device)
            and torch.ops.condconv.cuda_pointwise_cluster() != 0)


def forward(x: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The forward of an eligible 1x1 layer through the cuda backend: (B, Cout, H, W),
    channels_last."""
    return torch.ops.condconv.native_forward(x, routing, weight, bias, [1, 1], [0] * 4, [1, 1],
                                             1, None, None, None)


def grad_x(grad_out: torch.Tensor, x: torch.Tensor, routing: torch.Tensor,
           weight: torch.Tensor) -> torch.Tensor:
    """grad_x of an eligible 1x1 layer through the cuda backend: x's shape, channels_last."""
    return torch.ops.condconv.native_backward(
        grad_out, x, routing, weight, None, [1, 1], [0] * 4, [1, 1], 1,
        [True, False, False, False], None, None, None)[0]
