"""Fills Triton's cache with every autotune configuration of the triton backend's kernels at the
benchmark's layer shapes, compiling in parallel processes, so that an autotuned benchmark run
after it only times the configurations instead of compiling them one after another.

    python bench/warm_triton.py [--batch 256] [--dtype bfloat16] [--channels-last] [--backward]
                                [--jobs 14] [--first N] [--stationary]

Worker j runs every layer once (forward, and backward with --backward) with
CONDCONV_TRITON_CONFIG = j mod the longest table's length, on every (jobs / that length)-th
layer: that launch compiles exactly the binary the autotuner compiles for that configuration
(condconv_kernels/triton/_config.py), into the same cache (TRITON_CACHE_DIR). The GPU does
little work here, so it can run beside other jobs that only need the CPUs; time nothing while it
runs. ``--stationary``: each layer again with CONDCONV_TRITON_STATIONARY on (the experts-
stationary kernel where it applies, and the dense kernel gradient without its routing half: its
own specialization). ``--device cpu --backend cpu`` walks the same steps on the CPU (the GPU
kit's dry run).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from condconv_kernels.cli import parser


def _worker(args) -> int:
    from unittest import mock

    import torch

    from condconv_kernels import _env
    from condconv_kernels.triton import stationary

    from condconv_kernels.profile import efficientnet_cc_b0_layers
    from condconv_kernels.profile.latency import layer_variants
    config, part, parts = (int(v) for v in args.worker.split(","))
    layers = efficientnet_cc_b0_layers(args.experts)[:args.first][part::parts]
    start, failed = time.time(), 0
    for layer in layers:  # a configuration that does not compile for one shape: the next
        try:
            fns = layer_variants(layer, args.batch, args.device, getattr(torch, args.dtype),
                                 args.backward, channels_last=args.channels_last)
            fns[f"fused:{args.backend}"]()
            if args.stationary:  # (the kernel_grad and mix passes' kernels compile in seconds
                # where they are first run; a fault of one here would cut the warming short)
                with mock.patch.object(_env, "TRITON_STATIONARY", stationary.PASSES):
                    fns[f"fused:{args.backend}"]()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 -- reported, then counted
            failed += 1
            print(f"config {config}, {layer.name}: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[-1] if str(exc) else ''}", flush=True)
    print(f"config {config}, layers {part}::{parts}: {len(layers) - failed} of {len(layers)} "
          f"layers in {time.time() - start:.1f} s", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=256, help="The batch size of the shapes.")
    p.add_argument("--experts", type=int, default=8, help="Experts per layer.")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="The dtype of the kernels to compile.")
    p.add_argument("--channels-last", action="store_true", help="Use channels_last inputs.")
    p.add_argument("--backward", action="store_true", help="Also the backward's kernels.")
    p.add_argument("--jobs", type=int, default=14, help="Worker processes.")
    p.add_argument("--first", type=int, help="Only the first N layers.")
    p.add_argument("--device", default="cuda", help="Where the kernels run.")
    p.add_argument("--backend", default="triton", help="The condconv2d backend to warm.")
    p.add_argument("--stationary", action="store_true",
                   help="Also each layer with the experts-stationary kernel switched on (its "
                        "forward, grad_x and routing passes).")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "config,part,parts": one worker
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.worker:
        return _worker(args)
    from condconv_kernels.triton._config import MAX_CONFIGS as CONFIGS
    parts = max(1, args.jobs // CONFIGS)
    own = list(argv if argv is not None else sys.argv[1:])
    procs = []
    for config in range(min(args.jobs, CONFIGS)):
        for part in range(parts):
            env = dict(os.environ, CONDCONV_TRITON_CONFIG=str(config))
            cmd = [sys.executable, os.path.abspath(__file__), *own,
                   "--worker", f"{config},{part},{parts}"]
            procs.append(subprocess.Popen(cmd, env=env))
    start = time.time()
    failed = sum(proc.wait() != 0 for proc in procs)
    cache = os.environ.get("TRITON_CACHE_DIR", "")
    files = sum(len(f) for _, _, f in os.walk(cache)) if cache and os.path.isdir(cache) else 0
    print(f"warmed: {len(procs)} workers, {failed} failed, {time.time() - start:.0f} s; "
          f"Triton cache {cache or '(default)'}: {files} files")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
