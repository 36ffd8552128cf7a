"""A per-layer chart of a bench_layers.py result: each fused backend's time and the unfused
baseline's over the static convolution's, per layer, on a log scale, with the target ratio
drawn across.

    python bench/plot_layers.py RESULT.json [--modeled REPORT.json] [--target 1.2]
                                [--out RESULT.png]

RESULT.json is what ``bench/bench_layers.py --out`` writes beside its table. Each layer gets a
bar per fused backend (its time / the static convolution's) and a black dot for the unfused
baseline's; where the run measured the device's ceilings (``--roofline``), a grey tick marks
the roofline floor over the static time; with ``--modeled`` (a JSON of
``condconv_kernels.triton.report`` for the same batch, dtype and layout), a hollow diamond marks
the triton backend's modeled time over the static time. The legend gives each series' geomean
over the layers. The default target is 1.2 for a forward (fused / static), none with the
backward: draw one with ``--target``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layers import modeled_ms  # noqa: E402

from condconv_kernels.cli import parser  # noqa: E402
from condconv_kernels.profile.tables import geomean  # noqa: E402

FORWARD_TARGET = 1.2  # per layer, fused / static, forward


def ratios(record: dict, modeled: Optional[Dict[str, float]] = None) -> Dict[str, List[float]]:
    """Series name -> one value per layer of ``record`` (bench_layers.py's JSON), each a time
    over the layer's static time: every fused backend, ``unfused``, ``floor`` (the roofline
    floor, where the run measured the ceilings) and ``modeled`` (``modeled``: layer -> modeled
    ms, where given); NaN where a layer has no such time."""
    layers = record["layers"]
    names = [n for n in layers[0]["ms"] if n.startswith("fused:")] + ["unfused"]
    out = {n: [l["ms"].get(n, float("nan")) / l["ms"]["static"] for l in layers] for n in names}
    ceilings = record.get("ceilings")
    if ceilings:
        out["floor"] = [max(l["flops"] / ceilings["flops_per_s"],
                            l["bytes"] / ceilings["bytes_per_s"]) * 1e3 / l["ms"]["static"]
                        for l in layers]
    if modeled is not None:
        out["modeled"] = [modeled.get(l["name"], float("nan")) / l["ms"]["static"]
                          for l in layers]
    return out


def title(record: dict) -> str:
    """The chart's title: the run's batch, dtype, layout, mode, device and commit."""
    m = record.get("machine", {})
    device = m.get("gpu") or f"CPU, {m.get('cpu_threads', '?')} threads"
    return (f"CondConv layers, batch {record['batch']}, {record['dtype']}, {record['layout']}, "
            f"{record['mode']}\n{device}, commit {m.get('commit', '?')}")


def plot(record: dict, path: str, modeled: Optional[Dict[str, float]] = None,
         target: Optional[float] = None) -> Dict[str, float]:
    """Writes the chart of ``record`` to ``path`` (PNG); returns each series' geomean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    series = ratios(record, modeled)
    means = {name: geomean(values) for name, values in series.items()}
    fused = [n for n in series if n.startswith("fused:")]
    names = [l["name"] for l in record["layers"]]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.42 * len(names)), 5.0))
    width = 0.8 / len(fused)
    for i, n in enumerate(fused):
        ax.bar([x + (i - (len(fused) - 1) / 2) * width for x in xs], series[n], width,
               label=f"{n} / static (geomean {means[n]:.2f})", zorder=2)
    marks = (("unfused", dict(marker="o", s=22, color="black"), "unfused / static"),
             ("floor", dict(marker="_", s=200, linewidths=2.5, color="gray"),
              "roofline floor / static"),
             ("modeled", dict(marker="D", s=28, facecolors="none", edgecolors="tab:red"),
              "triton modeled / static"))
    for key, style, label in marks:
        if key in series:
            ax.scatter(list(xs), series[key], zorder=3, label=f"{label} (geomean {means[key]:.2f})",
                       **style)
    ax.axhline(1.0, color="gray", lw=0.8)
    if target:
        ax.axhline(target, color="tab:green", lw=1.0, ls="--", label=f"target {target:g}")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("time / static convolution's (log scale)")
    ax.set_title(title(record), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return means


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("result", help="The JSON that bench/bench_layers.py --out wrote.")
    p.add_argument("--modeled", help="A JSON of condconv_kernels.triton.report for the same "
                                     "batch, dtype and layout: marks the modeled times too.")
    p.add_argument("--target", type=float,
                   help="The ratio to draw across (default: 1.2 for a forward, none with the "
                        "backward).")
    p.add_argument("--out", help="The PNG to write (default: the result's path, .png).")
    args = p.parse_args(argv)
    with open(args.result) as f:
        record = json.load(f)
    backward = "backward" in record["mode"]
    modeled = modeled_ms(args.modeled, backward) if args.modeled else None
    target = args.target if args.target is not None else (None if backward else FORWARD_TARGET)
    out = args.out or os.path.splitext(args.result)[0] + ".png"
    means = plot(record, out, modeled, target)
    print(f"wrote {out}: geomean over static " +
          ", ".join(f"{name} {value:.2f}" for name, value in means.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
