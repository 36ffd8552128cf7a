"""The triton backend's host path on a machine without a GPU: :func:`install` replaces
Triton's driver with one that compiles every kernel for an NVIDIA architecture (sm_90 by
default, as on an H100) and launches nothing, so that ``condconv_kernels.triton.forward`` and
``backward`` run on CPU tensors through everything the host does for a launch on the GPU: the
launchers' argument handling and allocations, the autotuner's cache lookup, Triton's argument
binding, specialisation and kernel-cache lookup. What is left out is the device and the
driver call itself (``cuLaunchKernel``, a few microseconds).

For a process of its own that only measures host time (``bench/bench_host_overhead.py
--dry-run``): it cannot be undone, the kernels' outputs are never written, and torch's work on
the CPU stands for its launches on the GPU. The autotuner "times" every configuration alike
and keeps the first of its table (only that one is compiled). Its results and the compiled
kernels go to a cache directory of their own, so that a later autotuned run on a GPU never
reads these timings.
"""
from __future__ import annotations

import collections
import os
from typing import Counter

from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from .. import _env
from . import _config

# Launches by kernel name since install().
LAUNCHES: Counter[str] = collections.Counter()


class _Utils:
    """What Triton asks of a driver's utilities: loading a binary (nothing is loaded) and the
    device's properties (the architecture's shared memory a block, an H100's SM count)."""

    def __init__(self, shared_bytes: int):
        self.shared_bytes = shared_bytes

    def load_binary(self, name, kernel, shared, device):
        return name, name, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": self.shared_bytes, "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32}


class _NoDevice:
    """A Triton driver for ``sm_<arch>`` with no device behind it: launches are counted in
    :data:`LAUNCHES` and do nothing, benchmarks take no time."""

    dry_run = True  # (what _config.device_shared asks of the active driver)

    def __init__(self, arch: int):
        self.utils = _Utils(_config.SHARED_BYTES.get(arch, _config.SHARED_LIMIT))
        self.target = GPUTarget("cuda", arch, 32)

        def launcher(src, metadata):
            name = metadata.name

            def launch(*args):
                LAUNCHES[name] += 1
            return launch
        self.launcher_cls = launcher

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kwargs):  # nothing compiled but what is launched
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        import torch
        return torch.empty(1)

    def clear_cache(self, cache):
        pass


def install(arch: int = 90) -> None:
    """Makes this process's Triton launches dry runs for ``sm_<arch>`` (see the module), whose
    blocks may use ``_config.SHARED_BYTES[arch]`` bytes of shared memory (a launch needing more
    raises Triton's OutOfResources, as on that GPU)."""
    if _env.TRITON_INTERPRET:
        raise RuntimeError("condconv_kernels.triton.dry_run: needs a process without "
                           "TRITON_INTERPRET=1 (the interpreter runs the kernels instead)")
    knobs.cache.dir = os.path.join(knobs.cache.home_dir, ".triton", "condconv-dry-run")
    driver.set_active(_NoDevice(arch))
