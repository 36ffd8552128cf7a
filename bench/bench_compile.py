"""torch.compile of the models: how long the first compile takes with every size dynamic
(dynamic=True) against only the batch marked dynamic, how many graphs other batch sizes and
resolutions add, and how far the compiled outputs are from eager.

    python bench/bench_compile.py [--models tf_efficientnet_cc_b0_8e,tf_efficientnet_b0]
                                  [--size 96] [--batches 3,5] [--sizes 128,112,97] [--out FILE]

Each (model, mode) is compiled in a fresh process (nothing cached in memory is shared; the
inductor's on-disk cache is turned off), with fullgraph=True, in inference (eval, no_grad).
Columns: seconds of the first call (compile + run), then the graphs compiled in all after the
calls at the other batch sizes and at the other resolutions, and the largest |compiled - eager|
relative to the largest |eager| over all calls.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from condconv_kernels.cli import parser
from condconv_kernels.profile.tables import write_result


def _measure(model_name: str, mode: str, size: int, batches, sizes) -> dict:
    """One (model, mode) in this process: compile, call at every shape, count graphs."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from condconv_kernels.models import create_model
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    x = torch.randn(2, 3, size, size)
    if mode == "dynamic=True":
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
    else:
        compiled = torch.compile(model, fullgraph=True)
        torch._dynamo.mark_dynamic(x, 0)
    worst = 0.0

    def call(inp):
        nonlocal worst
        with torch.no_grad():
            got = compiled(inp)
            want = model(inp)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    def log(what):
        print(f"  {model_name} ({mode}): {what}, {time.perf_counter() - begin:.1f} s",
              file=sys.stderr, flush=True)
    begin = start = time.perf_counter()
    call(x)
    first = time.perf_counter() - start
    log("first call")
    graphs = [counters["stats"]["unique_graphs"]]
    for b in batches:
        call(torch.randn(b, 3, size, size))
        log(f"batch {b}")
    graphs.append(counters["stats"]["unique_graphs"])
    start = time.perf_counter()
    for s in sizes:
        call(torch.randn(2, 3, s, s))
        log(f"side {s}")
    graphs.append(counters["stats"]["unique_graphs"])
    return {"model": model_name, "mode": mode, "first_s": first,
            "other_sizes_s": time.perf_counter() - start, "graphs": graphs,
            "max_rel_err": worst}


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--models", default="tf_efficientnet_cc_b0_8e,tf_efficientnet_b0,"
                                        "efficientnet_cc_b0_4e",
                   help="Comma-separated model names.")
    p.add_argument("--size", type=int, default=96, help="The image side of the first call.")
    p.add_argument("--batches", default="3,5", help="Other batch sizes to call with.")
    p.add_argument("--sizes", default="128,112,97",
                   help="Other image sides to call with (batch 2).")
    p.add_argument("--out", help="Write the table (markdown) and every number (JSON beside it).")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.one:  # a worker: one (model, mode), result as JSON on stdout's last line
        model_name, mode = args.one.split("|")
        print(json.dumps(_measure(model_name, mode, args.size, batches, sizes)))
        return 0
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    rows = []
    for model_name in args.models.split(","):
        for mode in ("batch dynamic", "dynamic=True"):
            print(f"compiling {model_name} ({mode}) ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--one", f"{model_name}|{mode}",
                                  "--size", str(args.size), "--batches", args.batches,
                                  "--sizes", args.sizes], env=env, capture_output=True,
                                 text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{model_name} ({mode}) failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch
    lines = [f"torch.compile(fullgraph=True), CPU, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; first call at batch 2, {args.size}x{args.size}; then batches "
             f"{args.batches} and sides {args.sizes}", "",
             "| model | mode | first call s | graphs after batches | graphs after sides | "
             "sides s | dynamic=True / batch-only | max rel err |", "|---|---|---|---|---|---|---|---|"]
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["mode"]] = r["first_s"]
    for r in rows:
        base = by_model[r["model"]].get("batch dynamic")
        ratio = f"{r['first_s'] / base:.2f}" if r["mode"] == "dynamic=True" and base else ""
        lines.append(f"| {r['model']} | {r['mode']} | {r['first_s']:.1f} | {r['graphs'][1]} | "
                     f"{r['graphs'][2]} | {r['other_sizes_s']:.1f} | {ratio} | "
                     f"{r['max_rel_err']:.1e} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_result(args.out, table, record=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
