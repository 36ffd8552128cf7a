"""Runs each of the cuda backend's unmeasured Hopper kernels once, each in a process of its own
with a time limit, before the GPU kit's benchmarks time them: a kernel that traps (which leaves
its process's CUDA context unusable) or hangs would otherwise end every benchmark row after it.

    python bench/hopper_probe.py [--probes cluster,wgmma,kgrad] [--timeout 20] [--env FILE]
                                  [--out FILE.md]

The probes, on s6.b1.expand's shape (192 -> 1152 channels at 7x7, 8 experts) at a batch of 12,
bfloat16, channels_last, against the float64 reference:

- ``cluster``: the clustered kernel (``csrc/cuda/pointwise_cluster.cuh``, the cluster switch's
  mode 1, the cuda backend's default on a Hopper GPU), forward and grad_x;
- ``wgmma``: the wgmma kernel (``pointwise_wgmma.cuh``, mode 3; not built without sm_90a code);
- ``kgrad``: the 1x1 kernel gradient's kernel (``pointwise_kgrad.cuh``), grad_routing and
  grad_weight.

Each ends as ``ok``, ``wrong`` (it ran, its result is off; its timings still say how fast it
is: the benchmarks keep it, and the pointwise table's max diff shows it), ``not taken`` (the
kernel did not take the call: not a Hopper GPU, not built, or not eligible), ``crashed`` (the
process died or raised: a trap, an illegal address, a launch error) or ``hung`` (past the time
limit). The probes' processes run at once (a trap or a hang stays in its own process).
``--env FILE`` writes what the kit's later steps source: where ``cluster`` crashed or hung,
``CONDCONV_CUDA_CLUSTER=0`` (the cuda backend's tiled kernels instead), and in ``HOPPER_SKIP``
the columns of ``bench/bench_pointwise.py --skip`` whose kernel crashed or hung; it is written
before the probes start too, every kernel off, so that a run killed half-way leaves them off.
Without CUDA (the kit's dry run) each probe runs its calls on the CPU backend, which stands in
for the kernel, and ends ``not taken``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

from condconv_kernels.cli import parser

PROBES = ("cluster", "wgmma", "kgrad")
KERNELS = {"cluster": "pointwise_cluster_kernel", "wgmma": "pointwise_wgmma_kernel",
           "kgrad": "pointwise_kgrad_kernel"}
# The kernel's launches a probe's calls make: forward and grad_x, or one for both kernel
# gradients.
LAUNCHES = {"cluster": 2, "wgmma": 2, "kgrad": 1}
# The bench_pointwise column of each probe's kernel.
COLUMNS = {"cluster": "cluster", "wgmma": "wgmma", "kgrad": "cuda kgrad"}
# The statuses that turn a kernel off for the later steps ("unprobed": not yet run, so that a
# probe killed half-way leaves the kernels it did not reach off).
FAILED = ("crashed", "hung", "unprobed")
TOLERANCE = 2e-2  # of the result's scale: bfloat16 products over 192-1152 terms


def _case(device: str):
    """s6.b1.expand's shape at a batch of 12 (three blocks of four examples: one cluster, one
    block of it empty), bfloat16, channels_last: x, routing, weight, grad_out."""
    import torch
    g = torch.Generator().manual_seed(0)
    B, cin, cout, side, E = 12, 192, 1152, 7, 8
    cl = torch.channels_last
    x = torch.randn(B, cin, side, side, generator=g).to(device, torch.bfloat16,
                                                        memory_format=cl)
    routing = torch.rand(B, E, generator=g).to(device)
    weight = (torch.randn(E, cout, cin, 1, 1, generator=g) / cin ** 0.5).to(device,
                                                                           torch.bfloat16)
    grad_out = torch.randn(B, cout, side, side, generator=g).to(device, torch.bfloat16,
                                                                memory_format=cl)
    return x, routing, weight, grad_out


def _off(got, want) -> float:
    """The largest difference of ``got`` from the float64 ``want``, over want's scale."""
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _launches(prof, kernel: str) -> int:
    """How many times the profile saw ``kernel`` launched."""
    return sum(e.count for e in prof.key_averages() if kernel in e.key)


