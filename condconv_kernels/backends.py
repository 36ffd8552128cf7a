"""Which backend runs a call: availability per device, ``auto`` resolution and install hints.

| backend     | runs on                                    | implementation                       |
|-------------|--------------------------------------------|--------------------------------------|
| ``triton``  | CUDA (CPU under ``TRITON_INTERPRET=1``)    | fused Triton kernels (``triton/``)   |
| ``cuda``    | CUDA                                       | C++/CUDA kernels in ``csrc/cuda/``   |
| ``cpu``     | CPU                                        | C++ kernels in ``csrc/cpu/``         |
| ``reference`` | anywhere                                 | plain PyTorch (:mod:`.reference`)    |

``auto`` (the default; the environment variable ``CONDCONV_BACKEND`` overrides it) picks, on
CUDA: triton, else cuda, else reference; on CPU: cpu, else reference; for a call with
per-example scales the first of those that takes them (triton, cpu or reference: the cuda
backend does not). An explicitly named
backend that cannot run raises with the reason and how to get it.
"""
from __future__ import annotations

import importlib.util
from typing import List, Optional, Tuple

import torch

from . import _env

NAMES = ("triton", "cuda", "cpu", "reference")
# The backends that take the per-example scales (in_scale, out_scale, tap_scale).
TAKE_SCALES = ("triton", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
_REBUILD = "pip install -e . --no-build-isolation"
_NO_KERNELS = {  # the loaded extension lacks the device's kernels: how to get them
    "cpu": f"condconv_kernels._C has no CPU kernels; rebuild with `{_REBUILD}`",
    "cuda": (f"condconv_kernels._C was built without CUDA kernels: rebuild with `{_REBUILD}` "
             "where torch has CUDA and CUDA_HOME is set, without CONDCONV_SKIP_CUDA=1"),
}

_native_error: Optional[str] = None
try:
    from . import _C  # noqa: F401  (loads the library that registers torch.ops.condconv.native_*)
except ImportError as exc:  # the package still works with the reference backend
    _native_error = f"the C++ extension condconv_kernels._C did not load ({exc})"
if _native_error is None and _env.CUDA_CLUSTER != 1:
    torch.ops.condconv.cuda_pointwise_cluster(_env.CUDA_CLUSTER)
if _native_error is None and _env.CUDA_KGRAD != 0:
    torch.ops.condconv.cuda_pointwise_kgrad(_env.CUDA_KGRAD)


# Which devices the loaded extension has kernels for, read once (the registrations happen when
# _C loads), so that resolving a backend is plain Python that torch.compile traces through.
_NATIVE_KERNELS = {
    key: _native_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "condconv::native_forward", key)
    for key in ("CPU", "CUDA")
}


_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _has_native_kernel(dispatch_key: str) -> bool:
    return _NATIVE_KERNELS[dispatch_key]


def why_unavailable(name: str, device_type: str) -> Optional[str]:
    """None when backend ``name`` can run on ``device_type`` now, else the reason and the fix."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):  # the C++ extension's kernels for that device
        if device_type != name:
            return (f"backend '{name}' runs on {name.upper()} tensors only, got a {device_type} "
                    "tensor")
        if _native_error is not None:
            return f"{_native_error}; build it with `{_REBUILD}`"
        if not _has_native_kernel(name.upper()):
            return _NO_KERNELS[name]
        return None
    if name == "triton":
        if not _TRITON_FOUND:
            return "triton is not installed (`pip install triton`)"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and _env.TRITON_INTERPRET:
            return None
        return (f"backend 'triton' runs on CUDA tensors (on CPU tensors only under "
                f"TRITON_INTERPRET=1, the interpreter used for testing), got a {device_type} "
                "tensor")
    raise ValueError(f"condconv2d: argument 'backend' must be 'auto' or one of {NAMES}, "
                     f"got {name!r}")


def available_backends(device="cpu") -> List[str]:
    """The backends that can run on ``device`` (a torch.device or string) now, fastest first."""
    device_type = torch.device(device).type
    return [n for n in NAMES if why_unavailable(n, device_type) is None]


def resolve(backend: str, device_type: str, scaled: bool = False) -> str:
    """The concrete backend for a call on ``device_type``; ``scaled``: the call has per-example
    scales, which ``auto`` then gives to a backend that takes them (:data:`TAKE_SCALES`: on
    CUDA, triton where it is installed, else the reference backend)."""
    if not isinstance(backend, str):
        raise TypeError(f"condconv2d: argument 'backend' must be a string, "
                        f"got {type(backend).__name__}")
    if backend == "auto":
        backend = _env.backend_override()
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("reference",)):
            if why_unavailable(name, device_type) is None and (not scaled or
                                                               name in TAKE_SCALES):
                return name
        return "reference"
    reason = why_unavailable(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"condconv2d: backend {backend!r} is not available: {reason}")
    return backend


def native_status() -> Tuple[bool, Optional[str]]:
    """(loaded, error) for the C++ extension."""
    return _native_error is None, _native_error
