"""What the autotuner measured on a GPU: every configuration's time, per kernel and layer, against
the static model.

Triton's autotuner, with its results cached (``TRITON_CACHE_AUTOTUNING=1``, as the GPU kit runs
it), writes the time of every configuration it benchmarked to ``<hash>/<kernel>.autotune.json``
in its cache directory: the median and the 20th and 80th percentiles of its timed runs, in ms.
The kit's ``kit.tgz`` holds the first call's cache and ``results.tgz`` both calls' timings
(``autotune/``). This reads them from a tarball or a directory, names the layers of
tf_efficientnet_cc_b0_8e each tuning key belongs to (the key of their launch, recorded on meta
tensors as the static report records them), and prints per key each configuration's measured
time and its ratio to the fastest; with ``--model``, also the static model's time for each
configuration measured (compiled for sm_90 at the layer's launch:
``condconv_kernels.triton.report.config_record``; a few minutes), the configuration the model
ranks first and how far it is from the fastest, and a summary per kernel.

    python bench/tuner_timings.py KIT.tgz|RESULTS.tgz|DIR [--model] [--out FILE.md]
                                  [--plot FILE.png]

Run it without ``TRITON_INTERPRET=1``. Keys of no layer of the model (tests, the kernel
gradient with one of its gradients) are listed by their key.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tarfile
from typing import Dict, List, Optional, Tuple

from condconv_kernels.cli import parser
from condconv_kernels.profile.tables import header, row, write_result

SUFFIX = ".autotune.json"


def read_timings(path: str) -> List[Tuple[str, list, Dict[str, float], Dict[str, dict]]]:
    """(kernel name, tuning key, {configuration: median ms}, {configuration: Triton's Config
    as the file gives it}) of each ``*.autotune.json`` under ``path`` (a directory, or a .tgz
    whose members are searched)."""
    found = []
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            found += [(name, open(os.path.join(root, name)).read())
                      for name in files if name.endswith(SUFFIX)]
    else:
        with tarfile.open(path) as tar:
            found += [(os.path.basename(m.name), tar.extractfile(m).read().decode())
                      for m in tar.getmembers() if m.isfile() and m.name.endswith(SUFFIX)]
    out = []
    for name, text in found:
        data = json.loads(text)
        pairs = data["configs_timings"]
        times = {config_name(c): float(t[0] if isinstance(t, list) else t) for c, t in pairs}
        out.append((name[:-len(SUFFIX)], data["key"], times, {config_name(c): c
                                                              for c, _ in pairs}))
    return sorted(out, key=lambda t: (t[0], json.dumps(t[1])))


def config_name(config: dict) -> str:
    """A configuration as the static report names it: its tile sizes joined by x, warps and
    stages (``2x64x64x32 w4 s3``)."""
    blocks = "x".join(str(v) for v in config["kwargs"].values())
    return f"{blocks} w{config['num_warps']} s{config['num_stages']}"


def layer_keys(batches) -> Dict[Tuple[str, str], dict]:
    """{(kernel name, key as JSON): dict(layers, kernel (the report's name), layer and launch
    (the first layer's), batch)} for every tuned launch of one forward and backward of each
    CondConv layer of tf_efficientnet_cc_b0_8e at each batch size (bfloat16, channels_last, as
    the kit benchmarks them); layers of one shape share a key."""
    import torch

    from condconv_kernels.profile import efficientnet_cc_b0_layers
    from condconv_kernels.triton import _config, report
    keys = {}
    for batch in batches:
        for layer in efficientnet_cc_b0_layers(8):
            for launch in report.layer_launches(layer, batch, torch.bfloat16, True):
                if not isinstance(launch.kernel, _config.TunedKernel):
                    continue
                key = launch.kernel.tuning_key(launch.args, launch.kwargs)
                named = keys.setdefault((launch.name, json.dumps(list(key))), dict(
                    layers=[], kernel=launch.name.replace("_kernel", ""), layer=layer,
                    launch=launch, batch=batch))
                if layer.name not in named["layers"]:
                    named["layers"].append(layer.name)
    return keys


def modeled(timings, names) -> Dict[Tuple[str, str], Dict[str, float]]:
    """{(kernel name, key as JSON): {configuration: the static model's microseconds}} for every
    configuration measured on a named key, each compiled for sm_90 at that key's launch."""
    from condconv_kernels.triton import report
    cache, out = {}, {}
    for kernel, key, _, configs in timings:
        named = names.get((kernel, json.dumps(key)))
        if not named:
            continue
        out[(kernel, json.dumps(key))] = {
            name: report.config_record(named["layer"], named["batch"], 2, named["launch"],
                                       (dict(c["kwargs"]), c["num_warps"], c["num_stages"]),
                                       cache=cache)["modeled_us"]
            for name, c in configs.items()}
        print(f"modeled {kernel} of {named['layers'][0]} at batch {named['batch']}",
              file=sys.stderr)
    return out


def spearman(a: List[float], b: List[float]) -> float:
    """Spearman's rank correlation of two lists without ties that matter here."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for i, j in enumerate(order):
            r[j] = i
        return r
    ra, rb, n = ranks(a), ranks(b), len(a)
    if n < 2:
        return float("nan")
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def geomean(values: List[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def tables(timings, names, model: Optional[dict]) -> Tuple[str, list]:
    """The markdown (a summary per kernel, then a table per key) and the rows as records, with
    the model's times (:func:`modeled`) where given."""
    records, blocks, summary = [], [], {}
    for kernel, key, times, _ in timings:
        named = names.get((kernel, json.dumps(key)))
        short = kernel.replace("_kernel", "")
        if named:
            label = ", ".join(named["layers"])
        else:
            label = "key " + ", ".join(str(k) for k in key if not str(k).startswith("torch."))
        best = min(times.values())
        modeled = (model or {}).get((kernel, json.dumps(key)), {})
        rows = []
        for config, ms in sorted(times.items(), key=lambda kv: kv[1]):
            us, m = 1e3 * ms, modeled.get(config)
            rec = dict(kernel=short, layers=named["layers"] if named else [], key=key,
                       config=config,
                       measured_us=us, to_fastest=ms / best, modeled_us=m)
            records.append(rec)
            rows.append(row([config, f"{us:.1f}", f"{ms / best:.2f}",
                             "-" if m is None else f"{m:.1f}",
                             "-" if m is None else f"{us / m:.2f}"]))
        pick = None
        both = [c for c in times if c in modeled]
        if len(both) > 1:
            pick = min(both, key=modeled.get)
            s = summary.setdefault(short, dict(keys=0, pick=[], rho=[], fastest=[]))
            s["keys"] += 1
            s["pick"].append(times[pick] / best)
            s["rho"].append(spearman([times[c] for c in both], [modeled[c] for c in both]))
            fastest = min(times, key=times.get)
            s["fastest"].append(1e3 * times[fastest] / modeled[fastest])
        title = f"### {short}, batch {key[0]}, {label}"
        if pick:
            title += f": the model picks {pick}, {times[pick] / best:.2f}x the fastest"
        blocks += ["", title, "", *header(["configuration", "measured us", "/ fastest",
                                            "modeled us", "measured / modeled"]), *rows]
    lines = []
    if summary:
        lines += ["Per kernel, over the keys the model covers: the measured time of the "
                  "configuration the model ranks first against the fastest measured one "
                  "(geomean), Spearman's rank correlation of measured and modeled times "
                  "(mean), and the fastest configuration's measured time against its modeled "
                  "one (geomean).", "",
                  *header(["kernel", "keys", "model's pick / fastest", "rank correlation",
                           "fastest: measured / modeled"])]
        for short, s in sorted(summary.items()):
            lines.append(row([short, s["keys"], f"{geomean(s['pick']):.2f}",
                              f"{sum(s['rho']) / len(s['rho']):.2f}",
                              f"{geomean(s['fastest']):.2f}"]))
    return "\n".join(lines + blocks), records


def plot(records, path: str) -> None:
    """Measured against modeled time of every configuration with both (log-log), a colour a
    kernel, each key's fastest configuration ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in records if r["modeled_us"]]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(7, 6))
    for kernel in sorted({r["kernel"] for r in pts}):
        mine = [r for r in pts if r["kernel"] == kernel]
        ax.scatter([r["modeled_us"] for r in mine], [r["measured_us"] for r in mine], s=14,
                   label=kernel, alpha=0.7)
        fast = [r for r in mine if r["to_fastest"] == 1.0]
        ax.scatter([r["modeled_us"] for r in fast], [r["measured_us"] for r in fast], s=70,
                   facecolors="none", edgecolors="black", linewidths=0.8)
    lo = min(min(r["modeled_us"], r["measured_us"]) for r in pts) * 0.8
    hi = max(max(r["modeled_us"], r["measured_us"]) for r in pts) * 1.2
    for f, style in ((1, "-"), (2, "--"), (4, ":")):
        ax.plot([lo, hi], [lo * f, hi * f], "k" + style, lw=0.7, label=f"measured = {f}x model")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi),
           xlabel="modeled us (static report)", ylabel="measured us (autotuner, GPU)",
           title="Every tuned configuration: measured against modeled (ringed: fastest)")
    for axis in (ax.xaxis, ax.yaxis):  # plain microseconds at 1, 2, 5 x 10^n on both axes
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("path", help="A kit or results tarball, or a Triton cache directory.")
    p.add_argument("--model", action="store_true",
                   help="Also the static model's time for every configuration measured.")
    p.add_argument("--out", help="Also write the tables (markdown) and the records (JSON).")
    p.add_argument("--plot", help="Write the measured-against-modeled scatter plot here.")
    args = p.parse_args(argv)
    timings = read_timings(args.path)
    if not timings:
        print(f"no *{SUFFIX} under {args.path}", file=sys.stderr)
        return 1
    batches = sorted({k[0] for _, k, _, _ in timings if k and isinstance(k[0], int)})
    names = layer_keys(batches)
    model = modeled(timings, names) if args.model else None
    text, records = tables(timings, names, model)
    text = (f"The autotuner's timings ({len(timings)} tuning keys) from `{args.path}`"
            + (", against the static model (`condconv_kernels.triton.report`)"
               if args.model else "") + "\n\n" + text)
    print(text)
    if args.out:
        write_result(args.out, text, "python bench/tuner_timings.py "
                     + " ".join(argv if argv is not None else sys.argv[1:]), records)
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
