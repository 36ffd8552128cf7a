"""The 1x1 passes of tf_efficientnet_cc_b0_8e's CondConv layers: the dense Triton kernels
against the static convolution and four experimental alternatives, the experts-stationary kernel
(condconv_kernels/triton/stationary.py), batched cuBLAS products
(condconv_kernels/triton/batched.py), for the forward and grad_x of planes of at most 256
pixels the experts-stationary kernel with the mix on the tensor cores
(condconv_kernels/triton/stationary_mix.py) and, for the kernel gradients, the kernel with its
tiles in the tensor cores' accumulator layout (condconv_kernels/triton/pointwise_grad.py), for
the forward, grad_x (the kernel transposed) and the kernel gradients; and the cuda backend's
clustered Hopper kernels (csrc/cuda/pointwise_cluster.cuh, pointwise_wgmma.cuh) for the forward
and grad_x.

    python bench/bench_pointwise.py [--device cuda] [--batch 256] [--dtype bfloat16]
                                    [--layers s5.b0.expand,...] [--chunk-mb 8,128]
                                    [--acc-warps 4]
                                    [--out FILE.md]
                                    [--modeled bench/results/gpu-model-stationary.json,...]

Device microseconds per call (torch.profiler: the kernels' own time, no host overhead), x and
grad_out in channels_last, per layer and pass; the forward without a bias, as the model's
layers have none, and again with one (``forward+bias``: static, dense and mix). Each call
reuses the same inputs, which L2 may keep on the 7x7 layers: times a little below the layer
table's (which rotates input sets), the ratios between columns comparable.

- ``static``: the static convolution with one expert's kernel (cuDNN / cuBLAS): F.conv2d, its
  input gradient, or (for the kernel gradients) its weight gradient; the cost to match;
- ``dense``: the triton backend as it ships (the autotuned dense forward, grad_x kernel, or
  kernel gradient for routing and weight, as training asks);
- ``stationary``: the same call with ``CONDCONV_TRITON_STATIONARY``'s experts-stationary passes
  on (``forward``, ``grad_x``, ``routing``: for the kernel gradients its routing-gradient form,
  then the dense kernel for the weight alone);
- ``batched``: the triton backend's call with that pass batched (``CONDCONV_TRITON_BATCHED``):
  the forward and grad_x from chunks of mixed kernels ``routing @ W`` written to memory, each
  chunk one batched product (the unfused form through cuBLAS, what a fused forward has to beat
  on these layers); the kernel gradients from chunks of per-example G, folded by two more
  products;
- ``mix`` (the forward and grad_x of planes of at most 256 pixels): the same call with the
  switch's ``mix`` pass alone, the experts stationary and their mix on the tensor cores;
- ``acc layout`` (the kernel gradients only): the same call with the switch's
  ``kernel_grad`` pass alone, both halves from the kernel in the accumulator's layout;
- ``cluster`` (the forward and grad_x): the same call through the cuda backend, on a Hopper
  GPU its clustered kernel (blocks of 4 examples, clusters of 4 blocks sharing the experts'
  tiles by multicast copies), ``-`` where the profile does not show that kernel;
- ``cuda kgrad`` (the kernel gradients): the cuda backend's, its 1x1 kernel gradient kernel
  switched on (``torch.ops.condconv.cuda_pointwise_kgrad(1)``; csrc/cuda/pointwise_kgrad.cuh:
  each example's G on the tensor cores, folded in registers), ``-`` where the profile does not
  show that kernel;
- ``wgmma`` (the forward and grad_x): the same in the switch's mode 3
  (``torch.ops.condconv.cuda_pointwise_cluster(3)``): the kernel whose mix is made in
  registers for wgmma, blocks of 128 rows; ``-`` where the build has no sm_90a code or the
  profile does not show that kernel;
- ``acc layout, N warps`` (``--acc-warps``): that kernel at its plan for N warps a program
  instead of ``pointwise_grad.WARPS``'s 8 (4: tiles of 64 x 16, three programs an SM);
- ``batched, N MB chunks`` (``--chunk-mb``): the batched pass with chunks of N MB instead of
  ``CHUNK_BYTES``'s 32 (whether its mixed kernels and G are read back from L2);
- ``/ dense``: each alternative's time over dense's;
- ``max diff``: each alternative's largest difference from dense over the result, against its
  scale (stationary, batched, mix, acc layout, cluster, wgmma, cuda kgrad; mix rounds the routing weights to the dtype
  before its tensor-core mix: a little above the others' rounding);
- ``vs float64`` (the kernel gradients only): dense's and each alternative's largest
  difference from grad_routing summed in float64 on the device, against its scale: which one a
  ``max diff`` past rounding comes from;
- with ``--modeled``: the stationary and mix passes' times by the static report's model (the
  JSONs of ``--stationary forward,grad_x,routing`` and ``--stationary mix``), and measured /
  modeled.

A pass the stationary kernel does not take (its slab does not fit in shared memory: the forward
of the project layers, grad_x of the expand ones) prints ``-`` in its columns; its routing
gradient fits on 15 of the 16 layers (the slab W on the expand layers, W^T on the project ones;
not s7.b0.project, 1152 -> 320, whose smaller side is still 320). On the CPU (the GPU kit's dry
run) the ``--backend`` stands in for the dense kernels, the stationary columns are ``-`` and the
batched ones run on the CPU.
"""
from __future__ import annotations