def probe(name: str) -> Dict[str, object]:
    """Runs one probe in this process: {"status": ok | wrong | not taken, "detail": ...}."""
    import torch

    import condconv_kernels as cc
    from condconv_kernels import reference
    cuda = torch.cuda.is_available()
    device, backend = ("cuda", "cuda") if cuda else ("cpu", "cpu")
    x, routing, weight, grad_out = _case(device)
    geometry = ([1, 1], [0] * 4, [1, 1], 1)
    switch = torch.ops.condconv.cuda_pointwise_cluster
    kgrad = torch.ops.condconv.cuda_pointwise_kgrad
    if name == "wgmma":
        try:
            switch(3)
        except RuntimeError as exc:  # a build without sm_90a code
            return {"status": "not taken", "detail": f"not built: {exc}".splitlines()[0]}
    else:
        switch(1)
    kgrad(1 if name == "kgrad" else 0)

    def backward(mask):
        return torch.ops.condconv.condconv2d_backward(grad_out, x, routing, weight, None,
                                                      *geometry, backend, mask, None, None,
                                                      None)
    activities = [torch.profiler.ProfilerActivity.CUDA if cuda else
                  torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        if name == "kgrad":
            _, gr, gw, *_ = backward([False, True, True, False])
            results = {"grad_routing": gr, "grad_weight": gw}
        else:
            out = cc.condconv2d(x, routing, weight, None, backend=backend)
            results = {"forward": out, "grad_x": backward([True, False, False, False])[0]}
        if cuda:
            torch.cuda.synchronize()
    args64 = [t.double().cpu() for t in (x, routing, weight)]
    want = {"forward": lambda: reference.forward(*args64, None, *geometry),
            "grad_x": lambda: reference.backward(grad_out.double().cpu(), *args64, None,
                                                 *geometry, [True, False, False, False])[0],
            "grad_routing": lambda: reference.backward(grad_out.double().cpu(), *args64, None,
                                                       *geometry,
                                                       [False, True, False, False])[1],
            "grad_weight": lambda: reference.backward(grad_out.double().cpu(), *args64, None,
                                                      *geometry,
                                                      [False, False, True, False])[2]}
    offs = {k: _off(v, want[k]()) for k, v in results.items()}
    detail = ", ".join(f"{k} off by {v:.1e} of its scale" for k, v in offs.items())
    launches = _launches(prof, KERNELS[name])
    if launches != LAUNCHES[name]:
        return {"status": "not taken", "detail": f"{KERNELS[name]} launched {launches} times, "
                                                 f"{LAUNCHES[name]} expected; {detail}"}
    ok = all(v <= TOLERANCE for v in offs.values())
    return {"status": "ok" if ok else "wrong", "detail": detail}


def command(name: str) -> List[str]:
    """The command line of one probe's process."""
    return [sys.executable, str(Path(__file__).resolve()), "--one", name]


def _result(proc: subprocess.Popen, out, err, seconds: float) -> Dict[str, object]:
    """An ended probe's result from its exit status and output files."""
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((stderr or stdout).strip().splitlines()[-2:])
        return {"status": "crashed", "detail": f"exit status {proc.returncode}: {tail}",
                "seconds": seconds}
    return {**json.loads(lines[-1]), "seconds": seconds}


def run_all(names: Sequence[str], timeout: float, poll: float = 0.05
            ) -> Dict[str, Dict[str, object]]:
    """The probes ``names``, each in a process of its own, all at once (a kernel's trap or hang
    stays in its process), each within ``timeout`` seconds of its start: their results with the
    seconds each took; ``crashed`` where a process died, raised or printed no result, ``hung``
    where it ran past the limit (then killed). Their output goes to files (no pipe to fill),
    and each is watched against its own deadline."""
    procs = {}
    for name in names:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        procs[name] = (subprocess.Popen(command(name), stdout=out, stderr=err), out, err,
                       time.monotonic())
    results: Dict[str, Dict[str, object]] = {}
    try:
        while len(results) < len(procs):
            for name, (proc, out, err, t0) in procs.items():
                if name in results:
                    continue
                now = time.monotonic()
                if proc.poll() is not None:
                    results[name] = _result(proc, out, err, now - t0)
                elif now - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    results[name] = {"status": "hung", "detail": f"killed after {timeout:.0f} s",
                                     "seconds": now - t0}
            time.sleep(poll)
    finally:
        for proc, out, err, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
    return {name: results[name] for name in names}


def run(name: str, timeout: float) -> Dict[str, object]:
    """One probe (:func:`run_all`)."""
    return run_all([name], timeout)[name]


def env_lines(results: Dict[str, Dict[str, object]]) -> List[str]:
    """The shell lines the kit's later steps source: the cluster switch off where the clustered
    kernel crashed or hung, and the pointwise table's columns to skip."""
    failed = [name for name in PROBES if results.get(name, {}).get("status") in FAILED]
    lines = [f"# bench/hopper_probe.py: {', '.join(failed) or 'nothing'} crashed, hung or "
             "not yet probed"]
    if "cluster" in failed:
        lines.append("export CONDCONV_CUDA_CLUSTER=0")
    lines.append(f"export HOPPER_SKIP='{','.join(COLUMNS[n] for n in failed)}'")
    return lines


def table(results: Dict[str, Dict[str, object]]) -> str:
    rows = ["| probe | kernel | status | seconds | detail |", "|---|---|---|---|---|"]
    for name, r in results.items():
        detail = str(r["detail"]).replace("|", "/")
        rows.append(f"| {name} | {KERNELS[name]} | {r['status']} | {r['seconds']:.1f} | "
                    f"{detail} |")
    return "\n".join(rows)


def main(argv: Sequence[str] = None) -> None:
    p = parser(__doc__)
    p.add_argument("--probes", default=",".join(PROBES),
                   help="Comma-separated probes to run, of " + ", ".join(PROBES) + ".")
    p.add_argument("--timeout", type=float, default=20.0,
                   help="Seconds each probe's process may take before it counts as hung.")
    p.add_argument("--env", help="A file to write the shell lines the kit's later steps source.")
    p.add_argument("--out", help="A Markdown file to write the table to.")
    p.add_argument("--unprobed", action="store_true",
                   help="Only write --env's lines with every probe not yet run (every kernel "
                        "off): what the kit's later steps read if the probe never gets to "
                        "write its own.")
    p.add_argument("--one", choices=PROBES,
                   help="Run this probe here and print its result as JSON (what each probe's "
                        "process runs).")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(probe(args.one)), flush=True)
        return
    names = [n.strip() for n in args.probes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PROBES))
    if unknown:
        p.error(f"--probes: unknown {', '.join(unknown)}; have {', '.join(PROBES)}")
    results = {name: {"status": "unprobed", "detail": "", "seconds": 0.0} for name in names}
    if args.unprobed:
        if not args.env:
            p.error("--unprobed writes --env's file: give --env")
        Path(args.env).write_text("\n".join(env_lines(results)) + "\n")
        return
    if args.env:  # every kernel off until the verdicts are in
        Path(args.env).write_text("\n".join(env_lines(results)) + "\n")
    results = run_all(names, args.timeout)
    for name, r in results.items():
        print(f"{name}: {r['status']} ({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
    text = ("The cuda backend's Hopper kernels, each run once in a process of its own "
            f"(bench/hopper_probe.py, limit {args.timeout:.0f} s)\n\n" + table(results) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.env:
        Path(args.env).write_text("\n".join(env_lines(results)) + "\n")


if __name__ == "__main__":
    main()
