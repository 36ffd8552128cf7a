"""The guards around ATen CPU convolution bugs (torch 2.13, oneDNN 3.x): the cpu backend
(csrc/cpu/aten_grouped.h, aten_convolution) and the reference backend
(condconv_kernels/reference.py, _conv_dtype) run the affected float16/bfloat16 convolutions in
float32. Each case is checked against the float64 computation, forward and gradients.

- bfloat16, a single convolution group and an odd Cin/groups (B = 1, groups = 1): oneDNN's
  "first convolution" kernel spreads a NaN/Inf in x to outputs whose window does not contain it
  (reproduced on AVX512-BF16 CPUs);
- float16/bfloat16 inputs 1 or 2 pixels high or wide: reported to segfault (float16 1x1 input,
  stride (1, 2), padding 1, dilation 2) or return values 60-150% off (bfloat16, 3x3/5x5 kernels,
  stride 2, padding k // 2) on other CPUs. The crash case runs in a subprocess, so that a
  regression fails the test instead of killing pytest.
"""
import itertools
import subprocess
import sys
import textwrap

import pytest
import torch

import condconv_kernels as cc
from condconv_kernels import _args, reference
from conftest import CPU_BACKENDS

LOW = [torch.bfloat16, torch.float16]


def _truth(x, r, w, b, stride, pad, dilation, groups, grad_out=None):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in (x, r, w, b)]
    out = reference.condconv2d_loop(*leaves, stride, pad, dilation, groups)
    if grad_out is None:
        return out, None
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.double())


def _run(x, r, w, b, stride, padding, dilation, groups, backend, grad_out):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, r, w, b)]
    out = cc.condconv2d(*leaves, stride, padding, dilation, groups, backend=backend)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
    return out, grads


def _rel(a, t):
    return ((a.double() - t).norm() / t.norm().clamp_min(1e-12)).item()


# (B, Cin, Cout, H, W, k, stride, padding, dilation, groups): the reported shapes, the mapped
# NaN-leak shapes, and neighbours just outside each condition (which keep the fast path).
SMALL_INPUTS = [
    (1, 3, 4, 9, 1, 5, 2, "same", 1, 1),     # the reported bfloat16 case
    (1, 3, 4, 9, 2, 3, 2, 1, 1, 1),
    (2, 6, 4, 1, 1, 1, (1, 2), 1, 2, 2),     # the reported float16 crash, through condconv2d
    (2, 4, 4, 2, 7, 3, 2, 1, 1, 1),
    (1, 4, 4, 7, 7, 3, 2, 1, 1, 4),          # depthwise, B = 1: the grouped depthwise path
    (1, 1, 2, 8, 8, 3, 1, 0, 1, 1),          # odd Cin, one group: the NaN leak
    (1, 3, 3, 8, 5, 3, (1, 2), 1, (1, 2), 1),
    (1, 5, 2, 6, 6, 5, 1, 2, 1, 1),
    (2, 3, 4, 8, 8, 3, 1, 1, 1, 1),          # odd Cin but two examples: not affected
    (1, 6, 4, 8, 8, 3, 1, 1, 1, 2),          # odd Cin/groups, two groups: not affected
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", SMALL_INPUTS, ids=[str(i) for i in range(len(SMALL_INPUTS))])
def test_low_precision_small_inputs_match_float64(case, backend, dtype):
    B, cin, cout, H, W, k, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cin, H, W, generator=g).to(dtype)
    r = torch.rand(B, 3, generator=g).to(dtype)
    w = (torch.randn(3, cout, cin // groups, k, k, generator=g) / k).to(dtype)
    b = torch.randn(3, cout, generator=g).to(dtype)
    s2, d2 = _args.pair(stride, "stride", 1), _args.pair(dilation, "dilation", 1)
    pad = _args.resolve_padding(padding, (H, W), (k, k), s2, d2)
    truth, _ = _truth(x, r, w, b, s2, pad, d2, groups)
    grad_out = torch.randn(truth.shape, generator=g).to(dtype)
    truth, truth_grads = _truth(x, r, w, b, s2, pad, d2, groups, grad_out)
    out, grads = _run(x, r, w, b, stride, padding, dilation, groups, backend, grad_out)
    tol = 0.03 if dtype == torch.bfloat16 else 0.005
    assert _rel(out, truth) < tol, _rel(out, truth)
    for i, (a, t) in enumerate(zip(grads, truth_grads)):
        assert _rel(a, t) < tol, (i, _rel(a, t))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 2, 8, 8, 3, 1, 0, 1), (1, 3, 4, 9, 5, 3, 2, 1, 1),
                                   (1, 1, 1, 10, 9, 3, 3, 0, 1), (1, 5, 2, 7, 7, 5, 1, 2, 2)],
                         ids=["cin1", "cin3_s2", "cin1_s3", "cin5_d2"])
