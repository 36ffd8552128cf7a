"""How much does CondConv cost, and how much does the fused kernel save? condconv-profile
measures it.

    condconv-profile --model tf_efficientnet_cc_b0_8e [--batch 1,8] [--device auto]
                     [--dtype float32] [--layers] [--backward] [--out DIR]

Prints parameters and multiply-adds (the CondConv model and the same model without experts),
then median latencies of the whole model and, with --layers, of each CondConv layer at its real
shape. The models are the EfficientNet-CondConv family and the converted ResNet-18 / MobileNetV2
(``resnet18-odconv4``, ``mobilenetv2-dynamic4``, ...: ``<architecture>-<kind><experts>``, kind
condconv, dynamic or odconv; ODConv's layers are timed with their per-example scales). Each is
measured fused (each available backend), unfused (timm's grouped convolution) and static, with the
ratios fused/unfused and fused/static measured in the same run. --out DIR writes results.json,
results.csv and PNG plots (latency vs batch; per-layer bars).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from .latency import fused_backends, layer_variants, measure, model_layer_shapes, model_variants
from .madds import count_params, madds_breakdown, summarize
from .tables import geomean, header, row
from .timing import machine_info, time_interleaved

__all__ = ["main", "run"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, mininterval=1.0)
    except ImportError:
        class Quiet:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return Quiet()


def run(model_name: str, batches: Sequence[int], device: str = "cpu", dtype: str = "float32",
        layers: bool = False, backward: bool = False, min_run_time: float = 0.5,
        input_size: Optional[int] = None) -> Dict[str, object]:
    """Measures everything and returns it as a JSON-able dict."""
    from ..models import create_model
    torch_dtype = DTYPES[dtype]
    fused = create_model(model_name)
    static = create_model(model_name, condconv=False)
    size = input_size or fused.pretrained_cfg["input_size"][-1]
    counts = madds_breakdown(fused, size)
    static_counts = madds_breakdown(static, size)
    result: Dict[str, object] = {
        "model": model_name, "input_size": size, "device": device, "dtype": dtype,
        "machine": machine_info(), "fused_backends": fused_backends(device),
        "params": count_params(fused), "static_params": count_params(static),
        "madds": sum(c.madds for c in counts), "static_madds": sum(c.madds for c in static_counts),
        "madds_by_kind": summarize(counts),
        "madds_per_layer": [{"name": c.name, "kind": c.kind, "madds": c.madds,
                             "mix_madds": c.mix_madds, "params": c.params} for c in counts],
        "model_latency": [], "layer_latency": [],
    }
    modes = ["forward"] + (["forward+backward"] if backward else [])
    shapes = model_layer_shapes(fused, size) if layers else []
    n_variants = 2 + len(result["fused_backends"])
    bar = _progress(len(batches) * len(modes) * n_variants * (1 + len(shapes)), "measuring")
    use_graph = device == "cuda"
    try:
        for batch in batches:
            for mode in modes:
                bwd = mode != "forward"
                fns = model_variants(model_name, batch, device, torch_dtype, bwd, size)
                times = time_interleaved(fns, device, min_run_time)
                for variant, fn in fns.items():
                    r = measure(fn, device, min_run_time, cuda_graph=use_graph and batch == 1
                                and not bwd, timed=times[variant])
                    result["model_latency"].append(_row(variant, batch, mode, r))
                    bar.update()
                for shape in shapes:
                    for variant, fn in layer_variants(shape, batch, device, torch_dtype,
                                                      bwd).items():
                        r = measure(fn, device, min_run_time / 2)
                        record = _row(variant, batch, mode, r)
                        record.update(layer=shape.name, shape=shape.describe())
                        result["layer_latency"].append(record)
                        bar.update()
    finally:
        bar.close()
    return result


def _row(variant, batch, mode, r) -> Dict[str, object]:
    return {"variant": variant, "batch": batch, "mode": mode, "median_ms": r.time.median_ms,
            "q10_ms": r.time.q10_ms, "q90_ms": r.time.q90_ms, "runs": r.time.runs,
            "peak_memory_mb": r.peak_memory_mb, "cuda_graph_ms": r.cuda_graph_ms}


def _variants(result) -> List[str]:
    return ["static", "unfused"] + [f"fused:{b}" for b in result["fused_backends"]]


def format_tables(result: Dict[str, object]) -> str:
    variants = _variants(result)
    fused = [v for v in variants if v.startswith("fused:")]
    lines = [f"{result['model']} at {result['input_size']}x{result['input_size']}, "
             f"{result['dtype']} on {result['device']} ({result['machine'].get('gpu') or result['machine']['machine']}, "
             f"{result['machine']['cpu_threads']} threads, torch {result['machine']['torch']})",
             "",
             "| | params | multiply-adds |", "|---|---|---|",
             f"| {result['model']} | {result['params']:,} | {result['madds'] / 1e6:.1f}M |",
             f"| same without experts | {result['static_params']:,} | "
             f"{result['static_madds'] / 1e6:.1f}M |",
             f"| ratio | {result['params'] / result['static_params']:.2f} | "
             f"{result['madds'] / result['static_madds']:.3f} |", ""]

    def table(rows, key_cols, title, field="median_ms", unit="ms"):
        rows = [r for r in rows if r.get(field) is not None]
        if not rows:
            return []
        out = [title, "", *header(key_cols + [f"{v} {unit}" for v in variants] +
                                  [f"{f} / unfused" for f in fused] +
                                  [f"{f} / static" for f in fused])]
        groups: Dict[tuple, Dict[str, float]] = {}
        for r in rows:
            key = tuple(r[k] for k in key_cols)
            groups.setdefault(key, {})[r["variant"]] = r[field]
        ratios = {f: ([], []) for f in fused}
        for key, t in groups.items():
            cells = [str(k) for k in key] + [f"{t.get(v, float('nan')):.3f}" for v in variants]
            for f in fused:
                ratios[f][0].append(t[f] / t["unfused"])
                ratios[f][1].append(t[f] / t["static"])
            cells += [f"{t[f] / t['unfused']:.2f}" for f in fused]
            cells += [f"{t[f] / t['static']:.2f}" for f in fused]
            out.append(row(cells))
        if len(groups) > 1:
            cells = ["geomean"] + [""] * (len(key_cols) - 1) + [""] * len(variants)
            cells += [f"{geomean(ratios[f][0]):.2f}" for f in fused]
            cells += [f"{geomean(ratios[f][1]):.2f}" for f in fused]
            out.append(row(cells))
        return out + [""]

    lines += table(result["model_latency"], ["mode", "batch"], "Whole model, median latency")
    graphs = [r for r in result["model_latency"] if r.get("cuda_graph_ms")]
    if graphs:
        lines += ["CUDA graph, batch 1: " + ", ".join(f"{r['variant']} {r['cuda_graph_ms']:.3f} ms"
                                                       for r in graphs), ""]
    if result["layer_latency"]:
        lines += table(result["layer_latency"], ["mode", "batch", "layer", "shape"],
                       "CondConv layers at their real shapes, median latency")
    where = ("PyTorch's CPU allocator as the profiler sees it; the cpu backend's reused "
             "per-thread scratch (at most 2 x 16 MB per thread, allocated once) is not included"
             if result["device"] == "cpu" else "CUDA caching allocator, above the inputs")
    lines += table(result["model_latency"], ["mode", "batch"],
                   f"Whole model, peak memory of one call ({where})", "peak_memory_mb", "MB")
    if result["layer_latency"]:
        lines += table(result["layer_latency"], ["mode", "batch", "layer", "shape"],
                       "CondConv layers, peak memory of one call", "peak_memory_mb", "MB")
    return "\n".join(lines)


def write_outputs(result: Dict[str, object], out_dir: str, table: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def path(name):
        written.append(os.path.join(out_dir, name))
        return written[-1]
    with open(path("results.json"), "w") as f:
        json.dump(result, f, indent=1)
    fields = ["scope", "layer", "shape", "mode", "batch", "variant", "median_ms", "q10_ms",
              "q90_ms", "runs", "peak_memory_mb", "cuda_graph_ms"]
    with open(path("results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for scope in ("model_latency", "layer_latency"):
            for record in result[scope]:
                writer.writerow(dict(record, scope=scope.split("_")[0]))
    with open(path("results.md"), "w") as f:
        f.write(table + "\n")
    written += _plots(result, out_dir)
    return written


def _plot_title(result, what: str) -> str:
    """``what``, then the model, dtype, device and thread count of the run."""
    machine = result["machine"]
    where = machine.get("gpu") or machine.get("machine") or result["device"]
    return (f"{result['model']}: {what}\n{result['dtype']} on {result['device']} ({where}), "
            f"{machine.get('cpu_threads', '?')} threads")


def latency_vs_batch_figure(result, mode: str):
    """Median latency of every variant against the batch size (log2 axis, one integer tick per
    measured batch) for one mode."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    batches = sorted({r["batch"] for r in result["model_latency"] if r["mode"] == mode})
    for v in _variants(result):
        rows = sorted((r["batch"], r["median_ms"]) for r in result["model_latency"]
                      if r["variant"] == v and r["mode"] == mode)
        ax.plot([b for b, _ in rows], [t for _, t in rows], marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_locator(NullLocator())  # no unlabelled 2^k ticks between them
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, 1, 2, not 10^0
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="batch size", ylabel="median latency (ms)",
           title=_plot_title(result, f"whole model, {mode}"))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def layers_figure(result, mode: str, batch: int):
    """Median latency of every variant for each CondConv layer, at one batch size and mode."""
    import matplotlib.pyplot as plt
    variants = _variants(result)
    rows = [r for r in result["layer_latency"] if r["mode"] == mode and r["batch"] == batch]
    names = list(dict.fromkeys(r["layer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.45), 4.8))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        t = {r["layer"]: r["median_ms"] for r in rows if r["variant"] == v}
        ax.bar([k + i * width for k in range(len(names))], [t.get(n, 0) for n in names],
               width, label=v)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))])
    ax.set_xticklabels([n.replace("blocks.", "") for n in names], rotation=75, fontsize=7)
    ax.set(xlabel="CondConv layer", ylabel="median latency (ms)",
           title=_plot_title(result, f"CondConv layers, batch {batch}, {mode}"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plots(result, out_dir) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped", file=sys.stderr)
        return []
    written = []

    def save(fig, name):
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    for mode in sorted({r["mode"] for r in result["model_latency"]}):
        save(latency_vs_batch_figure(result, mode),
             f"latency_vs_batch_{mode.replace('+', '_')}.png")
    for mode, batch in sorted({(r["mode"], r["batch"]) for r in result["layer_latency"]}):
        save(layers_figure(result, mode, batch), f"layers_b{batch}_{mode.replace('+', '_')}.png")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import add_timing_arguments, parser
    from ..models import list_models
    from ..models.converted import is_converted_name
    p = parser(__doc__, prog="condconv-profile")
    p.add_argument("--model", default="tf_efficientnet_cc_b0_8e",
                   help=f"The model to profile, one of: {', '.join(list_models())}.")
    p.add_argument("--batch", help="Comma-separated batch sizes (default: 1,8 on CPU and "
                                   "1,32,256 on a GPU).")
    add_timing_arguments(p, device="auto", min_run_time=0.5)
    p.add_argument("--layers", action="store_true",
                   help="Also time every CondConv layer at its real shape.")
    p.add_argument("--out", help="A directory for results.json, results.csv, results.md and the "
                                 "plots.")
    args = p.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device")
    try:
        batches = [int(b) for b in (args.batch or ("1,32,256" if device == "cuda" else "1,8"))
                   .split(",")]
        if any(b < 1 for b in batches):
            raise ValueError
    except ValueError:
        p.error(f"--batch must be comma-separated positive integers, got {args.batch!r}")
    if args.model not in list_models() and not is_converted_name(args.model):
        p.error(f"--model: unknown model name {args.model!r}")
    result = run(args.model, batches, device, args.dtype, args.layers, args.backward,
                 args.min_run_time, args.input_size)
    table = format_tables(result)
    print(table)
    if args.out:
        for name in write_outputs(result, args.out, table):
            print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
