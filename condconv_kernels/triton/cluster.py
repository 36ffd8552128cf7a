"""The triton backend's dense 1x1 passes through the cuda backend's Hopper kernels, where
``CONDCONV_TRITON_CLUSTER`` names the pass (``_env.TRITON_CLUSTER``; off until a GPU run has
timed those kernels against the Triton ones): the forward and grad_x through the clustered
kernels (``csrc/cuda/pointwise_cluster.cuh``, and ``pointwise_wgmma.cuh`` in the cluster switch's
mode 3), the kernel gradient (grad_weight and grad_routing) through
``csrc/cuda/pointwise_kgrad.cuh``.

A pass takes them where the cuda backend would run them rather than its tiled kernels or its
chunked kernel gradient (the conditions of ``pointwise::fits`` and ``runs_sm90``, checked here
before the call): a CUDA device of compute capability 9.x that the extension has the kernels'
sm_90 code for (``torch.ops.condconv.cuda_hopper_kernels``), that kernel's switch on
(``torch.ops.condconv.cuda_pointwise_cluster() != 0`` for the forward and grad_x,
``torch.ops.condconv.cuda_pointwise_kgrad() == 1``, ``CONDCONV_CUDA_KGRAD``, for the kernel
gradient), float16 or bfloat16 tensors, a 1x1 ungrouped layer of stride 1 without
padding or per-example scales, at most 8 experts, channel counts multiples of 8, the tensors it
reads channels_last and contiguous and 16-byte aligned.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

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
    """Whether ``device`` runs the Hopper kernels' sm_90 code: compute capability 9.x and a
    build with sm_90 code for them (the cuda backend's ``runs_sm90``; a build for an older GPU
    with PTX, "8.0+PTX", has their bodies compiled out), as the cuda backend decides it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (torch.cuda.get_device_capability(index)[0] == 9
            and torch.ops.condconv.cuda_hopper_kernels(index) == 1)


def _fits(reads: Sequence[torch.Tensor], weight: torch.Tensor, stride: Sequence[int],
          padding: Sequence[int], groups: int, scales: Sequence[Optional[torch.Tensor]]) -> bool:
    """The conditions every pass shares (the module's), for the tensors a pass ``reads``; the
    device's and the switches' aside."""
    E, cout, cin, kh, kw = weight.shape
    first = reads[0]
    B = first.shape[0]
    pixels = first.shape[2] * first.shape[3]
    return (all(t.is_cuda and t.dtype in DTYPES and t.dtype == weight.dtype
                and t.is_contiguous(memory_format=torch.channels_last) and t.data_ptr() % 16 == 0
                for t in reads)
            and kh == kw == 1 and tuple(stride) == (1, 1) and not any(padding) and groups == 1
            and all(s is None for s in scales) and E <= MAX_EXPERTS
            and cin % 8 == 0 and cout % 8 == 0 and weight.data_ptr() % 16 == 0
            and -(-B // EXAMPLES) <= MAX_BLOCKS and B * pixels < 2 ** 31)


def _on_hopper(t: torch.Tensor) -> bool:
    return _has_cuda_kernels() and _hopper(t.device)


def eligible(read: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
             padding: Sequence[int], groups: int,
             scales: Sequence[Optional[torch.Tensor]] = ()) -> bool:
    """Whether the pass that reads ``read`` (x for the forward, grad_out for grad_x) would run
    in the clustered kernels (the module's conditions)."""
    return (_fits((read,), weight, stride, padding, groups, scales) and _on_hopper(read)
            and torch.ops.condconv.cuda_pointwise_cluster() != 0)


def kgrad_eligible(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                   stride: Sequence[int], padding: Sequence[int], groups: int,
                   scales: Sequence[Optional[torch.Tensor]] = ()) -> bool:
    """Whether the kernel gradient of a call, which reads ``x`` and ``grad_out``, would run in
    the kernel-gradient kernel (the module's conditions)."""
    return (_fits((x, grad_out), weight, stride, padding, groups, scales) and _on_hopper(x)
            and torch.ops.condconv.cuda_pointwise_kgrad() == 1)


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


def kernel_grads(grad_out: torch.Tensor, x: torch.Tensor, routing: torch.Tensor,
                 weight: torch.Tensor, need_r: bool, need_w: bool
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The kernel gradient of an eligible 1x1 layer through the cuda backend: (grad_routing
    (B, E) float32, grad_weight in weight's shape and dtype), None where not wanted; the bias's
    share of grad_routing is the caller's."""
    grads = torch.ops.condconv.native_backward(
        grad_out, x, routing.float(), weight, None, [1, 1], [0] * 4, [1, 1], 1,
        [False, need_r, need_w, False], None, None, None)
    return grads[1] if need_r else None, grads[2] if need_w else None