def test_bfloat16_nan_stays_in_its_windows(shape, backend):
    """A NaN or Inf at any pixel of x makes NaN exactly the outputs whose window holds it
    (as float64 does), forward; the gradients' non-finite positions match float64's too."""
    B, cin, cout, H, W, k, s, p, d = shape
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, cout, cin, k, k, generator=g).bfloat16()
    r = torch.rand(B, 2, generator=g).bfloat16()
    positions = list(itertools.product(range(B), range(cin), range(H), range(W)))
    for i, pos in enumerate(positions[::3]):
        x = torch.randn(B, cin, H, W, generator=g)
        x[pos] = float("nan") if i % 2 else float("inf")
        x = x.bfloat16()
        truth, _ = _truth(x, r, w, None, (s, s), (p,) * 4, (d, d), 1)
        grad_out = torch.randn(truth.shape, generator=g).bfloat16()
        truth, truth_grads = _truth(x, r, w, None, (s, s), (p,) * 4, (d, d), 1, grad_out)
        out, grads = _run(x, r, w, None, s, p, d, 1, backend, grad_out)
        assert torch.equal(out.isfinite(), truth.isfinite()), pos
        for a, t in zip(grads, truth_grads):
            assert torch.equal(a.isfinite(), t.isfinite()), pos


CRASH = textwrap.dedent("""
    import torch
    import condconv_kernels as cc
    x = torch.randn(2, 6, 1, 1).half()
    r = torch.rand(2, 2).half()
    w = torch.randn(2, 4, 3, 1, 1).half()
    for backend in {backends!r}:
        for t in (x, r, w):
            t.requires_grad_(True)
        out = cc.condconv2d(x, r, w, stride=(1, 2), padding=1, dilation=2, groups=2,
                            backend=backend)
        assert out.shape == (2, 4, 3, 2) and (out == 0).all(), out
        out.sum().backward()
    print("survived")
""")


def test_float16_tiny_input_does_not_crash():
    """The reported segfault (float16, 1x1 input, stride (1, 2), padding 1, dilation 2), in a
    subprocess: a crash fails this test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", CRASH.format(backends=CPU_BACKENDS)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "survived" in proc.stdout, (
        f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}")


def test_guard_leaves_the_common_cases_alone():
    """The reference's float32 detour applies to exactly the mapped conditions."""
    def dtype(shape, dtype, groups, cin_g):
        return reference._conv_dtype(torch.empty(shape, dtype=dtype), groups, cin_g)
    assert dtype((1, 3, 9, 1), torch.bfloat16, 1, 3) == torch.float32
    assert dtype((1, 12, 1, 1), torch.float16, 2, 6) == torch.float32
    assert dtype((1, 3, 8, 8), torch.bfloat16, 1, 3) == torch.float32
    assert dtype((1, 6, 8, 8), torch.bfloat16, 2, 3) == torch.bfloat16
    assert dtype((1, 4, 8, 8), torch.bfloat16, 1, 4) == torch.bfloat16
    assert dtype((1, 3, 8, 8), torch.float16, 1, 3) == torch.float16
    assert dtype((1, 3, 1, 1), torch.float32, 1, 3) == torch.float32
    assert dtype((1, 3, 1, 1), torch.float64, 1, 3) == torch.float64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_routing_reaches_windows_in_the_padding(backend, layout):
    """A NaN routing weight makes the example's whole output NaN, windows entirely in the
    padding included (found by the crash fuzzer: the channels_last depthwise kernel skipped the
    padding taps and returned the bias there)."""
    x = torch.randn(2, 4, 3, 3).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    r = torch.rand(2, 2)
    r[0, 1] = float("nan")
    w = torch.randn(2, 4, 1, 1, 1)
    out = cc.condconv2d(x, r, w, torch.randn(2, 4), padding=1, groups=4, backend=backend)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
