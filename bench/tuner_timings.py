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
ranks first and how far it is from the fastest, and a summary per kernel; with ``--fit``, the
factor on each kernel's latency constants that fits these timings best (how far the
report's constants are from what a new run measured).

    python bench/tuner_timings.py KIT.tgz|RESULTS.tgz|DIR [--model [--fit]] [--out FILE.md]
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
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # a file cut short (a step killed while Triton wrote it)
            print(f"skipped {name}: not whole", file=sys.stderr)
            continue
        pairs = data["configs_timings"]
        times = {config_name(c): float(t[0] if isinstance(t, list) else t) for c, t in pairs}
        out.append((name[:-len(SUFFIX)], data["key"], times, {config_name(c): c
                                                              for c, _ in pairs}))
    return sorted(out, key=lambda t: (t[0], json.dumps(t[1])))


def config_name(config: dict) -> str:
    """A configuration (Triton's Config as the file gives it) as the static report names it
    (``report.config_label``)."""
    from condconv_kernels.triton.report import config_label
    return config_label(config["kwargs"], config["num_warps"], config["num_stages"])


def layer_keys(batches) -> Dict[Tuple[str, str], dict]:
    """{(kernel name, key as JSON): dict(layers, layer and launch (the first layer's),
    batch)} for every tuned launch of one forward and backward of each
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
                    layers=[], layer=layer, launch=launch, batch=batch))
                if layer.name not in named["layers"]:
                    named["layers"].append(layer.name)
    return keys


def modeled(timings, names) -> List[Optional[Dict[str, dict]]]:
    """For each entry of ``timings`` (None where its key names no layer), {configuration: its
    terms} for every configuration measured, each compiled for sm_90 at that key's launch (at
    the key's batch bucket, in bfloat16, as :func:`layer_keys` records them): ``modeled_us``
    (the static model's time) and, for the kernels with a latency term, ``latency_us`` (that
    term), ``rest_us`` (the largest of the others), ``scale`` (2 where the configuration
    spills) and ``copy_us`` (the experts' copy the launch adds): modeled = scale x max(rest,
    latency) + copy."""
    from condconv_kernels.triton import report
    cache, out = {}, []
    for kernel, key, _, configs in timings:
        named = names.get((kernel, json.dumps(key)))
        if not named:
            out.append(None)
            continue
        terms = {}
        out.append(terms)
        for name, c in configs.items():
            r = report.config_record(named["layer"], named["batch"], 2, named["launch"],
                                     (dict(c["kwargs"]), c["num_warps"], c["num_stages"]),
                                     cache=cache)
            t = terms[name] = dict(modeled_us=r["modeled_us"])
            if r.get("latency_us") and math.isfinite(r["modeled_us"]):
                spills = r["spill_bytes"] > 0 or r["shared_bytes"] > report._config.SHARED_LIMIT
                rest = report.modeled_us(r["hbm_bytes"], r["l2_bytes"], r["tc_flops"],
                                         r["cc_flops"], r["grid"], r["tensor_core"], False,
                                         r["issue_us"])
                scale = 2.0 if spills else 1.0
                t.update(latency_us=r["latency_us"], rest_us=rest, scale=scale,
                         copy_us=r["modeled_us"] - scale * max(rest, r["latency_us"]))
        print(f"modeled {kernel} of {named['layers'][0]} at batch {named['batch']}",
              file=sys.stderr)
    return out


# The factors on a kernel's latency constants that --fit tries (0.3 to 2.5).
FIT_FACTORS = [f / 20 for f in range(6, 51)]


def fit(records) -> str:
    """Per kernel with a latency term, the factor on its constants (report.DOT_CYCLES, the
    dense kernel gradient's three, the depthwise kernels' DW_ ones) whose model fits the
    measured times best: the least mean squared log of measured / modeled over every
    configuration with both, where the modeled time with factor f is the model's with f times
    its latency term (:func:`modeled`'s terms). With the rank correlation and the model's pick
    against the fastest at that factor (mean and geomean over the keys)."""
    lines = ["The latency term's constants fitted to these timings (`--fit`): per kernel, the "
             "factor on them that minimises the mean squared log of measured / modeled; 1.00 "
             "is the report's constants.", "",
             *header(["kernel", "points", "factor", "rms log error: at 1.00 -> at the factor",
                      "rank correlation", "model's pick / fastest"])]
    kernels = sorted({r["kernel"] for r in records if r.get("latency_us")})
    for kernel in kernels:
        mine = [r for r in records if r["kernel"] == kernel and r.get("latency_us")
                and math.isfinite(r["measured_us"])]

        def predicted(r, f):
            return r["scale"] * max(r["rest_us"], f * r["latency_us"]) + r["copy_us"]

        def error(f):
            return sum(math.log(r["measured_us"] / predicted(r, f)) ** 2
                       for r in mine) / len(mine)
        best = min(FIT_FACTORS, key=error)
        keys: Dict[str, list] = {}
        for r in mine:
            keys.setdefault(json.dumps(r["key"]), []).append(r)
        rho, pick = [], []
        for rs in keys.values():
            if len(rs) > 1:
                measured = {r["config"]: r["measured_us"] for r in rs}
                model = {r["config"]: predicted(r, best) for r in rs}
                rho.append(spearman(list(measured.values()), list(model.values())))
                pick.append(geomean([measured[c] for c in first(model)])
                            / min(measured.values()))
        lines.append(row([kernel, len(mine), f"{best:.2f}",
                          f"{math.sqrt(error(1.0)):.2f} -> {math.sqrt(error(best)):.2f}",
                          f"{mean(rho):.2f}" if rho else "-",
                          f"{geomean(pick):.2f}" if pick else "-"]))
    return "\n".join(lines)


def ranks(values: List[float]) -> List[float]:
    """Each value's rank (0 for the least), tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: List[float], b: List[float]) -> float:
    """Spearman's rank correlation (Pearson's of the ranks, ties at their mean rank); nan for
    fewer than two points or a list whose values are all equal."""
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def first(modeled: Dict[str, float]) -> List[str]:
    """The configurations the model ranks first: its least time, and those within 0.1% of it
    (a tie: the model cannot tell them apart)."""
    least = min(modeled.values())
    return [c for c, m in modeled.items() if m <= least * 1.001]


def mean(values: List[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def geomean(values: List[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def tables(timings, names, model: Optional[list]) -> Tuple[str, list]:
    """The markdown (a summary per kernel, then a table per key) and the rows as records, with
    the model's terms (:func:`modeled`, one entry per timing) where given. A configuration the
    GPU could not run (Triton times it as infinite) or the report could not compile is shown
    as failed and left out of the comparisons; where the model ties several configurations
    first (:func:`first`), its pick counts as their measured times' geomean."""
    records, blocks, summary = [], [], {}
    for at, (kernel, key, times, _) in enumerate(timings):
        named = names.get((kernel, json.dumps(key)))
        short = kernel.replace("_kernel", "")
        if named:
            label = ", ".join(named["layers"])
        else:
            label = "key " + ", ".join(str(k) for k in key if not str(k).startswith("torch."))
        ran = {c: ms for c, ms in times.items() if math.isfinite(ms)}
        best = min(ran.values()) if ran else float("nan")
        terms = (model[at] if model else None) or {}
        modeled = {c: t["modeled_us"] for c, t in terms.items()}
        rows = []
        for config, ms in sorted(times.items(), key=lambda kv: kv[1]):
            us, m = 1e3 * ms, modeled.get(config)
            rec = dict(kernel=short, layers=named["layers"] if named else [], key=key,
                       config=config, measured_us=us, to_fastest=ms / best, modeled_us=m,
                       **{k: v for k, v in terms.get(config, {}).items() if k != "modeled_us"})
            records.append(rec)
            shown = "-" if m is None else "failed" if not math.isfinite(m) else f"{m:.1f}"
            if not math.isfinite(ms):
                rows.append(row([config, "failed", "-", shown, "-"]))
                continue
            rows.append(row([config, f"{us:.1f}", f"{ms / best:.2f}", shown,
                             f"{us / m:.2f}" if shown not in ("-", "failed") else "-"]))
        both = {c: m for c, m in modeled.items() if c in ran and math.isfinite(m)}
        title = f"### {short}, batch bucket {key[0]}, {label}"
        if len(both) > 1:
            picks = first(both)
            pick = geomean([ran[c] for c in picks]) / best
            s = summary.setdefault(short, dict(keys=0, pick=[], rho=[], fastest=[]))
            s["keys"] += 1
            s["pick"].append(pick)
            s["rho"].append(spearman([ran[c] for c in both], list(both.values())))
            fastest = min(ran, key=ran.get)
            if fastest in both:
                s["fastest"].append(1e3 * ran[fastest] / both[fastest])
            if len(picks) == 1:
                title += f": the model picks {picks[0]}, {pick:.2f}x the fastest"
            else:
                span = sorted(ran[c] / best for c in picks)
                title += (f": the model ties {len(picks)} first ({', '.join(picks)}), "
                          f"{span[0]:.2f}-{span[-1]:.2f}x the fastest")
        blocks += ["", title, "", *header(["configuration", "measured us", "/ fastest",
                                            "modeled us", "measured / modeled"]), *rows]
    lines = []
    if summary:
        lines += ["Per kernel, over the keys the model covers: the measured time of the "
                  "configuration the model ranks first against the fastest measured one "
                  "(geomean; configurations the model ties first count as their geomean), "
                  "Spearman's rank correlation of measured and modeled times (mean; ties at "
                  "their mean rank), and the fastest configuration's measured time against its "
                  "modeled one (geomean).", "",
                  *header(["kernel", "keys", "model's pick / fastest", "rank correlation",
                           "fastest: measured / modeled"])]
        for short, s in sorted(summary.items()):
            lines.append(row([short, s["keys"], f"{geomean(s['pick']):.2f}",
                              f"{mean(s['rho']):.2f}", f"{geomean(s['fastest']):.2f}"]))
    return "\n".join(lines + blocks), records


def plot(records, path: str) -> None:
    """Measured against modeled time of every configuration with both (log-log), a colour a
    kernel, each key's fastest configuration ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in records if r["modeled_us"] and math.isfinite(r["modeled_us"])
           and math.isfinite(r["measured_us"])]
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
    p.add_argument("--fit", action="store_true",
                   help="With --model: also fit the latency term's constants to the timings.")
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
    if args.fit and model:
        text = fit([r for r in records if r["modeled_us"]]) + "\n\n" + text
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