import json
import sys
from unittest import mock

import torch
import torch.nn.functional as F

from condconv_kernels import _env
from condconv_kernels.cli import parser
from gpu_profile import (add_device_arguments, device_kernels, layer_inputs, pick_layers,
                         print_table)

# Expand layers (the forward fits: K = 80, 192) and project layers (grad_x fits: K = their Cout,
# 112 and 192); the routing gradient fits on all four.
DEFAULT_LAYERS = "s5.b0.expand,s6.b1.expand,s5.b1.project,s6.b1.project"


def _modeled_us(paths: str) -> dict:
    """(layer, pass, column) -> the modeled microseconds of the pass with the switch on, from
    the static report's JSONs (comma-separated; ``--stationary forward,grad_x,routing``:
    column ``stationary``, the forward and grad_x kernels, and the routing-gradient kernel plus
    the dense kernel gradient for the weight ("grad_routing+weight"); ``--stationary mix``:
    column ``mix``, its forward and grad_x kernels)."""
    records = []
    for path in paths.split(","):
        with open(path) as f:
            records += json.load(f)
    passes = {"stationary_fwd": ("forward", "stationary"),
              "stationary_bwd_x": ("grad_x", "stationary"),
              "stationary_routing": ("grad_routing+weight", "stationary"),
              "dense_bwd_w": ("grad_routing+weight", "stationary"),
              "mix_fwd": ("forward", "mix"), "mix_bwd_x": ("grad_x", "mix")}
    out: dict = {}
    routed = {r["layer"] for r in records if r["kernel"] == "stationary_routing"}
    for r in records:
        name = passes.get(r["kernel"])
        if name is None or "error" in r or (r["kernel"] == "dense_bwd_w"
                                            and r["layer"] not in routed):
            continue
        key = (r["layer"], *name)
        out[key] = out.get(key, 0.0) + r["modeled_us"]
    return out


def _routing_truth(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor):
    """grad_routing of a 1x1 layer in float64: (B, E), the sum over (o, c) of
    W_e[o, c] (g_b x_b^T)[o, c]."""
    B = x.shape[0]
    g = grad_out.double().reshape(B, grad_out.shape[1], -1)
    G = torch.bmm(g, x.double().reshape(B, x.shape[1], -1).transpose(1, 2))
    return torch.einsum("boc,eoc->be", G, weight.double()[..., 0, 0])


