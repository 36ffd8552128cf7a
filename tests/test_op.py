"""Every available backend against the float64 ground truth: forward and all four gradients,
over the configuration matrix, three input layouts and the supported dtypes. Outputs and
scratch are poisoned with NaN before the kernels run."""
import itertools
import zlib

import pytest
import torch

import condconv_kernels as cc
from condconv_kernels import _args, reference
from conftest import (CASES, CASES_BY_NAME, CPU_BACKENDS, LAYOUTS, assert_close, ground_truth,
                      low_precision_dtypes, make_inputs, matrix, poisoned_outputs, run_op)

GRAD_NAMES = ["grad_x", "grad_routing", "grad_weight", "grad_bias"]


def _check(case, backend, dtype, layout, routing_dtype=None, factor=3.0):
    # A stable seed (hash() of a string changes with every process), named in every failure.
    seed = zlib.crc32(f"{case.name}/{layout}".encode()) % 1000
    inputs = make_inputs(case, dtype, layout, seed=seed, routing_dtype=routing_dtype)
    truth, _ = ground_truth(case, inputs)
    grad_out = torch.randn(truth.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    if layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    with poisoned_outputs():
        out, grads = run_op(case, inputs, backend, grad_out)
    truth, truth_grads = ground_truth(case, inputs, grad_out)
    same, same_grads = (None, [None] * 4)
    if dtype != torch.float64:  # PyTorch's own computation in this precision
        same, same_grads = ground_truth(case, inputs, grad_out, dtype=dtype)
    assert out.dtype == dtype
    assert_close(out, truth, same, f"out (seed {seed})", factor)
    names = [n for n, t in zip(GRAD_NAMES, inputs) if t is not None]
    for name, g, t, s, inp in zip(names, grads, truth_grads, same_grads, inputs):
        assert g.dtype == inp.dtype and g.shape == inp.shape, name
        assert_close(g, t, s, f"{name} (seed {seed})", factor)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,case,layout", matrix(CASES, LAYOUTS))
def test_float64(case, layout, backend):
    _check(case, backend, torch.float64, layout)


@pytest.mark.parametrize("backend,case,layout", matrix(CASES[::2], LAYOUTS[::-1]))
def test_float32(case, layout, backend):
    _check(case, backend, torch.float32, layout)


@pytest.mark.parametrize("backend,case,layout", matrix(
    [CASES_BY_NAME[n] for n in ("k3_s2_asym", "g2_k1", "dw3_s2_b1_e1_nobias", "k1_s2_e8", "k1",
                                "dw5_s2_same_e8")],
    ("channels_last", "contiguous")))
def test_low_precision(case, layout, backend):
    for dtype in low_precision_dtypes(backend):
        _check(case, backend, dtype, layout, factor=4.0)


@pytest.mark.parametrize("case", ["k3", "dw3"])
def test_low_precision_with_float32_routing(case, backend):
    _check(CASES_BY_NAME[case], backend, low_precision_dtypes(backend)[0], "contiguous",
           routing_dtype=torch.float32, factor=4.0)


@pytest.mark.parametrize("case", ["k3", "dw3", "g2_k1"])
def test_empty_batch(case, backend):
    c = CASES_BY_NAME[case]
    x, routing, weight, bias = make_inputs(c, torch.float32)
    x, routing = x[:0], routing[:0]
    leaves = [t.clone().requires_grad_(True) for t in (x, routing, weight, bias) if t is not None]
    out = cc.condconv2d(*leaves, stride=c.stride, padding=c.padding, dilation=c.dilation,
                        groups=c.groups, backend=backend)
    pad = _args.resolve_padding(c.padding, x.shape[-2:], c.kernel, c.stride, c.dilation)
    assert out.shape == _args.out_shape(x.shape, weight.shape, c.stride, pad, c.dilation)
    assert out.shape[0] == 0
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


def test_partial_gradients(backend):
    """Only the inputs that require grad get one, and they match the full computation."""
    case = CASES_BY_NAME["k3_s2_asym"]
    x, routing, weight, bias = make_inputs(case, torch.float64, seed=5)
    truth, _ = ground_truth(case, (x, routing, weight, bias))
    grad_out = torch.randn_like(truth)
    _, truth_grads = ground_truth(case, (x, routing, weight, bias), grad_out)
    for i in range(4):
        leaves = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, routing, weight, bias))]
        out = cc.condconv2d(*leaves, stride=case.stride, padding=case.padding,
                            groups=case.groups, backend=backend)
        (g,) = torch.autograd.grad(out, [leaves[i]], grad_out)
        assert_close(g, truth_grads[i], None, GRAD_NAMES[i])


def test_available_backends_and_auto():
    names = cc.available_backends("cpu")
    assert "reference" in names
    assert names == [n for n in ("triton", "cuda", "cpu", "reference") if n in names]
    # auto on CPU: the C++ kernels, else the reference (never the triton interpreter)
    from condconv_kernels import backends
    expected = "cpu" if "cpu" in names else "reference"
    assert backends.resolve("auto", "cpu") == expected
    case = CASES[0]
    inputs = make_inputs(case, torch.float32)
    out_auto, _ = run_op(case, inputs, "auto")
    out_named, _ = run_op(case, inputs, expected)
    assert torch.equal(out_auto, out_named)


