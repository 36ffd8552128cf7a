"""The per-example scales (in_scale, out_scale, tap_scale: ODConv's attentions) on the op.

The compiled CPU backends (cpu, reference) against the per-example loop
(reference.condconv2d_loop, which multiplies the scales into each example's kernel one by one)
with PyTorch's autograd for the gradients: forward and all seven gradients, float64 and float32,
every case of the op's matrix, NCHW and channels_last, each scale alone and all together; the
triton backend (in Triton's interpreter) on a curated part of that matrix. Then gradcheck and
opcheck through the op, the paths the CPU takes, the errors, autocast, and which backends take
the scales.
"""
import pytest
import torch

import condconv_kernels as cc
from condconv_kernels import _args, reference
from conftest import CASES, CASES_BY_NAME, INTERPRETED, conv_args, make_inputs

BACKENDS = [b for b in ("cpu", "reference") if b in cc.available_backends("cpu")]
# Which scales a run gives: all three, or one.
SUBSETS = {"all": (True, True, True), "in": (True, False, False), "out": (False, True, False),
           "tap": (False, False, True)}


def _scales(case, which, dtype, seed):
    """Fresh random scales around 1 (as sigmoid attentions are, times 2) for the chosen subset."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((case.B, case.cin), (case.B, case.cout), (case.B,) + tuple(case.kernel))
    return tuple((torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 + 0.25).to(dtype)
                 if wanted else None for shape, wanted in zip(shapes, which))


def _run(case, inputs, scales, backend, grad_out):
    leaves = [t.detach().requires_grad_(True) if t is not None else None
              for t in tuple(inputs) + tuple(scales)]
    x, routing, weight, bias, in_s, out_s, tap_s = leaves
    out = cc.condconv2d(x, routing, weight, bias, case.stride, case.padding, case.dilation,
                        case.groups, in_scale=in_s, out_scale=out_s, tap_scale=tap_s,
                        backend=backend)
    wanted = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, wanted, grad_out)


def _truth(case, inputs, scales, grad_out):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in tuple(inputs) + tuple(scales)]
    x, routing, weight, bias, in_s, out_s, tap_s = leaves
    out = reference.condconv2d_loop(x, routing, weight, bias, *conv_args(case, x),
                                    in_scale=in_s, out_scale=out_s, tap_scale=tap_s)
    wanted = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, wanted, grad_out.double())


def _check(case, backend, dtype, layout, which, seed=0, grad_layout="contiguous"):
    inputs = make_inputs(case, dtype, layout, seed=seed)
    scales = _scales(case, which, dtype, seed + 1)
    shape = reference.condconv2d_loop(*[t.double() if t is not None else None for t in inputs],
                                      *conv_args(case, inputs[0])).shape
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2),
                           dtype=torch.float64).to(dtype)
    if grad_layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    out, grads = _run(case, inputs, scales, backend, grad_out)
    truth, truth_grads = _truth(case, inputs, scales, grad_out)
    # float64: summation order only; float32: ~100 ulps of the largest value.
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    names = ["out"] + [n for n, t in zip(("x", "routing", "weight", "bias", "in_scale",
                                          "out_scale", "tap_scale"),
                                         tuple(inputs) + tuple(scales)) if t is not None]
    for name, ours, want in zip(names, (out,) + tuple(grads), (truth,) + tuple(truth_grads)):
        assert ours.shape == want.shape, name
        assert ours.dtype == (dtype if name != "routing" else inputs[1].dtype), name
        scale = want.abs().max().item() or 1.0
        err = (ours.double() - want).abs().max().item()
        assert err <= rtol * scale, f"{backend} {name}: error {err:.3g} of {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float64_all_scales(case, layout, backend):
    _check(case, backend, torch.float64, layout, SUBSETS["all"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", [w for w in SUBSETS if w != "all"])
@pytest.mark.parametrize("case", [CASES_BY_NAME[n] for n in ("k3_s2_asym", "g2_k1", "dw3",
                                                              "dw_mult2_d2_asym", "k1")], ids=str)
def test_float64_one_scale(case, which, backend):
    _check(case, backend, torch.float64, "contiguous", SUBSETS[which])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_float32_all_scales(case, layout, backend):
    _check(case, backend, torch.float32, layout, SUBSETS["all"], seed=5)


def _op_args(case, dtype=torch.float64, seed=0):
    x, routing, weight, bias = make_inputs(case, dtype, seed=seed)
    stride, pad, dilation, groups = conv_args(case, x)
    return (x, routing, weight, bias, list(stride), list(pad), list(dilation), groups), \
        _scales(case, SUBSETS["all"], dtype, seed + 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["k3_s2_asym", "g2_s2_e8_b1", "dw_mult2_d2_asym"])
def test_gradcheck(name, backend):
    """Finite differences through the op, every input and scale in float64."""
    case = CASES_BY_NAME[name]
    case = type(case)(**{**case.__dict__, "cin": min(case.cin, 4), "H": 5, "W": 6})
    args, scales = _op_args(case)
    tensors = [t.requires_grad_(True) if t is not None else None
               for t in list(args[:4]) + list(scales)]

    def fn(x, routing, weight, bias, in_s, out_s, tap_s):
        return torch.ops.condconv.condconv2d(x, routing, weight, bias, *args[4:], backend, in_s,
                                             out_s, tap_s)
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """The op's schema, fake implementation, autograd registration and dispatch with scales."""
    for name in ("k3_s2_asym", "dw3"):
        args, scales = _op_args(CASES_BY_NAME[name], torch.float32)
        leaves = [t.requires_grad_(True) if t is not None else None for t in args[:4]]
        torch.library.opcheck(torch.ops.condconv.condconv2d,
                              tuple(leaves) + args[4:] + (backend,) + tuple(scales))


