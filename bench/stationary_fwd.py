"""The experimental experts-stationary 1x1 forward (condconv_kernels/triton/stationary.py)
against the dense Triton forward and the static convolution, on the 1x1 CondConv layers of
tf_efficientnet_cc_b0_8e that it takes.

    python bench/stationary_fwd.py [--device cuda] [--batch 256] [--dtype bfloat16]
                                   [--layers s5.b0.expand,...] [--out FILE.md]

Device microseconds per call (torch.profiler: the kernels' own time, no host overhead), for
x in channels_last:

- ``static``: F.conv2d with one expert's kernel (cuDNN / cuBLAS), the cost to match;
- ``dense``: the triton backend as it ships (the autotuned dense forward);
- ``stationary``: the same call with ``CONDCONV_TRITON_STATIONARY`` on;
- ``max diff``: the largest |stationary - dense| over the output, against the output's scale.

Layers the kernel does not take (the slab does not fit in shared memory) print ``-``. On the
CPU (the GPU kit's dry run) the ``--backend`` stands in for the dense forward and the
stationary column is ``-``.
"""
from __future__ import annotations

import sys
from unittest import mock

import torch
import torch.nn.functional as F

from condconv_kernels import _env
from condconv_kernels.cli import parser
from gpu_profile import (add_device_arguments, device_kernels, layer_inputs, pick_layers,
                         print_table)

# The expand layers it takes (K = 80, 112, 192) and a project layer it does not (K = 1152).
DEFAULT_LAYERS = "s5.b0.expand,s5.b1.expand,s6.b1.expand,s6.b1.project"


def main(argv=None):
    import condconv_kernels as cc
    p = parser(__doc__)
    add_device_arguments(p, "The backend of the dense column (triton on the GPU).")
    p.add_argument("--layers", default=DEFAULT_LAYERS,
                   help="Comma-separated 1x1 layer names.")
    p.add_argument("--out", help="Write the table (markdown) and the numbers (JSON beside it).")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    chosen = pick_layers(p, args.layers, kernel=1)
    from condconv_kernels.triton import stationary as kernel
    rows, record = [], []
    g = torch.Generator().manual_seed(0)
    for layer in chosen:
        name = layer.name
        x, routing, weight, bias = layer_inputs(layer, args.batch, args.device, dtype, g)

        def fused(on, backend=args.backend):
            with mock.patch.object(_env, "TRITON_STATIONARY", on):
                return cc.condconv2d(x, routing, weight, bias, backend=backend)

        def static():
            return F.conv2d(x, weight[0], bias[0])
        times = {"static": device_kernels(static, args.device)[0]}
        dense = fused(False)  # compiles and tunes outside the profile
        times["dense"] = device_kernels(lambda: fused(False), args.device)[0]
        plan = kernel.eligible(x, weight, 1, True, False, False)
        cells = [name, layer.describe(), f"{times['static']:.1f}", f"{times['dense']:.1f}"]
        if plan is not None and args.backend == "triton":
            out = fused(True)
            diff = ((out.float() - dense.float()).abs().max() / dense.float().abs().max()).item()
            times["stationary"] = device_kernels(lambda: fused(True), args.device)[0]
            cells += [f"{times['stationary']:.1f}", f"{diff:.1e}",
                      f"{times['stationary'] / times['dense']:.2f}",
                      f"{times['stationary'] / times['static']:.2f}"]
        else:
            cells += ["-"] * 4
        rows.append(cells)
        record.append({"layer": name, "shape": cells[1], "device_us": times,
                       "plan": plan})
        print(f"{name}: done", file=sys.stderr)
    print_table(f"Experts-stationary 1x1 forward, batch {args.batch}, {args.dtype}, "
                f"channels_last, {args.device}: device us per call",
                ["layer", "shape", "static", "dense", "stationary", "max diff / scale",
                 "stationary / dense", "stationary / static"], rows, record, args.out,
                "stationary_fwd.py", argv)


if __name__ == "__main__":
    main()
