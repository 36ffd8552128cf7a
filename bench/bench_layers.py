"""Per-layer latency of condconv2d on each available backend against the unfused baseline
(backend="reference": timm's grouped convolution) and a static F.conv2d of the same shape,
for the 24 CondConv layers of tf_efficientnet_cc_b0_8e.

    python bench/bench_layers.py [--batch 8] [--experts 8] [--device cpu] [--dtype float32]
                                 [--backward] [--out bench/results/cpu-layers.md]

Prints a markdown table: median milliseconds per variant and, per backend, the speedup over the
baseline and the ratio to the static conv, all measured in this one run; a geomean row last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import condconv_kernels as cc
from condconv_kernels.profile import efficientnet_cc_b0_layers, machine_info, time_callable

try:
    from tqdm import tqdm
except ImportError:  # progress is a nicety
    def tqdm(iterable, **_):
        return iterable


def layer_inputs(layer, batch, dtype, device, requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, layer.cin, layer.height, layer.width, generator=g)
    routing = torch.rand(batch, layer.experts, generator=g)
    weight = torch.randn(layer.experts, layer.cout, layer.cin // layer.groups, layer.kernel,
                         layer.kernel, generator=g) * 0.05
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for t in (x, routing, weight)]


def variants(layer, batch, dtype, device, backward):
    """name -> zero-argument callable running one forward (and backward)."""
    x, routing, weight = layer_inputs(layer, batch, dtype, device, backward)
    pad = layer.padding
    static_w = weight[0].detach().clone().requires_grad_(backward)

    def run(fn):
        def call():
            out = fn()
            if backward:
                out.backward(torch.ones_like(out))
            return out
        return call

    def static():
        xp = F.pad(x, (pad[2], pad[3], pad[0], pad[1])) if any(pad) else x
        return F.conv2d(xp, static_w, None, layer.stride, 0, 1, layer.groups)

    out = {"static": run(static)}
    for name in ["reference"] + [b for b in cc.available_backends(device) if b != "reference"]:
        out[name] = run(lambda name=name: cc.condconv2d(x, routing, weight, None, layer.stride,
                                                        pad, 1, layer.groups, backend=name))
    return out


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--out", help="write the table (markdown) and every number (JSON beside it)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    layers = efficientnet_cc_b0_layers(args.experts)
    rows = []
    for layer in tqdm(layers, desc="layers", file=sys.stderr):
        fns = variants(layer, args.batch, dtype, args.device, args.backward)
        times = {name: time_callable(fn, args.device, args.min_run_time).median_ms
                 for name, fn in fns.items()}
        rows.append((layer, times))

    fused = [n for n in rows[0][1] if n not in ("static", "reference")]
    mode = "forward+backward" if args.backward else "forward"
    lines = [f"tf_efficientnet_cc_b0_{args.experts}e CondConv layers, batch {args.batch}, "
             f"{args.dtype}, {mode}, median ms",
             "", "| layer | shape | static | reference | " +
             " | ".join(f"{n} | {n} speedup vs reference | {n} / static" for n in fused) + " |",
             "|" + "---|" * (4 + 3 * len(fused))]
    for layer, t in rows:
        cells = [layer.name, layer.describe(), f"{t['static']:.3f}", f"{t['reference']:.3f}"]
        for n in fused:
            cells += [f"{t[n]:.3f}", f"{t['reference'] / t[n]:.2f}x", f"{t[n] / t['static']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["geomean", "", f"{geomean([t['static'] for _, t in rows]):.3f}",
             f"{geomean([t['reference'] for _, t in rows]):.3f}"]
    for n in fused:
        cells += [f"{geomean([t[n] for _, t in rows]):.3f}",
                  f"{geomean([t['reference'] / t[n] for _, t in rows]):.2f}x",
                  f"{geomean([t[n] / t['static'] for _, t in rows]):.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
    info = machine_info()
    lines += ["", "machine: " + ", ".join(f"{k} {v}" for k, v in info.items())]
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        command = "python bench/bench_layers.py " + " ".join(argv if argv else sys.argv[1:])
        with open(args.out, "w") as f:
            f.write(f"Command: `{command}`\n\n{table}\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"machine": info, "batch": args.batch, "dtype": args.dtype, "mode": mode,
                       "layers": [{"name": l.name, "shape": l.describe(), "ms": t}
                                  for l, t in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
