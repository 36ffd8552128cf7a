"""Every environment variable the package reads, each read here once (the README's table of
switches lists them with the build's and the tests' own).

- ``TRITON_INTERPRET=1``: Triton's interpreter; the ``triton`` backend then runs on CPU tensors
  (for tests). Read at import, as Triton itself reads it when the kernels are defined.
- ``CONDCONV_TRITON_AUTOTUNE=0``: launch the first configuration of each Triton table instead
  of autotuning (one compile per shape: test runs).
- ``CONDCONV_TRITON_CONFIG=i``: launch the i-th configuration of each table (modulo its length),
  without autotuning (``bench/warm_triton.py`` fills Triton's cache this way).
- ``CONDCONV_TRITON_STATIONARY=1`` (or ``all``): the dense 1x1 forward, grad_x and grad_routing
  take the experimental Hopper kernel with the experts stationary in shared memory where it
  applies (:mod:`condconv_kernels.triton.stationary`; off: slower than the dense kernels on
  7 of the 8 passes measured on an H200), and the dense 1x1 kernel gradient the experimental
  Hopper kernel with its tiles in the tensor cores' accumulator layout
  (:mod:`condconv_kernels.triton.pointwise_grad`; off: 1.35-1.8x slower than the dense kernel
  on an H200), and
  the dense 1x1 forward and grad_x of planes of at most 256 pixels the experimental Hopper
  kernel with the experts stationary and their mix on the tensor cores
  (:mod:`condconv_kernels.triton.stationary_mix`, pass ``mix``; ahead of the ``forward`` and
  ``grad_x`` passes where both are on; off until the per-layer forward without a bias is
  measured: on an H200 its grad_x took 0.78x the dense kernel's time, a forward with a bias
  1.45x). A
  comma-separated subset of ``forward``, ``grad_x``, ``routing``, ``kernel_grad``, ``mix``
  turns on those passes only.
  Read at import into ``TRITON_STATIONARY`` (the set of passes), which the triton backend
  reads at every call.
- ``CONDCONV_TRITON_BATCHED=1`` (or ``all``): the dense 1x1 forward, grad_x and kernel
  gradient (grad_weight, grad_routing) of float16 / bfloat16 layers as batched matrix products
  through cuBLAS over chunks of examples (:mod:`condconv_kernels.triton.batched`) instead of
  the dense Triton kernels; off until a GPU run has measured it. A comma-separated subset of
  ``forward``, ``grad_x``, ``kernel_grad`` turns on those passes only. Read at import into
  ``TRITON_BATCHED`` (the set of passes), which the triton backend reads at every call.
- ``CONDCONV_TRITON_CLUSTER=1`` (or ``all``): the triton backend's dense 1x1 forward, grad_x
  and kernel gradient of float16 / bfloat16 channels_last layers on a Hopper GPU through the
  cuda backend's Hopper kernels (:mod:`condconv_kernels.triton.cluster`): the forward and
  grad_x through the clustered kernel the cluster switch, ``CONDCONV_CUDA_CLUSTER``, names, the
  kernel gradient through the kernel-gradient kernel where its switch, ``CONDCONV_CUDA_KGRAD``,
  is on (else Triton's), instead of the dense Triton kernels; off until a GPU run has timed
  them. A comma-separated subset of ``forward``, ``grad_x``, ``kernel_grad`` turns on those
  passes only. Read at import into ``TRITON_CLUSTER`` (the set of passes), which the triton
  backend reads at every call.
- ``CONDCONV_TRITON_DIRECT_LAUNCH=0``: every tuned Triton launch goes through Triton's own
  launch path, never the direct launch of a kernel Triton has compiled for those arguments
  (:class:`condconv_kernels.triton._config.TunedKernel`), nor a replay of an earlier call's
  launches (:mod:`condconv_kernels.triton._replay`). Read at import.
- ``CONDCONV_CUDA_CLUSTER``: whether the cuda backend's dense 1x1 forward and grad_x of
  float16 / bfloat16 channels_last calls take the clustered Hopper kernel
  (``csrc/cuda/pointwise_cluster.cuh``) and in which form: ``1`` (the default) its products
  through ldmatrix and mma.sync, ``wmma`` through wmma, ``wgmma`` the kernel whose mix is made in
  registers for wgmma (``csrc/cuda/pointwise_wgmma.cuh``; an extension built with
  ``TORCH_CUDA_ARCH_LIST=9.0a``, else loading the package fails naming it), ``0`` never (the
  tiled kernels). Read at import into ``CUDA_CLUSTER`` (0, 1, 2 or 3), which :mod:`condconv_kernels.backends` passes to the
  extension when it loads (``torch.ops.condconv.cuda_pointwise_cluster``, which a process may
  call to change it).
- ``CONDCONV_CUDA_KGRAD=1``: the cuda backend's dense 1x1 kernel gradient of float16 / bfloat16
  channels_last calls on a Hopper GPU takes ``csrc/cuda/pointwise_kgrad.cuh``'s kernel (each
  example's G on the tensor cores, folded into the experts' and the routing's gradients in
  registers) instead of the chunked G; off (``0``) until a GPU run has timed it. Read at import
  into ``CUDA_KGRAD`` (0 or 1), which :mod:`condconv_kernels.backends` passes to the extension
  when it loads (``torch.ops.condconv.cuda_pointwise_kgrad``, which a process may call to
  change it).
- ``CONDCONV_BACKEND``: what ``backend="auto"`` means; read at every call
  (:func:`backend_override`), so a process may change it.
- ``CONDCONV_MALLOC_AS_IS=1``: the benchmark scripts keep the C allocator's settings instead of
  re-running themselves with stable ones (:func:`malloc_as_is`).
"""
from __future__ import annotations