def _off(result: torch.Tensor, truth: torch.Tensor) -> str:
    return f"{((result.double() - truth).abs().max() / truth.abs().max()).item():.1e}"


# The kernel each cuda-backend column stands for: a cell only where the profile shows it.
# The alternatives to the dense kernels, in the table's order.
ALTERNATIVES = ("stationary", "batched", "mix", "acc layout", "cluster", "wgmma", "cuda kgrad")
CLUSTER_KERNELS = {"cluster": "pointwise_cluster_kernel", "wgmma": "pointwise_wgmma_kernel",
                   "cuda kgrad": "pointwise_kgrad_kernel"}


def _has_wgmma() -> bool:
    """Whether the loaded extension takes the clustered switch's mode 3 (a build for sm_90a)."""
    switch = torch.ops.condconv.cuda_pointwise_cluster
    before = switch()
    try:
        switch(3)
    except RuntimeError as exc:
        print(f"no wgmma column: {exc}", file=sys.stderr)
        return False
    switch(before)
    return True


def _in_kgrad(fn):
    """fn with the cuda backend's 1x1 kernel gradient kernel switched on for its call."""
    def run():
        switch = torch.ops.condconv.cuda_pointwise_kgrad
        switch(1)
        try:
            return fn()
        finally:
            switch(0)
    return run


def _in_cluster_mode(mode: int):
    """A wrapper of calls that runs each with the clustered switch in ``mode``, then restores it."""
    def wrap(fn):
        def run():
            switch = torch.ops.condconv.cuda_pointwise_cluster
            before = switch()
            switch(mode)
            try:
                return fn()
            finally:
                switch(before)
        return run
    return wrap


def _diff(ours: torch.Tensor, dense: torch.Tensor) -> float:
    return ((ours.float() - dense.float()).abs().max() / dense.float().abs().max()).item()