def test_cpu_paths_with_scales():
    """With scales, every CPU path but the two that give way to the im2col path (bfloat16 1x1,
    the direct depthwise backward) is taken by the matrix above, and those two are not."""
    taken = set()
    for case in CASES:
        for layout in ("contiguous", "channels_last", "sliced"):
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                args, _ = _op_args(case, dtype)
                x = make_inputs(case, dtype, layout)[0]
                taken.update(torch.ops.condconv.cpu_paths(x, *args[1:], scaled=True))
    every = set(torch.ops.condconv.cpu_path_names())
    assert every - taken == {"forward/bf16_pointwise", "backward/direct_depthwise"}


MASKS = {"x only": (True, False, False, False, False, False, False),
         "out scale and weight": (False, False, True, False, False, True, False),
         "in and tap scales": (False, True, False, False, True, False, True)}


def _masked_backward(case, backend, mask):
    """The backward op with every scale given and ``mask``, and with every gradient asked for."""
    args, scales = _op_args(case, torch.float64, seed=4)
    g = torch.Generator().manual_seed(9)
    out = reference.condconv2d_loop(*args[:4], *conv_args(case, args[0]))
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    bias_wanted = args[3] is not None

    def run(m):
        return torch.ops.condconv.condconv2d_backward(grad_out, *args, backend, list(m), *scales)
    return run(mask), run((True, True, True, bias_wanted, True, True, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", list(MASKS))
def test_scale_gradients_only_where_asked(which, backend):
    """output_mask with an entry per gradient: a scale's gradient not asked for comes back
    empty (its work skipped), those asked for equal what the full backward gives."""
    for name in ("k3_s2_asym", "dw_mult2_d2_asym"):
        masked, full = _masked_backward(CASES_BY_NAME[name], backend, MASKS[which])
        for i, (wanted, m, f) in enumerate(zip(MASKS[which], masked, full)):
            if wanted:
                torch.testing.assert_close(m, f, rtol=1e-12, atol=1e-12, msg=f"{name} {i}")
            else:
                assert m.numel() == 0, (name, i)


@pytest.mark.skipif("triton" not in INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")
def test_triton_scale_gradients_only_where_asked():
    """As above on the triton backend: the dense kernel gradient without the scales'
    partial sums (only s_b G folded), and with only out_scale's."""
    for mask in (MASKS["out scale and weight"], (False, True, True, False, False, False, False)):
        masked, full = _masked_backward(CASES_BY_NAME["k3_s2_asym"], "triton", mask)
        for i, (wanted, m, f) in enumerate(zip(mask, masked, full)):
            if wanted:
                torch.testing.assert_close(m, f, rtol=1e-12, atol=1e-12, msg=str(i))
            else:
                assert m.numel() == 0, i


def test_frozen_attentions_ask_for_no_scale_gradient(monkeypatch):
    """Scales that need no gradient (a frozen attention) are not asked for: the backward gets
    an output_mask whose scale entries are False."""
    from condconv_kernels import ops
    seen = []
    real = ops._BACKWARD["reference"]
    monkeypatch.setitem(ops._BACKWARD, "reference",
                        lambda *a: seen.append(tuple(a[9])) or real(*a))
    case = CASES_BY_NAME["k3"]
    x, routing, weight, bias = make_inputs(case, torch.float64)
    scales = _scales(case, SUBSETS["all"], torch.float64, 2)
    x.requires_grad_(True)
    out = cc.condconv2d(x, routing, weight, bias, case.stride, case.padding, case.dilation,
                        case.groups, in_scale=scales[0], out_scale=scales[1],
                        tap_scale=scales[2], backend="reference")
    out.sum().backward()
    assert seen == [(True, False, False, False, False, False, False)]


def test_empty_batch_gives_zero_gradients():
    case = type(CASES_BY_NAME["k3"])(**{**CASES_BY_NAME["k3"].__dict__, "B": 0})
    inputs = make_inputs(case, torch.float64)
    scales = _scales(case, SUBSETS["all"], torch.float64, 1)
    out, grads = _run(case, inputs, scales, "cpu", torch.zeros(0, case.cout, 7, 13,
                                                               dtype=torch.float64))
    assert out.shape == (0, case.cout, 7, 13)
    for g, t in zip(grads, [t for t in tuple(inputs) + scales if t is not None]):
        assert g.shape == t.shape and not g.abs().any()


@pytest.mark.parametrize("backend", BACKENDS + [b for b in ("triton",) if b in INTERPRETED])
def test_eager_and_op_routes_agree(backend):
    """The plain eager route (no custom-op layer) and the op give the same values."""
    case = CASES_BY_NAME["dw5_s2_same_e8"]
    args, scales = _op_args(case, torch.float32, seed=3)
    eager = cc.condconv2d(*args[:4], case.stride, case.padding, case.dilation, case.groups,
                          in_scale=scales[0], out_scale=scales[1], tap_scale=scales[2],
                          backend=backend)
    op = torch.ops.condconv.condconv2d(*args, backend, *scales)
    torch.testing.assert_close(eager, op, rtol=0, atol=0)


def test_autocast_keeps_the_scales_in_float32():
    """Under CPU autocast (bfloat16) x and the experts run in bfloat16 while routing and the
    scales stay float32: within bfloat16's error of the float32 result."""
    case = CASES_BY_NAME["k3"]
    args, scales = _op_args(case, torch.float32, seed=7)
    want = cc.condconv2d(*args[:4], case.stride, case.padding, in_scale=scales[0],
                         out_scale=scales[1], tap_scale=scales[2], backend="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cc.condconv2d(*args[:4], case.stride, case.padding, in_scale=scales[0].half(),
                            out_scale=scales[1], tap_scale=scales[2], backend="cpu")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


x, r, w, b = make_inputs(CASES_BY_NAME["k3"], torch.float32)
BAD = [
    ("in_scale shape", {"in_scale": torch.rand(3, 5)}, ValueError, "'in_scale'"),
    ("out_scale shape", {"out_scale": torch.rand(3, 4)}, ValueError, "'out_scale'"),
    ("tap_scale shape", {"tap_scale": torch.rand(3, 9)}, ValueError, "'tap_scale'"),
    ("in_scale batch", {"in_scale": torch.rand(2, 4)}, ValueError, "'in_scale'"),
    ("out_scale dtype", {"out_scale": torch.rand(3, 6, dtype=torch.float64)}, TypeError,
     "'out_scale'"),
    ("tap_scale device", {"tap_scale": torch.rand(3, 3, 3, device="meta")}, ValueError,
     "'tap_scale'"),
    ("in_scale not a tensor", {"in_scale": [[1.0] * 4] * 3}, TypeError, "'in_scale'"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_scales(kwargs, exc, needle, backend):
    with pytest.raises(exc, match=needle):
        cc.condconv2d(x, r, w, b, padding=1, backend=backend, **kwargs)


# The triton kernels' branches: dense im2col and 1x1 (a matrix read), grouped, depthwise with a
# channel multiplier; each scale alone takes its own path through the dense kernel gradient.
TRITON_SCALED = [("k3_s2_asym", "all", "channels_last"), ("k3_s2_asym", "in", "contiguous"),
                 ("k3_s2_asym", "out", "sliced"), ("k3_s2_asym", "tap", "contiguous"),
                 ("g2_k1", "all", "contiguous"), ("k1_s2_e8", "out", "channels_last"),
                 ("dw3", "all", "sliced"), ("dw_mult2_d2_asym", "all", "channels_last")]


@pytest.mark.skipif("triton" not in INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("name,which,layout", TRITON_SCALED, ids=lambda v: str(v))
def test_triton_float64(name, which, layout):
    _check(CASES_BY_NAME[name], "triton", torch.float64, layout, SUBSETS[which], seed=5)


@pytest.mark.skipif("triton" not in INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("name", ["k3_s2_asym"])
def test_triton_float32(name):
    _check(CASES_BY_NAME[name], "triton", torch.float32, "channels_last", SUBSETS["all"])


def test_scales_shape_the_flop_count():
    """The FLOP formula counts one multiply per kernel element, example and scale."""
    from torch.utils.flop_counter import FlopCounterMode
    args, scales = _op_args(CASES_BY_NAME["k3"], torch.float32)
    counts = []
    for given in ((None, None, None), scales):
        with FlopCounterMode(display=False) as mode:
            torch.ops.condconv.condconv2d(*args, "reference", *given)
        counts.append(mode.get_total_flops())
    case = CASES_BY_NAME["k3"]
    kernel_numel = case.cout * case.cin * case.kernel[0] * case.kernel[1]
    assert counts[1] - counts[0] == 2 * len(_args.SCALE_NAMES) * case.B * kernel_numel


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("cin,cout,kernel,groups", [(1152, 1024, 1, 1), (384, 768, 3, 2)],
                         ids=["pw", "k3_g2"])
def test_cpu_batch_in_several_chunks(cin, cout, kernel, groups):
    """Kernels large enough that the CPU backend mixes, scales and folds a few examples at a
    time: each chunk's rows of the scales (and of their gradients) are its own."""
    was = torch.get_num_threads()
    torch.set_num_threads(2)  # the chunk is max(threads, what fits 16 MB): 2 examples here
    try:
        g = torch.Generator().manual_seed(9)
        B, E = 5, 2
        x = torch.randn(B, cin, 5, 6, generator=g, dtype=torch.float64)
        routing = torch.rand(B, E, generator=g, dtype=torch.float64)
        weight = torch.randn(E, cout, cin // groups, kernel, kernel, generator=g,
                             dtype=torch.float64) / (cin * kernel)
        scales = [torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
                  for shape in ((B, cin), (B, cout), (B, kernel, kernel))]
        leaves = [t.requires_grad_() for t in [x, routing, weight] + scales]
        conv = ((1, 1), (kernel // 2,) * 4, (1, 1), groups)
        out = cc.condconv2d(*leaves[:3], None, *conv[:1], kernel // 2, 1, groups,
                            in_scale=leaves[3], out_scale=leaves[4], tap_scale=leaves[5],
                            backend="cpu")
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad(out, leaves, grad_out)
    finally:
        torch.set_num_threads(was)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = reference.condconv2d_loop(*ref_leaves[:3], None, *conv, in_scale=ref_leaves[3],
                                    out_scale=ref_leaves[4], tap_scale=ref_leaves[5])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(("x", "routing", "weight", "in_scale", "out_scale", "tap_scale"),
                               grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_auto_gives_scaled_calls_to_a_backend_that_takes_them(monkeypatch):
    """On CUDA, auto picks triton for calls with or without scales, and without triton the cuda
    backend for plain calls only (its kernels do not take the scales yet): the reference
    backend then; on CPU the C++ kernels take both."""
    from condconv_kernels import backends
    available = set(backends.NAMES)
    monkeypatch.setattr(backends, "why_unavailable",
                        lambda name, device_type: None if name in available else "absent")
    assert backends.resolve("auto", "cuda") == "triton"
    assert backends.resolve("auto", "cuda", scaled=True) == "triton"
    assert backends.resolve("auto", "cpu", scaled=True) == "cpu"
    available.discard("triton")
    assert backends.resolve("auto", "cuda") == "cuda"
    assert backends.resolve("auto", "cuda", scaled=True) == "reference"
    assert backends.resolve("cuda", "cuda", scaled=True) == "cuda"  # named: its own error
    assert set(backends.TAKE_SCALES) == {"triton", "cpu", "reference"}