import os
from typing import Optional


def _forced_config() -> Optional[int]:
    value = os.environ.get("CONDCONV_TRITON_CONFIG", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError("CONDCONV_TRITON_CONFIG must be a configuration index (0, 1, ...), "
                         f"got {value!r}")
    return int(value)


TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_CONFIG = _forced_config()
TRITON_AUTOTUNE = (os.environ.get("CONDCONV_TRITON_AUTOTUNE", "1") != "0"
                   and TRITON_CONFIG is None)
TRITON_DIRECT_LAUNCH = os.environ.get("CONDCONV_TRITON_DIRECT_LAUNCH", "1") != "0"
# The passes the experimental Hopper kernels (CONDCONV_TRITON_STATIONARY) and the batched
# products (CONDCONV_TRITON_BATCHED) may take.
STATIONARY_PASSES = frozenset({"forward", "grad_x", "routing", "kernel_grad", "mix"})
BATCHED_PASSES = frozenset({"forward", "grad_x", "kernel_grad"})
CLUSTER_PASSES = frozenset({"forward", "grad_x", "kernel_grad"})


def passes(name: str, value: str, allowed: frozenset) -> frozenset:
    """The passes a value of the variable ``name`` turns on: none for "" or "0", all of
    ``allowed`` for "1" or "all", else the comma-separated names (of ``allowed``)."""
    value = value.strip().lower()
    if value in ("", "0"):
        return frozenset()
    if value in ("1", "all"):
        return allowed
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = names - allowed
    if unknown or not names:
        raise ValueError(f"{name} must be 0, 1, all or a comma-separated subset of "
                         f"{', '.join(sorted(allowed))}; got {value!r}")
    return names


def stationary_passes(value: str) -> frozenset:
    """The passes a CONDCONV_TRITON_STATIONARY value turns on (:func:`passes`)."""
    return passes("CONDCONV_TRITON_STATIONARY", value, STATIONARY_PASSES)


def batched_passes(value: str) -> frozenset:
    """The passes a CONDCONV_TRITON_BATCHED value turns on (:func:`passes`)."""
    return passes("CONDCONV_TRITON_BATCHED", value, BATCHED_PASSES)


def cluster_passes(value: str) -> frozenset:
    """The passes a CONDCONV_TRITON_CLUSTER value turns on (:func:`passes`)."""
    return passes("CONDCONV_TRITON_CLUSTER", value, CLUSTER_PASSES)


CLUSTER_MODES = {"0": 0, "1": 1, "wmma": 2, "wgmma": 3}


def cluster_mode(value: str) -> int:
    """The mode a CONDCONV_CUDA_CLUSTER value names (``CLUSTER_MODES``; empty: the default)."""
    value = value.strip().lower() or "1"
    if value not in CLUSTER_MODES:
        raise ValueError(f"CONDCONV_CUDA_CLUSTER must be one of {', '.join(CLUSTER_MODES)}; "
                         f"got {value!r}")
    return CLUSTER_MODES[value]


CUDA_CLUSTER = cluster_mode(os.environ.get("CONDCONV_CUDA_CLUSTER", "1"))


def kgrad_mode(value: str) -> int:
    """The mode a CONDCONV_CUDA_KGRAD value names: 0 (off; also empty) or 1 (on)."""
    value = value.strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"CONDCONV_CUDA_KGRAD must be 0 or 1; got {value!r}")
    return int(value)


CUDA_KGRAD = kgrad_mode(os.environ.get("CONDCONV_CUDA_KGRAD", "0"))
TRITON_STATIONARY = stationary_passes(os.environ.get("CONDCONV_TRITON_STATIONARY", "0"))
TRITON_BATCHED = batched_passes(os.environ.get("CONDCONV_TRITON_BATCHED", "0"))
TRITON_CLUSTER = cluster_passes(os.environ.get("CONDCONV_TRITON_CLUSTER", "0"))


def malloc_as_is() -> bool:
    """Whether ``CONDCONV_MALLOC_AS_IS=1`` (read when a benchmark starts)."""
    return os.environ.get("CONDCONV_MALLOC_AS_IS") == "1"


def backend_override() -> str:
    """The backend ``auto`` stands for: ``CONDCONV_BACKEND``, or ``auto`` when unset or empty."""
    return os.environ.get("CONDCONV_BACKEND", "auto") or "auto"
