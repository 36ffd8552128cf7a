"""Per-layer latency of condconv2d on each available backend against the unfused baseline
(backend="reference": timm's grouped convolution) and a static F.conv2d of the same shape, for
the 24 CondConv layers of tf_efficientnet_cc_b0_8e at their real shapes.

    python bench/bench_layers.py [--batch 8] [--experts 8] [--device cpu] [--dtype float32]
                                 [--backward] [--channels-last] [--roofline] [--first N]
                                 [--modeled REPORT.json] [--cuda-graph]
                                 [--out bench/results/NAME.md]

Prints a markdown table: median milliseconds per variant and, per fused backend, the speedup
over the baseline and the ratio to the static conv, all measured in this one run; geomean last.
With --roofline, the device's ceilings (a large matrix product, a large copy) are measured in the
same run, and each fused backend also gets its achieved TFLOP/s and GB/s and the fraction of
the roofline floor, max(operations / rate, bytes / bandwidth), that its time reaches. Where
the triton backend autotunes (a GPU), the last column names the configuration each of its
kernels launched for the layer (the tiles in the order of their table, warps, stages). With
--cuda-graph (CUDA) each variant is timed as replays of a CUDA graph of one turn of its input
sets, per call: the device's time alone, where the plain timing of a small layer is the host's.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import torch

from condconv_kernels.cli import parser
from condconv_kernels.profile.timing import graphed_variants, reexec_with_stable_malloc
from condconv_kernels.profile import efficientnet_cc_b0_layers, machine_info, time_callable
from condconv_kernels.profile.latency import layer_variants
from condconv_kernels.profile.layers import resnet_condconv_layers
from condconv_kernels.profile.roofline import measure_ceilings
from condconv_kernels.profile.tables import geomean, machine_line, row, write_result

try:
    from tqdm import tqdm
except ImportError:  # progress is a nicety
    def tqdm(iterable, **_):
        return iterable


def modeled_ms(path: str, backward: bool):
    """layer -> the triton backend's modeled milliseconds for the pass (forward kernels, or all
    of them with the backward), from a report's JSON."""
    with open(path) as f:
        records = json.load(f)
    forward = {"dense_fwd", "dw_fwd", "stationary_fwd"}
    out = {}
    for r in records:
        if "error" not in r and (backward or r["kernel"] in forward):
            out[r["layer"]] = out.get(r["layer"], 0.0) + r["modeled_us"] / 1e3
    return out


def _tuned_kernels():
    """The triton backend's autotuned kernels (none where Triton is missing or runs
    interpreted: the interpreter does not autotune)."""
    try:
        from condconv_kernels.triton import dense, depthwise
    except Exception:  # noqa: BLE001 -- no triton backend here
        return []
    kernels = [(name, getattr(module, name)) for module in (dense, depthwise)
               for name in sorted(dir(module)) if name.endswith("_kernel")]
    return [(name, kernel) for name, kernel in kernels
            if len(getattr(kernel, "configs", ())) > 1]  # (not the untuned ones)


