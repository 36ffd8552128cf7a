"""The experimental experts-stationary 1x1 kernel (condconv_kernels/triton/stationary.py)
against the dense Triton kernels and the static convolution, on the 1x1 CondConv layers of
tf_efficientnet_cc_b0_8e: the forward, grad_x (the kernel transposed) and the kernel gradients
(its routing-gradient form, beside the dense kernel for the weight's).

    python bench/bench_stationary.py [--device cuda] [--batch 256] [--dtype bfloat16]
                                     [--layers s5.b0.expand,...] [--out FILE.md]
                                     [--modeled bench/results/gpu-model-stationary.json]

Device microseconds per call (torch.profiler: the kernels' own time, no host overhead), x and
grad_out in channels_last, per layer and pass:

- ``static``: the static convolution with one expert's kernel (cuDNN / cuBLAS): F.conv2d, its
  input gradient, or (for grad_routing) its weight gradient; the cost to match;
- ``dense``: the triton backend as it ships (the autotuned dense forward, grad_x kernel, or
  kernel gradient for routing and weight, as training asks);
- ``stationary``: the same call with ``CONDCONV_TRITON_STATIONARY`` on;
- ``max diff``: the largest |stationary - dense| over the result, against its scale;
- ``dense vs float64`` and ``stationary vs float64`` (the routing gradient only): each one's
  largest difference from grad_routing summed in float64 on the device, against its scale:
  which of the two a ``max diff`` past rounding comes from;
- with ``--modeled``: the stationary pass's time by the static report's model, and measured /
  modeled.

A pass the kernel does not take (its slab does not fit in shared memory: the forward of the
project layers, grad_x of the expand ones) prints ``-``; the routing gradient fits on 15 of the
16 layers (the slab W on the expand layers, W^T on the project ones; not s7.b0.project, 1152 ->
320, whose smaller side is still 320). On the CPU (the GPU kit's dry run) the
``--backend`` stands in for the dense kernels and the stationary column is ``-``.
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


def _modeled_us(path: str) -> dict:
    """(layer, pass) -> the modeled microseconds of the pass with the switch on, from the static
    report's JSON (``--stationary``): the forward and grad_x kernels, and the routing-gradient
    kernel plus the dense kernel gradient for the weight ("grad_routing+weight")."""
    with open(path) as f:
        records = json.load(f)
    passes = {"stationary_fwd": "forward", "stationary_bwd_x": "grad_x",
              "stationary_routing": "grad_routing+weight", "dense_bwd_w": "grad_routing+weight"}
    out: dict = {}
    routed = {r["layer"] for r in records if r["kernel"] == "stationary_routing"}
    for r in records:
        name = passes.get(r["kernel"])
        if name is None or "error" in r or (r["kernel"] == "dense_bwd_w"
                                            and r["layer"] not in routed):
            continue
        out[(r["layer"], name)] = out.get((r["layer"], name), 0.0) + r["modeled_us"]
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


def main(argv=None):
    import condconv_kernels as cc
    p = parser(__doc__)
    add_device_arguments(p, "The backend of the dense column (triton on the GPU).")
    p.add_argument("--layers", default=DEFAULT_LAYERS,
                   help="Comma-separated 1x1 layer names.")
    p.add_argument("--out", help="Write the table (markdown) and the numbers (JSON beside it).")
    p.add_argument("--modeled", help="A JSON of `condconv_kernels.triton.report --stationary` for "
                                     "the same batch and dtype: adds the stationary kernel's "
                                     "modeled time per pass and the measured / modeled ratio.")
    args = p.parse_args(argv)
    modeled = _modeled_us(args.modeled) if args.modeled else {}
    dtype = getattr(torch, args.dtype)
    chosen = pick_layers(p, args.layers, kernel=1)
    from condconv_kernels.triton import stationary as kernel
    rows, record = [], []
    g = torch.Generator().manual_seed(0)
    for layer in chosen:
        x, routing, weight, bias = layer_inputs(layer, args.batch, args.device, dtype, g)
        grad_out = torch.randn(args.batch, layer.cout, layer.height, layer.width, generator=g)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last).to(args.device, dtype)
        def switched(fn):  # the same call with the switch on
            def run():
                with mock.patch.object(_env, "TRITON_STATIONARY", _env.STATIONARY_PASSES):
                    return fn()
            return run

        def backward(mask, index):
            return lambda: torch.ops.condconv.condconv2d_backward(
                grad_out, x, routing, weight, None, [1, 1], [0] * 4, [1, 1], 1, args.backend,
                mask, None, None, None)[index]
        forward = lambda: cc.condconv2d(x, routing, weight, bias, backend=args.backend)  # noqa
        # pass: (static, dense, stationary, whether the kernel takes it)
        passes = {
            "forward": (lambda: F.conv2d(x, weight[0], bias[0]), forward, switched(forward),
                        kernel.eligible(x, layer.experts, layer.cout, 1, True, False)),
            "grad_x": (lambda: torch.nn.grad.conv2d_input(x.shape, weight[0], grad_out),
                       backward([True, False, False, False], 0),
                       switched(backward([True, False, False, False], 0)),
                       kernel.eligible(grad_out, layer.experts, layer.cin, 1, True, False,
                                       transposed=True)),
            # The kernel gradients as training asks for them (routing and weight): the dense
            # kernel for both, against the switch on (the routing-gradient form, then the dense
            # kernel for the weight alone); the static layer's weight gradient for scale. The
            # max diff compares grad_routing.
            "grad_routing+weight": (
                lambda: torch.nn.grad.conv2d_weight(x, weight[0].shape, grad_out),
                backward([False, True, True, False], 1),
                switched(backward([False, True, True, False], 1)),
                kernel.eligible(x, layer.experts, layer.cout, 1, True, False, routing=True,
                                dual=grad_out)
                or kernel.eligible(grad_out, layer.experts, layer.cin, 1, True, False,
                                   transposed=True, routing=True, dual=x)),
        }
        for name, (static, dense_fn, ours_fn, plan) in passes.items():
            times = {"static": device_kernels(static, args.device)[0]}
            dense = dense_fn()  # compiles and tunes outside the profile
            times["dense"] = device_kernels(dense_fn, args.device)[0]
            cells = [layer.name, layer.describe(), name, f"{times['static']:.1f}",
                     f"{times['dense']:.1f}"]
            ours = None
            if plan is not None and args.backend == "triton":
                ours = ours_fn()
                diff = ((ours.float() - dense.float()).abs().max()
                        / dense.float().abs().max()).item()
                times["stationary"] = device_kernels(ours_fn, args.device)[0]
                cells += [f"{times['stationary']:.1f}", f"{diff:.1e}",
                          f"{times['stationary'] / times['dense']:.2f}",
                          f"{times['stationary'] / times['static']:.2f}"]
            else:
                cells += ["-"] * 4
            if name == "grad_routing+weight":
                truth = _routing_truth(x, grad_out, weight)
                cells += [_off(dense, truth), _off(ours, truth) if ours is not None else "-"]
            else:
                cells += ["-", "-"]
            if args.modeled:
                m = modeled.get((layer.name, name))
                cells += [f"{m:.1f}" if m else "-",
                          f"{times['stationary'] / m:.2f}" if m and "stationary" in times
                          else "-"]
            rows.append(cells)
            record.append({"layer": layer.name, "shape": cells[1], "pass": name,
                           "device_us": times, "plan": plan})
        print(f"{layer.name}: done", file=sys.stderr)
    print_table(f"Experts-stationary 1x1 kernel, batch {args.batch}, {args.dtype}, "
                f"channels_last, {args.device}: device us per call",
                ["layer", "shape", "pass", "static", "dense", "stationary", "max diff / scale",
                 "stationary / dense", "stationary / static", "dense vs float64",
                 "stationary vs float64"]
                + (["modeled", "stationary / modeled"] if args.modeled else []),
                rows, record, args.out,
                "bench_stationary.py", argv)


if __name__ == "__main__":
    main()
