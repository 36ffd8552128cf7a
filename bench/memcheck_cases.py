"""Forward and backward of one backend on a dense, a pointwise, a grouped and a depthwise layer
(float32, float16, bfloat16; an odd-sized image, stride 2, "same" padding), and a pointwise one
in channels_last bfloat16 (on a Hopper GPU, the cuda backend's clustered kernel: that layer again
in each form the build has, the switch's modes 2 and 3, and with the 1x1 kernel gradient's
kernel on), small enough to run under compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python bench/memcheck_cases.py [--backend cuda]

PyTorch's caching allocator hands out pieces of large segments, inside which an out-of-bounds
access is invisible to memcheck: PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own
allocation. ``--device cpu --backend cpu`` runs the same calls on the CPU (the GPU kit's dry run).
"""
from __future__ import annotations


import torch

import condconv_kernels as cc
from condconv_kernels.cli import parser

LAYERS = [  # (cin, cout, kernel, stride, groups, dtype, channels_last)
    (8, 16, 3, 2, 1, torch.float32, False), (16, 24, 1, 1, 1, torch.float16, False),
    (8, 8, 3, 1, 2, torch.bfloat16, False), (16, 16, 5, 2, 16, torch.float32, False),
    (16, 24, 1, 1, 1, torch.bfloat16, True),
]


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--backend", default="cuda", help="The condconv2d backend to run.")
    p.add_argument("--device", default="cuda", help="Where the tensors live.")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    switch = torch.ops.condconv.cuda_pointwise_cluster
    kgrad = torch.ops.condconv.cuda_pointwise_kgrad
    runs = [(layer, 1) for layer in LAYERS] + [(LAYERS[-1], 2)]
    try:
        switch(3)
        runs.append((LAYERS[-1], 3))
    except RuntimeError as exc:  # a build without sm_90a code
        print(f"no wgmma run: {exc}")
    runs.append((LAYERS[-1], "kgrad"))
    for (cin, cout, k, s, groups, dtype, channels_last), mode in runs:
        switch(1 if mode == "kgrad" else mode)
        kgrad(1 if mode == "kgrad" else 0)
        x = torch.randn(3, cin, 11, 13, device=args.device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        r = torch.rand(3, 4, device=args.device, requires_grad=True)
        w = torch.randn(4, cout, cin // groups, k, k, device=args.device, dtype=dtype,
                        requires_grad=True)
        b = torch.randn(4, cout, device=args.device, dtype=dtype, requires_grad=True)
        y = cc.condconv2d(x, r, w, b, s, "same", 1, groups, backend=args.backend)
        grads = torch.autograd.grad(y, [x, r, w, b], torch.randn_like(y))
        assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
    switch(1)
    kgrad(0)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"memcheck cases finished: {len(LAYERS)} layers, forward and backward, "
          f"backend {args.backend}, the channels_last one again in modes "
          f"{[m for _, m in runs[len(LAYERS) - 1:]]}")


if __name__ == "__main__":
    main()