def test_env_backend_override(monkeypatch):
    case = CASES[0]
    inputs = make_inputs(case, torch.float64)
    monkeypatch.setenv("CONDCONV_BACKEND", "reference")
    out, _ = run_op(case, inputs, "auto")
    truth, _ = ground_truth(case, inputs)
    assert_close(out, truth, None, "out")
    monkeypatch.setenv("CONDCONV_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        run_op(case, inputs, "auto")


def test_unavailable_backend_raises_with_hint(monkeypatch):
    case = CASES[0]
    inputs = make_inputs(case, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        run_op(case, inputs, "cuda")
    # triton on CPU tensors needs the interpreter (TRITON_INTERPRET, read at import)
    monkeypatch.setattr(cc.backends._env, "TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        run_op(case, inputs, "triton")


NATIVE = [b for b in CPU_BACKENDS if b in ("cpu", "cuda")]


@pytest.mark.parametrize("backend,case,layout", matrix(CASES, LAYOUTS, NATIVE) if NATIVE else [])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eager_inference_path(case, layout, backend, dtype):
    """Without autograd, tracing or modes, the public function calls the C++ op directly
    (skipping the custom-op layer): same results as the differentiable op, bitwise."""
    inputs = make_inputs(case, dtype, layout, seed=7)
    x, routing, weight, bias = inputs
    args = (x, routing, weight, bias, case.stride, case.padding, case.dilation, case.groups)
    with torch.no_grad(), poisoned_outputs(), torch.profiler.profile() as prof:
        fast = cc.condconv2d(*args, backend=backend)
    names = {e.name for e in prof.events()}
    assert "condconv::native_forward" in names and "condconv::condconv2d" not in names
    slow, _ = run_op(case, inputs, backend)
    assert slow.grad_fn is not None
    assert torch.equal(fast, slow.detach())
    assert fast.is_contiguous(memory_format=_args.suggest_memory_format(x))
    truth, _ = ground_truth(case, inputs)
    assert_close(fast, truth, ground_truth(case, inputs, dtype=dtype)[0] if dtype != torch.float64
                 else None, "out")


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cin,cout,kernel,groups", [(1152, 1024, 1, 1), (384, 384, 3, 1),
                                                    (384, 768, 3, 2)], ids=["pw", "k3", "k3_g2"])
def test_cpu_batch_in_several_chunks(cin, cout, kernel, groups, dtype):
    """Kernels large enough that the CPU backend mixes (and folds gradients for) a few examples
    at a time: every chunk after the first adds to grad_weight and writes its own rows of
    grad_routing. Compared with the float64 per-example loop."""
    was = torch.get_num_threads()
    torch.set_num_threads(2)  # the chunk is max(threads, what fits 16 MB): 2 examples here
    try:
        g = torch.Generator().manual_seed(7)
        B, E = 5, 2
        x = torch.randn(B, cin, 5, 6, generator=g, dtype=dtype)
        routing = torch.rand(B, E, generator=g, dtype=dtype)
        weight = torch.randn(E, cout, cin // groups, kernel, kernel, generator=g,
                             dtype=dtype) / (cin * kernel)
        bias = torch.randn(E, cout, generator=g, dtype=dtype)
        leaves = [t.requires_grad_() for t in (x, routing, weight, bias)]
        out = cc.condconv2d(*leaves, 1, kernel // 2, 1, groups, backend="cpu")
        grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
        grads = torch.autograd.grad(out, leaves, grad_out)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = reference.condconv2d_loop(*ref_leaves, (1, 1), (kernel // 2,) * 4, (1, 1), groups)
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    finally:
        torch.set_num_threads(was)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tol)
    for name, got, want in zip(("x", "routing", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
def test_the_matrix_takes_every_cpu_path():
    """The cases, layouts and dtypes of test_float64, test_float32 and test_low_precision take
    every path the CPU kernels have, forward and backward (csrc/cpu/paths.h), so each is
    compared with the float64 truth."""
    runs = ([(c, lay, torch.float64) for c in CASES for lay in LAYOUTS]
            + [(c, lay, torch.float32) for c in CASES[::2] for lay in LAYOUTS]
            + [(CASES_BY_NAME[n], lay, d)
               for n in ("k3_s2_asym", "g2_k1", "dw3_s2_b1_e1_nobias", "k1_s2_e8", "k1",
                         "dw5_s2_same_e8")
               for lay in ("channels_last", "contiguous") for d in low_precision_dtypes("cpu")])
    taken = set()
    for case, layout, dtype in runs:
        x, routing, weight, bias = make_inputs(case, dtype, layout)
        pad = _args.resolve_padding(case.padding, x.shape[-2:], weight.shape[-2:],
                                    _args.pair(case.stride, "stride", 1),
                                    _args.pair(case.dilation, "dilation", 1))
        taken.update(torch.ops.condconv.cpu_paths(
            x, routing, weight, bias, list(_args.pair(case.stride, "stride", 1)), list(pad),
            list(_args.pair(case.dilation, "dilation", 1)), case.groups))
    assert set(torch.ops.condconv.cpu_path_names()) - taken == set()


def test_suggest_memory_format_agrees_with_torch():
    """_args.suggest_memory_format's own reading of the strides gives torch's answer on every
    layout, size-1 dimensions (whose strides are arbitrary), zero strides, views and empty
    tensors."""
    from torch._prims_common import suggest_memory_format
    for shape in itertools.product((0, 1, 2), (1, 3), (1, 4), (1, 5)):
        base = torch.randn(shape)
        last = base.contiguous(memory_format=torch.channels_last)
        views = [base, last, base.permute(0, 1, 3, 2), base.permute(0, 2, 3, 1).contiguous()
                 .permute(0, 3, 1, 2), base[:, :, ::2], last[..., ::2], last[:, :1],
                 torch.randn(shape[1:]).expand(shape), torch.randn(1).expand(shape),
                 torch.randn(shape[0], 1, *shape[2:]).expand(shape)]
        for t in views:
            assert _args.suggest_memory_format(t) == suggest_memory_format(t), (shape, t.stride())
