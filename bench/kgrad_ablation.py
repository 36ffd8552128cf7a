"""Where the dense kernel gradient's device time goes: the backward of a few 1x1 CondConv layers
of tf_efficientnet_cc_b0_8e with one gradient asked for at a time.

    python bench/kgrad_ablation.py [--device cuda] [--batch 256] [--backend triton]
                                   [--layers s5.b0.expand,...] [--splits 2,32] [--out FILE.md]

The backward op runs with these output masks (grad_x, grad_routing, grad_weight):

- ``x``: grad_x alone (no kernel gradient): the reference point of a dense pass;
- ``w``: the experts' gradient alone (NEED_W: every expert's gradient tile in registers,
  updated once per example);
- ``r``: the routing's gradient alone (NEED_R: per example a reduction of <G_b, W_e> over the
  tile across the program's threads);
- ``wr``: both, as training asks; with ``--splits``, also with the batch cut into that many
  slices of programs (the triton backend's ``_splits``; 8 by default): more, shorter programs.

Device microseconds per call are the kernels' own times (torch.profiler), so host overhead
does not count. The question it answers: is the kernel gradient bound by its per-example
reductions (``r`` close to ``wr``, far above ``w``), by its per-example latency (all three
alike, falling with more slices) or by traffic (all alike, flat in the slices)?
"""
from __future__ import annotations

import contextlib
import sys
from unittest import mock

import torch

from condconv_kernels.cli import parser
from gpu_profile import (add_device_arguments, device_kernels, layer_inputs, pick_layers,
                         print_table)

MASKS = {"x": (True, False, False), "w": (False, False, True), "r": (False, True, False),
         "wr": (False, True, True)}


def splits(n):
    """The triton backend's batch slices for the dense kernel gradient set to ``n`` (None:
    unchanged), with replays' plans of their own."""
    if n is None:
        return contextlib.nullcontext()
    import condconv_kernels.triton as backend
    from condconv_kernels.triton import _replay
    stack = contextlib.ExitStack()  # (the replays' plans kept apart: the slices are not in the
    # calls' signature)
    stack.enter_context(mock.patch.object(backend, "_splits", lambda B, pixels: max(1, min(B, n))))
    stack.enter_context(mock.patch.dict(_replay.PLANS, clear=True))
    return stack


def main(argv=None):
    p = parser(__doc__)
    add_device_arguments(p, "The backend whose backward is timed.")
    p.add_argument("--layers", default="s5.b0.expand,s6.b1.expand,s7.b0.project",
                   help="Comma-separated layer names (dense ones).")
    p.add_argument("--splits", default="2,32",
                   help="Comma-separated batch slice counts to try for 'wr' (triton only).")
    p.add_argument("--out", help="Write the table (markdown) and the numbers (JSON beside it).")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    chosen = pick_layers(p, args.layers)
    slice_counts = [int(s) for s in args.splits.split(",") if s] if args.backend == "triton" else []
    variants = list(MASKS) + [f"wr, {n} slices" for n in slice_counts]
    rows, record = [], []
    g = torch.Generator().manual_seed(0)
    for layer in chosen:
        name = layer.name
        x, routing, weight, _ = layer_inputs(layer, args.batch, args.device, dtype, g)
        stride, pad = [layer.stride] * 2, list(layer.padding)
        ho = (layer.height + pad[0] + pad[1] - layer.kernel) // layer.stride + 1
        wo = (layer.width + pad[2] + pad[3] - layer.kernel) // layer.stride + 1
        grad_out = torch.randn(args.batch, layer.cout, ho, wo, generator=g)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last).to(args.device, dtype)
        cells = [name, layer.describe()]
        times = {}
        for variant in variants:
            mask = list(MASKS[variant.split(",")[0]]) + [False]
            n = int(variant.split(", ")[1].split()[0]) if "slices" in variant else None

            def call(mask=mask):
                torch.ops.condconv.condconv2d_backward(
                    grad_out, x, routing, weight, None, stride, pad, [1, 1], layer.groups,
                    args.backend, mask, None, None, None)
            with splits(n):
                call()  # compile and tune outside the profile
                times[variant] = device_kernels(call, args.device)[0]
            cells.append(f"{times[variant]:.1f}")
        rows.append(cells)
        record.append({"layer": name, "shape": cells[1], "device_us": times})
        print(f"{name}: done", file=sys.stderr)
        last = layer is chosen[-1]  # the table so far is written after each layer
        print_table(f"Dense backward by gradient asked for, batch {args.batch}, {args.dtype}, "
                    f"channels_last, backend {args.backend}, {args.device}: device us per call",
                    ["layer", "shape"] + list(variants), rows, record, args.out,
                    "kgrad_ablation.py", argv, echo=last)


if __name__ == "__main__":
    main()
