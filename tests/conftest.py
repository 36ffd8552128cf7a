"""Shared test helpers: the configuration matrix, input builders and the float64 ground truth."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional, Sequence, Tuple, Union

import pytest
import torch

# Without a GPU the triton backend runs in Triton's interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic mode (poisoned_outputs, the determinism tests) needs this for cuBLAS, read before
# the first cuBLAS handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import condconv_kernels as cc
from condconv_kernels import _args, reference


def fuzz_seed(variable: str, default: int = 20261127) -> int:
    """The seed of a fuzz test from the environment variable ``variable``: fixed by default, so
    that `make test` meets the same examples every run; "random" draws one (`make fuzz`)."""
    import random
    value = os.environ.get(variable, str(default))
    return random.randrange(2 ** 32) if value == "random" else int(value)


# Backends run by the generic CPU tests: the compiled ones. A backend that runs in Triton's
# interpreter (triton on CPU tensors) is ~1000x slower and has its curated test_triton.py.
INTERPRETED = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set()
CPU_BACKENDS = [b for b in cc.available_backends("cpu") if b not in INTERPRETED]


@dataclasses.dataclass(frozen=True)
class Case:
    """One convolution configuration."""
    name: str
    B: int = 3
    cin: int = 4
    cout: int = 6
    H: int = 7
    W: int = 13
    kernel: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    E: int = 4
    padding: Union[int, str, Tuple[int, ...]] = 1

    def __str__(self):
        return self.name


def _dw(name, channels=6, **kw):
    return Case(name, cin=channels, cout=kw.pop("cout", channels), groups=channels, **kw)


# Every kernel size 1/3/5, stride 1/2, dilation 1/2, groups 1/2/depthwise, bias on/off,
# E 1/4/8, odd H/W (7, 13), B 1/3 and symmetric / asymmetric / "same" / "valid" padding
# appear, several in combination.
CASES = [
    Case("k3"),
    Case("k1", kernel=(1, 1), padding=0),
    Case("k1_s2_e8", kernel=(1, 1), stride=(2, 2), padding=0, E=8),
    Case("k5_same", kernel=(5, 5), padding="same", H=13, W=7),
    Case("k5_s2_same_nobias", kernel=(5, 5), stride=(2, 2), padding="same", bias=False),
    Case("k3_s2_asym", stride=(2, 2), padding=(0, 1, 1, 2)),
    Case("k3_d2_e1", dilation=(2, 2), padding=2, E=1),
    Case("k3_d2_s2_same", dilation=(2, 2), stride=(2, 2), padding="same", H=13, W=13),
    Case("g2_s2_e8_b1", groups=2, stride=(2, 2), E=8, B=1),
    Case("g2_k1", groups=2, kernel=(1, 1), padding=0, bias=False),
    _dw("dw3"),
    _dw("dw5_s2_same_e8", kernel=(5, 5), stride=(2, 2), padding="same", E=8, H=13, W=13),
    _dw("dw_mult2_d2_asym", channels=4, cout=8, dilation=(2, 2), padding=(1, 0, 0, 1)),
    _dw("dw3_s2_b1_e1_nobias", B=1, stride=(2, 2), E=1, bias=False, H=13, W=13),
    Case("k1x3_rect", kernel=(1, 3), stride=(1, 2), padding=(0, 0, 1, 1)),
    Case("k3_valid_b1_e8", padding="valid", B=1, E=8, H=13, W=7),
    Case("k5_d2_s2_asym", kernel=(5, 5), dilation=(2, 2), stride=(2, 2), padding=(2, 1, 3, 0),
         H=13, W=13),
    Case("k3_bigpad", padding=3, bias=False),
]
CASES_BY_NAME = {c.name: c for c in CASES}
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def make_inputs(case: Case, dtype=torch.float64, layout="contiguous", seed=0,
                routing_dtype=None):
    """Fresh random (x, routing, weight, bias) for a case; x in the requested layout."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.B, case.cin, case.H, case.W)
    if layout == "sliced":
        big = torch.randn(case.B, case.cin + 3, case.H + 2, case.W + 3, generator=g)
        x = big[:, 2:2 + case.cin, 1:1 + case.H, 1:1 + case.W]
    else:
        x = torch.randn(shape, generator=g)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    routing = torch.rand(case.B, case.E, generator=g).to(routing_dtype or dtype)
    if layout == "sliced":  # a non-contiguous routing too
        routing = torch.rand(case.B, 2 * case.E, generator=g)[:, ::2].to(routing_dtype or dtype)
    wshape = (case.E, case.cout, case.cin // case.groups) + tuple(case.kernel)
    fan_in = (case.cin // case.groups) * case.kernel[0] * case.kernel[1]
    weight = (torch.randn(wshape, generator=g) / fan_in ** 0.5).to(dtype)
    bias = torch.randn(case.E, case.cout, generator=g).to(dtype) if case.bias else None
    return x, routing, weight, bias


def conv_args(case: Case, x: torch.Tensor):
    """(stride, padding4, dilation, groups) for the reference forms."""
    pad = _args.resolve_padding(case.padding, x.shape[-2:], case.kernel, case.stride,
                                case.dilation)
    return case.stride, pad, case.dilation, case.groups


def run_op(case: Case, inputs, backend: str, grad_out: Optional[torch.Tensor] = None):
    """Forward (and backward with grad_out) through the public op; returns (out, grads)."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    x, routing, weight, bias = leaves
    out = cc.condconv2d(x, routing, weight, bias, case.stride, case.padding, case.dilation,
                        case.groups, backend=backend)
    if grad_out is None:
        return out, None
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, grad_out)
    return out, list(grads)


def assert_repeatable(case: Case, inputs, backend: str, grad_out: torch.Tensor,
                      deterministic: bool, runs: int = 10):
    """``runs`` forward + backward passes under ``torch.use_deterministic_algorithms(
    deterministic)`` give bitwise-identical outputs and gradients."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        results = [run_op(case, inputs, backend, grad_out) for _ in range(runs)]
    finally:
        torch.use_deterministic_algorithms(was)
    out0, grads0 = results[0]
    for out, grads in results[1:]:
        assert torch.equal(out, out0)
        for g, g0 in zip(grads, grads0):
            assert torch.equal(g, g0)


def ground_truth(case: Case, inputs, grad_out: Optional[torch.Tensor] = None,
                 form=reference.condconv2d_loop, dtype=torch.float64):
    """The per-example loop in ``dtype`` with PyTorch's autograd: an independent computation."""
    leaves = [t.detach().to(dtype).requires_grad_(True) if t is not None else None
              for t in inputs]
    out = form(*leaves, *conv_args(case, leaves[0]))
    if grad_out is None:
        return out, None
    wanted = [t for t in leaves if t is not None]
    return out, list(torch.autograd.grad(out, wanted, grad_out.to(dtype)))


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor the kernels allocate without initialising comes filled with NaN (PyTorch's
    deterministic mode with fill_uninitialized_memory), so an element a kernel forgets to write
    shows up as NaN."""
    import torch.utils.deterministic as det
    was, was_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        det.fill_uninitialized_memory = was_fill


class LaunchRecorder:
    """A stand-in for a Triton / Gluon kernel ``kernel[grid](*args, **kwargs)``: records each
    launch as (grid, the arguments by parameter name, the keyword arguments) in ``launches``
    and runs ``emulate(grid, named, kwargs)``, which writes what the kernel would."""

    def __init__(self, kernel, emulate):
        self.params, self.emulate, self.launches = kernel.arg_names, emulate, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.params, args))
            self.launches.append((grid, named, kwargs))
            self.emulate(grid, named, kwargs)
        return launch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(ours: torch.Tensor, truth: torch.Tensor, same_precision: Optional[torch.Tensor],
                 name: str, factor: float = 3.0, atol: Optional[float] = None,
                 ulps: float = 64):
    """ours vs the float64 truth: within ``factor`` x the error of PyTorch's own computation in
    the same precision (``same_precision``), plus a floor of ``ulps`` ulps of the output scale
    (summation order; 64 of bfloat16's are half the scale: pass fewer to catch smaller
    errors)."""
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten output?)"
    err = max_err(ours, truth)
    scale = truth.abs().max().item() if truth.numel() else 1.0
    eps = torch.finfo(ours.dtype).eps
    floor = atol if atol is not None else ulps * eps * max(scale, 1.0)
    torch_err = max_err(same_precision, truth) if same_precision is not None else 0.0
    bound = factor * torch_err + floor
    print(f"{name}: max err {err:.3e} (torch same-precision {torch_err:.3e}, bound {bound:.3e})")
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def matrix(cases, layouts=("contiguous",), backends=None):
    """(backend, case, layout) parameters: the full product for compiled backends; for a
    backend running in an interpreter each case once, the layouts taken in turn."""
    out = []
    for b in backends or CPU_BACKENDS:
        for i, case in enumerate(cases):
            chosen = [layouts[i % len(layouts)]] if b in INTERPRETED else layouts
            out += [pytest.param(b, case, layout, id=f"{b}-{case}-{layout}") for layout in chosen]
    return out


def low_precision_dtypes(backend):
    """bfloat16 tl.dot is wrong in Triton's interpreter: bfloat16 is tested on the GPU there."""
    return [torch.float16] if backend in INTERPRETED else [torch.bfloat16, torch.float16]
