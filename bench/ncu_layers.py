"""The program Nsight Compute profiles in the GPU kit: one forward and backward of a few CondConv
layers of tf_efficientnet_cc_b0_8e, with only that call inside the profiler's range.

    ncu --profile-from-start off --clock-control none [--section ...] \\
        python bench/ncu_layers.py [--layers s6.b1.expand,s5.b1.dw] [--batch 256]

Each layer first runs twice outside the range (compiles and autotunes its kernels), then once
between ``torch.cuda.profiler.start()`` and ``stop()``: ncu sees each kernel of the layer
(forward, grad_x, kernel gradient) exactly once, at the configuration the benchmarks use. The
question it answers is the one timings cannot: what the dense and depthwise kernels wait on
(occupancy, warp stall reasons, memory and tensor-pipe throughput). Then, on the
``--cuda-forward`` layers, the cuda backend's Hopper kernels the same way, each in its own
range: the clustered 1x1 kernel's forward (``csrc/cuda/pointwise_cluster.cuh``, the cluster
switch's mode 1), the wgmma kernel's (``pointwise_wgmma.cuh``, mode 3, where the build has it)
and the 1x1 kernel gradient's kernel (``pointwise_kgrad.cuh``, its switch on), whose models
(``bench/cluster_model.py``) say they wait on shared memory and their CUDA-core work; ``--skip``
leaves out those the GPU kit's probe (``bench/hopper_probe.py``) saw crash or hang. Without CUDA
(the kit's dry run) the layers run once on the CPU and nothing is profiled.
"""
from __future__ import annotations

import contextlib
import sys

import torch

import condconv_kernels as cc
from condconv_kernels.cli import parser
from condconv_kernels.profile import efficientnet_cc_b0_layers


# The cuda backend's Hopper kernels profiled on the --cuda-forward layers (bench_pointwise's
# column names): the clustered forward, the wgmma forward, the 1x1 kernel gradient's kernel.
HOPPER = ("cluster", "wgmma", "cuda kgrad")


def _wgmma_built() -> bool:
    """Whether the extension takes the cluster switch's mode 3 (a build with sm_90a code)."""
    switch = torch.ops.condconv.cuda_pointwise_cluster
    before = switch()
    try:
        switch(3)
        return True
    except RuntimeError as exc:
        print(f"no wgmma kernel: {exc}", file=sys.stderr)
        return False
    finally:
        switch(before)


@contextlib.contextmanager
def _switched(kernel):
    """The cuda backend's switches that make ``kernel`` (of HOPPER, or None: as they are) take
    its calls, for the block."""
    if kernel is None:
        yield
        return
    switch = torch.ops.condconv.cuda_pointwise_cluster
    kgrad = torch.ops.condconv.cuda_pointwise_kgrad
    before = switch(), kgrad()
    switch(3 if kernel == "wgmma" else 1)
    kgrad(1 if kernel == "cuda kgrad" else 0)
    try:
        yield
    finally:
        switch(before[0])
        kgrad(before[1])


def kernel_grads(layer, x, routing, weight, backend: str):
    """grad_routing and grad_weight alone of ``layer`` (a LayerShape) through the op, for a
    grad_out of ones in channels_last: (grad_routing, grad_weight)."""
    grad_out = torch.ones(x.shape[0], layer.cout, *layer.out_hw, device=x.device,
                          dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    grads = torch.ops.condconv.condconv2d_backward(
        grad_out, x.detach(), routing.detach(), weight.detach(), None, [layer.stride] * 2,
        list(layer.padding), [1, 1], layer.groups, backend, [False, True, True, False], None,
        None, None)
    return grads[1], grads[2]


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--layers", default="s6.b1.expand,s5.b1.dw",
                   help="Comma-separated layer names.")
    p.add_argument("--batch", type=int, default=256, help="The batch size.")
    p.add_argument("--backend", default="triton", help="The backend on CUDA.")
    p.add_argument("--cuda-forward", default="s6.b1.expand",
                   help="Comma-separated layers whose Hopper kernels (the clustered and wgmma "
                        "forwards, the kernel gradient's kernel) are profiled through the cuda "
                        "backend after the others (empty: none).")
    p.add_argument("--skip", default="",
                   help="Comma-separated Hopper kernels left out, of " + ", ".join(HOPPER) +
                        " (the GPU kit's HOPPER_SKIP).")
    args = p.parse_args(argv)
    skip = {v.strip() for v in args.skip.split(",") if v.strip()}
    if skip - set(HOPPER):
        p.error(f"argument --skip: comma-separated names of {', '.join(HOPPER)}, got "
                f"{args.skip!r}")
    cuda = torch.cuda.is_available()
    device, backend = ("cuda", args.backend) if cuda else ("cpu", "auto")
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = {layer.name: layer for layer in efficientnet_cc_b0_layers(8)}
    g = torch.Generator().manual_seed(0)
    runs = [(name, backend, "forward and backward", None) for name in args.layers.split(",")]
    if cuda and "cuda" in cc.available_backends("cuda"):
        hopper = [h for h in HOPPER if h not in skip and (h != "wgmma" or _wgmma_built())]
        runs += [(name, "cuda", h, h) for name in args.cuda_forward.split(",") if name
                 for h in hopper]
    for name, backend, what, kernel in runs:
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
            if kernel == "cuda kgrad":  # the kernel gradients alone
                kernel_grads(layer, x, routing, weight, backend)
                return
            out = cc.condconv2d(x, routing, weight, None, layer.stride, layer.padding,
                                groups=layer.groups, backend=backend)
            if kernel is None:
                torch.autograd.grad(out, [x, routing, weight], torch.ones_like(out))
        with _switched(kernel):
            for _ in range(2 if cuda else 1):
                step()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                step()
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
        print(f"{name} ({layer.describe()}), {backend}, {what}: "
              f"{'profiled' if cuda else 'ran on the CPU'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
