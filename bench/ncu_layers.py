"""The program Nsight Compute profiles in the GPU kit: one forward and backward of a few CondConv
layers of tf_efficientnet_cc_b0_8e, with only that call inside the profiler's range.

    ncu --profile-from-start off --clock-control none [--section ...] \\
        python bench/ncu_layers.py [--layers s6.b1.expand,s5.b1.dw] [--batch 256]

Each layer first runs twice outside the range (compiles and autotunes its kernels), then once
between ``torch.cuda.profiler.start()`` and ``stop()``: ncu sees each kernel of the layer
(forward, grad_x, kernel gradient) exactly once, at the configuration the benchmarks use. The
question it answers is the one timings cannot: what the dense and depthwise kernels wait on
(occupancy, warp stall reasons, memory and tensor-pipe throughput). Then the forward alone of
the ``--cuda-forward`` layers through the cuda backend, the same way: on a Hopper GPU, the
clustered 1x1 kernel (``csrc/cuda/pointwise_cluster.cuh``), whose model
(``bench/cluster_model.py``) says it waits on shared memory and its CUDA-core mix. Without CUDA
(the kit's dry run) the layers run once on the CPU and nothing is profiled.
"""
from __future__ import annotations

import sys

import torch

import condconv_kernels as cc
from condconv_kernels.cli import parser
from condconv_kernels.profile import efficientnet_cc_b0_layers


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--layers", default="s6.b1.expand,s5.b1.dw",
                   help="Comma-separated layer names.")
    p.add_argument("--batch", type=int, default=256, help="The batch size.")
    p.add_argument("--backend", default="triton", help="The backend on CUDA.")
    p.add_argument("--cuda-forward", default="s6.b1.expand",
                   help="Comma-separated layers whose forward alone is profiled through the "
                        "cuda backend after the others (empty: none).")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, backend = ("cuda", args.backend) if cuda else ("cpu", "auto")
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = {layer.name: layer for layer in efficientnet_cc_b0_layers(8)}
    g = torch.Generator().manual_seed(0)
    runs = [(name, backend, True) for name in args.layers.split(",")]
    if cuda and "cuda" in cc.available_backends("cuda"):
        runs += [(name, "cuda", False) for name in args.cuda_forward.split(",") if name]
    for name, backend, backward in runs:
        if name not in layers:
            p.error(f"unknown layer {name!r}; choose from {sorted(layers)}")
        layer = layers[name]
        batch = args.batch if cuda else 2
        x = torch.randn(batch, layer.cin, layer.height, layer.width, generator=g)
        x = x.contiguous(memory_format=torch.channels_last).to(device, dtype).requires_grad_()
        routing = torch.rand(batch, layer.experts, generator=g).to(device).requires_grad_()
        weight = (torch.randn(layer.experts, layer.cout, layer.cin // layer.groups,
                              layer.kernel, layer.kernel, generator=g) * 0.05)
        weight = weight.to(device, dtype).requires_grad_()

        def step():
            out = cc.condconv2d(x, routing, weight, None, layer.stride, layer.padding,
                                groups=layer.groups, backend=backend)
            if backward:
                torch.autograd.grad(out, [x, routing, weight], torch.ones_like(out))
        for _ in range(2 if cuda else 1):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            step()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        what = "forward and backward" if backward else "forward"
        print(f"{name} ({layer.describe()}), {backend}, {what}: "
              f"{'profiled' if cuda else 'ran on the CPU'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
