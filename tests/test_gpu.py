"""Every CUDA backend against the float64 ground truth (computed on the CPU): forward and all
gradients, float32 / float16 / bfloat16, contiguous / channels_last / sliced, batch up to 256.
Runs where CUDA is available (skipped on CPU-only machines)."""
import pytest
import torch

import condconv_kernels as cc
from condconv_kernels import reference
from conftest import (CASES, CASES_BY_NAME, LAYOUTS, assert_close, assert_repeatable, ground_truth,
                      make_inputs, run_op)

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
CUDA_BACKENDS = cc.available_backends("cuda") if CUDA else []


def _run(case, inputs, backend, grad_out):
    leaves = [t.detach().cuda().requires_grad_(True) if t is not None else None for t in inputs]
    out = cc.condconv2d(*leaves, stride=case.stride, padding=case.padding,
                        dilation=case.dilation, groups=case.groups, backend=backend)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.cuda())
    return out.cpu(), [g.cpu() for g in grads]


def _check(case, backend, dtype, layout, factor):
    inputs = make_inputs(case, dtype, layout, seed=1)
    truth, _ = ground_truth(case, inputs)
    grad_out = torch.randn(truth.shape, dtype=torch.float64).to(dtype)
    out, grads = _run(case, inputs, backend, grad_out)
    truth, truth_grads = ground_truth(case, inputs, grad_out)
    # PyTorch's own computation in this precision, on the GPU (cuDNN, TF32 as configured).
    same, same_grads = ground_truth(case, [t.cuda() if t is not None else None for t in inputs],
                                    grad_out.cuda(), dtype=dtype)
    assert_close(out, truth, same.cpu(), f"{backend} out", factor)
    for g, t, s in zip(grads, truth_grads, same_grads):
        assert_close(g, t, s.cpu(), f"{backend} grad", factor)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_matrix(case, layout, dtype, backend):
    _check(case, backend, dtype, layout, factor=3.0 if dtype == torch.float32 else 4.0)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", ["k1", "dw5_s2_same_e8", "k3_s2_asym"])
def test_cuda_batch_256(name, backend):
    case = CASES_BY_NAME[name]
    case = type(case)(**{**case.__dict__, "B": 256})
    _check(case, backend, torch.float16, "channels_last", factor=4.0)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("kernel,groups", [(1, 1), (3, 8)], ids=["pw", "dw3"])