def main(argv=None):
    import condconv_kernels as cc
    p = parser(__doc__)
    add_device_arguments(p, "The backend of the dense column (triton on the GPU).")
    p.add_argument("--layers", default=DEFAULT_LAYERS,
                   help="Comma-separated 1x1 layer names.")
    p.add_argument("--chunk-mb", default="",
                   help="Comma-separated further chunk sizes (MB) for the batched passes: a "
                        "column of times each, beside the default's (CHUNK_BYTES).")
    p.add_argument("--acc-warps", default="",
                   help="Comma-separated further warps a program (4 or 8) for the kernel "
                        "gradient in the accumulator's layout: a column of times each.")
    p.add_argument("--skip", default="",
                   help="Comma-separated alternatives left out, their cells '-' (the GPU kit "
                        "leaves out the cuda columns whose kernel crashed or hung in "
                        "bench/hopper_probe.py).")
    p.add_argument("--out", help="Write the table (markdown) and the numbers (JSON beside it).")
    p.add_argument("--modeled", help="Comma-separated JSONs of `condconv_kernels.triton.report "
                                     "--stationary forward,grad_x,routing` (and `--stationary "
                                     "mix`) for the same batch and dtype: adds the stationary "
                                     "(and mix) kernels' modeled time per pass and the "
                                     "measured / modeled ratios.")
    args = p.parse_args(argv)
    modeled = _modeled_us(args.modeled) if args.modeled else {}
    try:
        chunk_mb = [int(v) for v in args.chunk_mb.split(",") if v.strip()]
    except ValueError:
        p.error(f"argument --chunk-mb: comma-separated integers, got {args.chunk_mb!r}")
    from condconv_kernels.triton import pointwise_grad
    acc_warps = [v.strip() for v in args.acc_warps.split(",") if v.strip()]
    if any(v not in {str(w) for w in pointwise_grad.WARP_CHOICES} for v in acc_warps):
        p.error(f"argument --acc-warps: comma-separated values of "
                f"{pointwise_grad.WARP_CHOICES}, got {args.acc_warps!r}")
    acc_warps = [int(v) for v in acc_warps]
    skip = {v.strip() for v in args.skip.split(",") if v.strip()}
    if skip - set(ALTERNATIVES):
        p.error(f"argument --skip: comma-separated names of {', '.join(ALTERNATIVES)}, got "
                f"{args.skip!r}")
    dtype = getattr(torch, args.dtype)
    chosen = pick_layers(p, args.layers, kernel=1)
    import condconv_kernels.triton as triton_backend
    from condconv_kernels.triton import batched as batched_path
    from condconv_kernels.triton import stationary as kernel
    from condconv_kernels.triton import stationary_mix
    rows, record = [], []
    columns = (["layer", "shape", "pass", "static", "dense", *ALTERNATIVES]
               + [f"batched, {mb} MB chunks" for mb in chunk_mb]
               + [f"acc layout, {w} warps" for w in acc_warps]
               + ["stationary / dense", "batched / dense", "mix / dense", "acc layout / dense",
                  "cluster / dense", "wgmma / dense", "cuda kgrad / dense",
                  "max diff: stationary", "batched", "mix", "acc layout", "cluster", "wgmma",
                  "cuda kgrad", "vs float64: dense", "stationary", "batched", "mix",
                  "acc layout", "cluster", "wgmma", "cuda kgrad"]
               + (["modeled: stationary", "mix", "measured / modeled: stationary", "mix"]
                  if args.modeled else []))

    def table(echo=True):  # the rows so far (written after each layer: a time limit keeps them)
        print_table(f"1x1 passes, batch {args.batch}, {args.dtype}, channels_last, "
                    f"{args.device}: device us per call", columns, rows, record, args.out,
                    "bench_pointwise.py", argv, echo=echo)
    cluster_runs = args.device.startswith("cuda") and "cuda" in cc.available_backends(args.device)
    wgmma_runs = cluster_runs and "wgmma" not in skip and _has_wgmma()
    g = torch.Generator().manual_seed(0)
    for layer in chosen:
        x, routing, weight, bias = layer_inputs(layer, args.batch, args.device, dtype, g)
        grad_out = torch.randn(args.batch, layer.cout, layer.height, layer.width, generator=g)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last).to(args.device, dtype)

        def switched(fn, name, value):  # the same call with a switch of _env on
            def run():
                with mock.patch.object(_env, name, value):
                    return fn()
            return run

        def stationary(fn):
            return switched(fn, "TRITON_STATIONARY", kernel.PASSES)

        def mix(fn):
            return switched(fn, "TRITON_STATIONARY", frozenset({"mix"}))

        def backward(mask, index):
            return lambda: torch.ops.condconv.condconv2d_backward(
                grad_out, x, routing, weight, None, [1, 1], [0] * 4, [1, 1], 1, args.backend,
                mask, None, None, None)[index]

        def forward_of(b):  # EfficientNet's CondConv layers have no bias: the forward row
            return lambda: cc.condconv2d(x, routing, weight, b, backend=args.backend)  # has none
        forward = forward_of(None)

        def on_cuda(b):  # the cuda backend's forward (its clustered kernel on a Hopper GPU)
            return lambda: cc.condconv2d(x, routing, weight, b, backend="cuda")
        cuda_grad_x = lambda: torch.ops.condconv.condconv2d_backward(  # noqa: E731
            grad_out, x, routing, weight, None, [1, 1], [0] * 4, [1, 1], 1, "cuda",
            [True, False, False, False], None, None, None)[0]
        in_wgmma = _in_cluster_mode(3)
        cuda_kgrad = lambda: torch.ops.condconv.condconv2d_backward(  # noqa: E731
            grad_out, x, routing, weight, None, [1, 1], [0] * 4, [1, 1], 1, "cuda",
            [False, True, True, False], None, None, None)[1]
        kgrad = backward([False, True, True, False], 1)
        geometry = ((1, 1), (0,) * 4, (1, 1), 1)

        def batched(fn, name):  # the triton backend's own call with the pass batched (also on
            return switched(fn, "TRITON_BATCHED", frozenset({name}))  # the CPU: no Triton there)
        batched_forward = batched(
            lambda: triton_backend.forward(x, routing, weight, None, *geometry), "forward")
        batched_grad_x = batched(lambda: triton_backend.backward(
            grad_out, x, routing, weight, None, *geometry, [True, False, False, False])[0],
            "grad_x")
        batched_kgrad = batched(lambda: triton_backend.backward(
            grad_out, x, routing, weight, None, *geometry, [False, True, True, False])[1],
            "kernel_grad")
        # pass: (static, dense, {alternative: (its call, whether it applies)}), every pass with the
        # same alternatives (the table's columns)
        none = (None, None)
        passes = {
            "forward": (lambda: F.conv2d(x, weight[0]), forward, {
                "stationary": (stationary(forward),
                               kernel.eligible(x, layer.experts, layer.cout, 1, True, False)),
                "batched": (batched_forward,
                            batched_path.eligible(x, weight, *geometry[:2], 1)),
                "mix": (mix(forward), stationary_mix.eligible(x, layer.experts, layer.cout, 1,
                                                              True, False)),
                "acc layout": none, "cluster": (on_cuda(None), cluster_runs),
                "wgmma": (in_wgmma(on_cuda(None)), wgmma_runs), "cuda kgrad": none}),
            # With a bias: the third GPU run's mix forward (with one) was 1.45x dense's where
            # its grad_x (never one) was 0.79x; this row says whether the bias is the cause.
            "forward+bias": (lambda: F.conv2d(x, weight[0], bias[0]), forward_of(bias), {
                "stationary": none, "batched": none,
                "mix": (mix(forward_of(bias)), stationary_mix.eligible(
                    x, layer.experts, layer.cout, 1, True, False)),
                "acc layout": none, "cluster": (on_cuda(bias), cluster_runs),
                "wgmma": (in_wgmma(on_cuda(bias)), wgmma_runs), "cuda kgrad": none}),
            "grad_x": (lambda: torch.nn.grad.conv2d_input(x.shape, weight[0], grad_out),
                       backward([True, False, False, False], 0), {
                "stationary": (stationary(backward([True, False, False, False], 0)),
                               kernel.eligible(grad_out, layer.experts, layer.cin, 1, True,
                                               False, transposed=True)),
                "batched": (batched_grad_x,
                            batched_path.eligible(grad_out, weight, *geometry[:2], 1)),
                "mix": (mix(backward([True, False, False, False], 0)),
                        stationary_mix.eligible(grad_out, layer.experts, layer.cin, 1, True,
                                                False, transposed=True)),
                "acc layout": none, "cluster": (cuda_grad_x, cluster_runs),
                "wgmma": (in_wgmma(cuda_grad_x), wgmma_runs), "cuda kgrad": none}),
            # The kernel gradients as training asks for them (routing and weight): the dense
            # kernel for both, against each switch on (the stationary routing-gradient form,
            # then the dense kernel for the weight alone; the batched products for both; the
            # kernel in the accumulator's layout for both); the static layer's weight gradient
            # for scale. The max diff compares grad_routing.
            "grad_routing+weight": (
                lambda: torch.nn.grad.conv2d_weight(x, weight[0].shape, grad_out), kgrad, {
                    "stationary": (
                        stationary(kgrad),
                        kernel.eligible(x, layer.experts, layer.cout, 1, True, False,
                                        routing=True, dual=grad_out)
                        or kernel.eligible(grad_out, layer.experts, layer.cin, 1, True, False,
                                           transposed=True, routing=True, dual=x)),
                    "batched": (batched_kgrad, batched_path.eligible(
                        x, weight, *geometry[:2], 1, also=grad_out)),
                    "mix": none,
                    "acc layout": (switched(kgrad, "TRITON_STATIONARY",
                                            frozenset({"kernel_grad"})),
                                   pointwise_grad.eligible(x, grad_out, weight, *geometry)),
                    "cluster": none, "wgmma": none,
                    "cuda kgrad": (_in_kgrad(cuda_kgrad), cluster_runs)}),
        }
        truth = _routing_truth(x, grad_out, weight)
        for name, (static, dense_fn, alternatives) in passes.items():
            times = {"static": device_kernels(static, args.device)[0]}
            dense = dense_fn()  # compiles and tunes outside the profile
            times["dense"] = device_kernels(dense_fn, args.device)[0]
            cells = [layer.name, layer.describe(), name, f"{times['static']:.1f}",
                     f"{times['dense']:.1f}"]
            results, diffs = {}, {}
            for alt, (fn, applies) in alternatives.items():
                on_device = (alt in ("batched", "cluster", "wgmma", "cuda kgrad")
                             or args.backend == "triton")
                if applies and on_device and alt not in skip:
                    try:  # an experimental path's failure is a cell, not the end of the table
                        results[alt] = fn()
                        diffs[alt] = _diff(results[alt], dense)
                        times[alt], kernels = device_kernels(fn, args.device)
                        want = CLUSTER_KERNELS.get(alt)
                        if want and not any(want in k[0] for k in kernels):
                            del times[alt]  # the tiled kernels took it: not this column's
                            print(f"{layer.name} {name}: {want} did not take it",
                                  file=sys.stderr)
                    except Exception as exc:  # noqa: BLE001
                        results.pop(alt, None)
                        diffs[alt] = float("nan")
                        print(f"{layer.name} {name} {alt}: {type(exc).__name__}: {exc}",
                              file=sys.stderr)
            sized = {}  # the batched pass at the further chunk sizes
            for mb in chunk_mb if "batched" in times else ():
                with mock.patch.object(batched_path, "CHUNK_BYTES", mb << 20):
                    sized[mb] = times[f"batched {mb} MB"] = device_kernels(
                        alternatives["batched"][0], args.device)[0]
            alts = list(alternatives)
            assert alts == list(ALTERNATIVES), alts  # the columns
            cells += [f"{times[a]:.1f}" if a in times else "-" for a in alts]
            warped = {}  # the accumulator-layout kernel gradient at further warps
            for w in acc_warps if "acc layout" in times else ():
                with mock.patch.object(pointwise_grad, "WARPS", w):
                    warped[w] = times[f"acc layout {w} warps"] = device_kernels(
                        alternatives["acc layout"][0], args.device)[0]
            cells += [f"{sized[mb]:.1f}" if mb in sized else "-" for mb in chunk_mb]
            cells += [f"{warped[w]:.1f}" if w in warped else "-" for w in acc_warps]
            cells += [f"{times[a] / times['dense']:.2f}" if a in times else "-" for a in alts]
            cells += [f"{diffs[a]:.1e}" if a in diffs else "-" for a in alts]
            if name == "grad_routing+weight":
                cells += [_off(dense, truth)] + [_off(results[a], truth) if a in results
                                                 else "-" for a in alts]
            else:
                cells += ["-"] * (1 + len(alts))
            if args.modeled:
                m = {alt: modeled.get((layer.name, name, alt)) for alt in ("stationary", "mix")}
                cells += [f"{m[alt]:.1f}" if m[alt] else "-" for alt in m]
                cells += [f"{times[alt] / m[alt]:.2f}" if m[alt] and alt in times else "-"
                          for alt in m]
            rows.append(cells)
            record.append({"layer": layer.name, "shape": cells[1], "pass": name,
                           "device_us": times, "max_diff": diffs})
        print(f"{layer.name}: done", file=sys.stderr)
        table(echo=False)
    table()


if __name__ == "__main__":
    main()