def launched_configs(fn, kernels) -> str:
    """The configurations the autotuned ``kernels`` launch in one call of ``fn`` (after the
    tuning: each kernel's ``best_config`` is the one its last launch ran), as "kernel
    tiles wW sS" joined by "; "; empty where none of them ran."""
    for _, kernel in kernels:
        kernel.best_config = None
    fn()
    picks = []
    for name, kernel in kernels:
        c = getattr(kernel, "best_config", None)
        if c is not None:
            tiles = "x".join(str(v) for v in c.kwargs.values())
            picks.append(f"{name.replace('_kernel', '')} {tiles} w{c.num_warps} s{c.num_stages}")
    return "; ".join(picks)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=8, help="The batch size.")
    p.add_argument("--experts", type=int, default=8, help="Experts per layer.")
    p.add_argument("--shapes", default="efficientnet", choices=["efficientnet", "resnet"],
                   help="The 24 layers of tf_efficientnet_cc_b0, or dense 3x3 layers at "
                        "ResNet-18 shapes.")
    p.add_argument("--device", default="cpu", help="Where to run: cpu or cuda.")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="The dtype of inputs and weights.")
    p.add_argument("--backward", action="store_true", help="Time forward + backward.")
    p.add_argument("--channels-last", action="store_true", help="Use channels_last inputs.")
    p.add_argument("--roofline", action="store_true",
                   help="Measure the device's ceilings and add the achieved rates per fused "
                        "backend.")
    p.add_argument("--first", type=int, help="Only the first N layers (quick checks).")
    p.add_argument("--modeled", help="A JSON of condconv_kernels.triton.report made for the same "
                                     "batch, dtype and layout: adds the triton backend's modeled "
                                     "time per layer and the measured / modeled ratio.")
    p.add_argument("--min-run-time", type=float, default=0.2,
                   help="Seconds of timed calls per measurement.")
    p.add_argument("--cuda-graph", action="store_true",
                   help="Time replays of each variant captured in a CUDA graph, one turn of its "
                        "input sets a replay: the device's time without the host's (CUDA only).")
    p.add_argument("--out", help="Write the table (markdown) and every number (JSON beside it).")
    args = p.parse_args(argv)
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        p.error("argument --cuda-graph: needs --device cuda")
    dtype = getattr(torch, args.dtype)
    layers = (efficientnet_cc_b0_layers(args.experts) if args.shapes == "efficientnet"
              else resnet_condconv_layers(args.experts))[:args.first]
    variants = [layer_variants(layer, args.batch, args.device, dtype, args.backward,
                               channels_last=args.channels_last) for layer in layers]
    # One untimed pass over everything first: the allocator then serves every size from its
    # pools (glibc raises its mmap threshold once a large block is freed), as it does in a
    # training loop; otherwise the first layer of each size pays page faults the rest do not.
    for fns in variants:
        for fn in fns.values():
            fn()
    # The configuration the autotuner chose for each kernel of each layer (GPU only).
    kernels = _tuned_kernels()
    picks = {layer.name: launched_configs(fns["fused:triton"], kernels)
             for layer, fns in zip(layers, variants) if kernels and "fused:triton" in fns}
    picks = picks if any(picks.values()) else {}
    rows, notes = [], []
    for layer, fns in tqdm(list(zip(layers, variants)), desc="layers", file=sys.stderr):
        calls = 1
        if args.cuda_graph:
            calls = next(iter(fns.values())).sets
            graphed = graphed_variants(fns, notes, calls)
            fns = {name: graphed.get(name) for name in fns}
        rows.append((layer, {name: time_callable(fn, args.device, args.min_run_time).median_ms
                             / calls if fn is not None else float("nan")
                             for name, fn in fns.items()}))

    fused = [n for n in rows[0][1] if n.startswith("fused:")]
    ceilings = measure_ceilings(args.device, dtype) if args.roofline else None
    itemsize = torch.empty((), dtype=dtype).element_size()
    work = {layer.name: layer.work(args.batch, itemsize, args.backward) for layer in layers}

    def roofline_cells(layer, ms):
        flops, nbytes = work[layer.name]
        return [f"{flops / ms * 1e-9:.2f}", f"{nbytes / ms * 1e-6:.1f}",
                f"{100 * ceilings.floor_ms(flops, nbytes) / ms:.0f}%"]

    modeled = modeled_ms(args.modeled, args.backward) if args.modeled else None
    mode = "forward+backward" if args.backward else "forward"
    if args.cuda_graph:
        mode += ", CUDA graph replays"
    layout = "channels_last" if args.channels_last else "contiguous"
    title = (f"tf_efficientnet_cc_b0_{args.experts}e CondConv layers" if args.shapes ==
             "efficientnet" else f"dense 3x3 CondConv layers (ResNet-18 shapes, E={args.experts})")
    lines = [f"{title}, batch {args.batch}, "
             f"{args.dtype}, {layout}, {mode}, median ms", "",
             "| layer | shape | static | unfused | " +
             " | ".join(f"{n} | {n} speedup vs unfused | {n} / static" +
                        (f" | {n} TFLOP/s | {n} GB/s | {n} % of roofline" if ceilings else "")
                        for n in fused) + " |",
             "|" + "---|" * (4 + (6 if ceilings else 3) * len(fused))]
    tuned = "fused:triton" in fused
    if modeled is not None:
        lines[2] += " triton modeled |" + (" fused:triton / modeled |" if tuned else "")
        lines[3] += "---|" * (2 if tuned else 1)
    if picks:
        lines[2] += " triton configurations |"
        lines[3] += "---|"
    for layer, t in rows:
        cells = [layer.name, layer.describe(), f"{t['static']:.3f}", f"{t['unfused']:.3f}"]
        for n in fused:
            cells += [f"{t[n]:.3f}", f"{t['unfused'] / t[n]:.2f}x", f"{t[n] / t['static']:.2f}"]
            if ceilings:
                cells += roofline_cells(layer, t[n])
        if modeled is not None:
            m = modeled.get(layer.name)
            cells.append(f"{m:.3f}" if m else "-")
            if tuned:
                cells.append(f"{t['fused:triton'] / m:.2f}" if m else "-")
        if picks:
            cells.append(picks.get(layer.name) or "-")
        lines.append(row(cells))
    cells = ["geomean", "", f"{geomean([t['static'] for _, t in rows]):.3f}",
             f"{geomean([t['unfused'] for _, t in rows]):.3f}"]
    for n in fused:
        cells += [f"{geomean([t[n] for _, t in rows]):.3f}",
                  f"{geomean([t['unfused'] / t[n] for _, t in rows]):.2f}x",
                  f"{geomean([t[n] / t['static'] for _, t in rows]):.2f}"]
        if ceilings:
            reached = geomean([ceilings.floor_ms(*work[l.name]) / t[n] for l, t in rows])
            cells += ["", "", f"{100 * reached:.0f}%"]
    if modeled is not None:
        both = [(t, modeled[l.name]) for l, t in rows if modeled.get(l.name)]
        cells.append(f"{geomean([m for _, m in both]):.3f}" if both else "-")
        if tuned:
            cells.append(f"{geomean([t['fused:triton'] / m for t, m in both]):.2f}"
                         if both else "-")
    if picks:
        cells.append("")
    lines.append(row(cells))
    info = machine_info()
    lines += [""] + notes + [machine_line(info)]
    if ceilings:
        lines.append(ceilings.describe())
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = "python bench/bench_layers.py " + " ".join(argv if argv else sys.argv[1:])
        write_result(args.out, table, command, {
            "machine": info, "batch": args.batch, "dtype": args.dtype, "mode": mode,
            "layout": layout, "ceilings": dataclasses.asdict(ceilings) if ceilings else None,
            "layers": [{"name": l.name, "shape": l.describe(), "ms": t,
                        "triton_configs": picks.get(l.name),
                        "flops": work[l.name][0], "bytes": work[l.name][1]} for l, t in rows]})


if __name__ == "__main__":
    reexec_with_stable_malloc()
    main()