def test_cuda_more_than_2_31_elements(kernel, groups, backend):
    """x has 8 * 16400 * 16400 > 2**31 float16 elements (about 4.3 GB); the last 64 x 64 pixels
    of the output and of grad_x, whose offsets need 64-bit arithmetic, are compared with the
    reference on a crop (with its halo), and grad_routing with an independent reduction."""
    torch.manual_seed(0)
    side, cin, pad, crop = 16400, 8, kernel // 2, 64
    x = torch.randn(1, cin, side, side, device="cuda", dtype=torch.float16)
    assert x.numel() > 2 ** 31
    routing = torch.rand(1, 4, device="cuda", dtype=torch.float32, requires_grad=True)
    weight = (torch.randn(4, cin, cin // groups, kernel, kernel, device="cuda") * 0.3).half()
    x.requires_grad_(True)
    out = cc.condconv2d(x, routing, weight, None, 1, pad, 1, groups, backend=backend)
    grad_out = torch.randn_like(out)
    grad_x, grad_r = torch.autograd.grad(out, [x, routing], grad_out)

    lo = side - crop - pad  # the crop with its halo; the image's own padding on the far side
    xc = x.detach()[:, :, lo:, lo:].float()
    want = reference.condconv2d_loop(xc, routing.detach(), weight.float(), None, (1, 1),
                                     (0, pad, 0, pad), (1, 1), groups)
    got = out[:, :, side - crop:, side - crop:].float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(grad_x[:, :, -crop:, -crop:]).all()
    # grad_x on the far corner: the transposed convolution of grad_out there.
    xc_leaf = xc.clone().requires_grad_(True)
    ref = reference.condconv2d_loop(xc_leaf, routing.detach(), weight.float(), None, (1, 1),
                                    (0, pad, 0, pad), (1, 1), groups)
    (ref_gx,) = torch.autograd.grad(ref, [xc_leaf], grad_out[:, :, side - crop:, side - crop:]
                                    .float())
    torch.testing.assert_close(grad_x[:, :, -crop + pad:, -crop + pad:].float(),
                               ref_gx[:, :, 2 * pad:, 2 * pad:], rtol=2e-2, atol=5e-2)
    # grad_routing[e] = <G, W_e> = sum over pixels of grad_out * (W_e conv x): per expert, in
    # float32 over row bands (an independent computation, not the kernel's).
    want_r = torch.zeros(4, device="cuda")
    for e in range(4):
        for h0 in range(0, side, 2048):
            h1 = min(side, h0 + 2048)
            band = x.detach()[:, :, max(0, h0 - pad):min(side, h1 + pad)].float()
            top, bottom = pad - (h0 - max(0, h0 - pad)), pad - (min(side, h1 + pad) - h1)
            y = torch.nn.functional.conv2d(
                torch.nn.functional.pad(band, (pad, pad, top, bottom)), weight[e].float(),
                groups=groups)
            want_r[e] += (y * grad_out[:, :, h0:h1].float()).sum()
    torch.testing.assert_close(grad_r[0], want_r, rtol=2e-2, atol=1.0)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", ["k1_s2_e8", "dw3_s2_b1_e1_nobias", "k3_s2_asym", "g2_s2_e8_b1"])
def test_cuda_backward_is_bitwise_deterministic(name, backend, monkeypatch):
    """Ten forward + backward runs give bitwise-identical results, in deterministic mode too
    (cuBLAS needs CUBLAS_WORKSPACE_CONFIG there, as for any PyTorch op that uses it)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    case = CASES_BY_NAME[name]
    case = type(case)(**{**case.__dict__, "B": 9})
    inputs = [t.cuda() if t is not None else None
              for t in make_inputs(case, torch.float32, seed=3)]
    grad_out = torch.randn(run_op(case, inputs, backend)[0].shape, device="cuda")
    assert_repeatable(case, inputs, backend, grad_out, deterministic=True)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", ["k3_s2_asym", "dw5_s2_same_e8"])
def test_cuda_graph_replay_matches_eager(name, backend):
    """Forward + backward captured in a CUDA graph (on a side stream, as torch.cuda.graph does)
    and replayed on new inputs gives eager's results: the kernels run on the current stream and
    make no host synchronisation."""
    case = CASES_BY_NAME[name]
    static = [t.cuda().requires_grad_(True) if t is not None else None
              for t in make_inputs(case, torch.float32, seed=5)]
    leaves = [t for t in static if t is not None]

    def step():
        out = cc.condconv2d(*static, stride=case.stride, padding=case.padding,
                            dilation=case.dilation, groups=case.groups, backend=backend)
        return out, torch.autograd.grad(out, leaves, torch.ones_like(out))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (autotuning, lazy initialisation)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_grads = step()

    fresh = [t.cuda() if t is not None else None for t in make_inputs(case, torch.float32, seed=6)]
    with torch.no_grad():
        for s, f in zip(static, fresh):
            if s is not None:
                s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_grads = run_op(case, fresh, backend,
                                    torch.ones(graph_out.shape, device="cuda"))
    # A wrong stream replays stale or unwritten memory: far off. The tolerance only allows a
    # library (cuBLAS) to pick another algorithm inside the capture.
    torch.testing.assert_close(graph_out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(graph_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_cuda_backend_was_built():
    """Where torch has CUDA, the extension must carry the CUDA kernels, unless the build was
    told to skip them (CONDCONV_SKIP_CUDA=1): `make test` falls back to a CPU-only build when
    the CUDA build fails, and this is where that shows."""
    import os
    if os.environ.get("CONDCONV_SKIP_CUDA", "0") == "1":
        pytest.skip("CONDCONV_SKIP_CUDA=1: the CUDA kernels were not asked for")
    from torch.utils.cpp_extension import CUDA_HOME

    from condconv_kernels import backends
    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit (CUDA_HOME) on this machine: the CUDA kernels cannot be built")
    assert "cuda" in CUDA_BACKENDS, backends.why_unavailable("cuda", "cuda")
