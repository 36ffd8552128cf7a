"""Timing harness: warm-up, then repeated runs summarised by median and quantiles.

CPU: ``torch.utils.benchmark.Timer.blocked_autorange``; CUDA: CUDA events around runs of many
back-to-back calls."""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
from typing import Callable, Dict

import torch
import torch.utils.benchmark as tbench

from .. import _env


# glibc's malloc returns large freed blocks to the OS (munmap, heap trimming) under thresholds
# that move with the allocation history, so whether a given call of a benchmarked function pays
# page faults for its outputs depends on what ran before it. Fixed thresholds make every
# variant run from warm pools, as with jemalloc/tcmalloc or in a steady training loop.
STABLE_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def reexec_with_stable_malloc() -> None:
    """Re-runs the current script with :data:`STABLE_MALLOC` in GLIBC_TUNABLES (read by glibc
    at process start only), unless it is already set or CONDCONV_MALLOC_AS_IS=1. For the
    benchmark scripts' ``__main__``; never call it from library code."""
    import sys
    if "GLIBC_TUNABLES" in os.environ or _env.malloc_as_is():
        return
    if platform.system() != "Linux":
        return
    env = dict(os.environ, GLIBC_TUNABLES=STABLE_MALLOC)
    print(f"re-running with GLIBC_TUNABLES={STABLE_MALLOC} (CONDCONV_MALLOC_AS_IS=1 to skip)",
          file=sys.stderr)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


@dataclasses.dataclass
class Measurement:
    median_ms: float
    q10_ms: float
    q90_ms: float
    runs: int


def _quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def time_callable(fn: Callable[[], object], device: str = "cpu", min_run_time: float = 0.3,
                  warmup: int = 2) -> Measurement:
    """Times ``fn()``; per-run times in milliseconds.

    CUDA: each sample is a pair of CUDA events around as many back-to-back calls as fill about
    ``CUDA_SAMPLE_MS`` (no synchronisation between calls, so launch latency overlaps the
    previous call's work as in a training loop), divided by the number of calls; samples are
    taken until ``min_run_time`` has passed (at least 5). Repeated calls on the same inputs
    measure a warm L2 cache where the inputs fit in it: rotate among input sets (as
    :func:`~condconv_kernels.profile.latency.layer_variants` does) to measure memory."""
    for _ in range(warmup):
        fn()
    if str(device).startswith("cuda"):
        times = _cuda_samples(fn, min_run_time)
    else:
        m = tbench.Timer(stmt="fn()", globals={"fn": fn},
                         num_threads=torch.get_num_threads()).blocked_autorange(
                             min_run_time=min_run_time)
        times = [t * 1e3 for t in m.times]
    return Measurement(statistics.median(times), _quantile(times, 0.1), _quantile(times, 0.9),
                       len(times))


CUDA_SAMPLE_MS = 5.0


def _cuda_samples(fn: Callable[[], object], min_run_time: float):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, min(1000, int(CUDA_SAMPLE_MS / max(start.elapsed_time(end), 1e-3))))
    times, total = [], 0.0
    while total < min_run_time * 1e3 or len(times) < 5:
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        times.append(ms / calls)
        total += ms
    return times


def cuda_graphed(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph and returned as the graph's replay: a call then
    costs no host work per kernel, so back-to-back replays time the device alone (what a training
    loop captured with ``torch.cuda.graph`` runs at). ``warmup`` calls first run on a side stream,
    as capture requires: autotuning, compilation and lazy initialisation happen there."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def graphed_variants(fns: Dict[str, Callable[[], object]], notes: list,
                     calls: int = 1) -> Dict[str, Callable[[], None]]:
    """Each variant as the replay of a CUDA graph of ``calls`` calls of it (:func:`cuda_graphed`);
    one whose capture fails is dropped, with a note naming the error appended to ``notes``."""
    graphed = {}
    for name, fn in fns.items():
        try:
            graphed[name] = cuda_graphed(fn if calls == 1 else
                                         (lambda fn=fn: [fn() for _ in range(calls)]))
        except Exception as exc:  # noqa: BLE001 -- reported, the other variants still run
            torch.cuda.synchronize()
            notes.append(f"{name}: CUDA graph capture failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160]})")
    return graphed


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str = "cpu",
                     min_run_time: float = 0.3, rounds: int = 3) -> Dict[str, Measurement]:
    """Times several variants in ``rounds`` alternating rounds (each round every variant for
    ``min_run_time / rounds`` seconds) and keeps, per variant, the round with the median time:
    slow drifts of a shared machine then hit every variant alike instead of the one that ran
    during them."""
    rounds = max(1, rounds)
    per_round: Dict[str, list] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(time_callable(fn, device, min_run_time / rounds))
    return {name: sorted(ms, key=lambda m: m.median_ms)[len(ms) // 2]
            for name, ms in per_round.items()}


def machine_info() -> Dict[str, str]:
    """What a benchmark number depends on: machine, threads, versions, commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    info = {"machine": platform.processor() or platform.machine(),
            "cpu_threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit or "unknown"}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
