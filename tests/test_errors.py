"""Bad input raises a Python exception whose message names the argument."""
import pytest
import torch

import condconv_kernels as cc
from condconv_kernels import nn as ccnn


def _inputs(B=2, cin=4, cout=6, E=3, k=3, H=9, dtype=torch.float32):
    return (torch.randn(B, cin, H, H, dtype=dtype), torch.rand(B, E, dtype=dtype),
            torch.randn(E, cout, cin, k, k, dtype=dtype), torch.randn(E, cout, dtype=dtype))


x, r, w, b = _inputs()
BAD = [
    ("x rank", lambda: cc.condconv2d(x[0], r, w), ValueError, "'x'"),
    ("routing rank", lambda: cc.condconv2d(x, r[0], w), ValueError, "'routing'"),
    ("weight rank", lambda: cc.condconv2d(x, r, w[0]), ValueError, "'weight'"),
    ("E mismatch", lambda: cc.condconv2d(x, r[:, :2], w), ValueError, "'routing'"),
    ("routing batch", lambda: cc.condconv2d(x, r[:1], w), ValueError, "'routing'"),
    ("Cin vs weight", lambda: cc.condconv2d(x[:, :3], r, w), ValueError, "'weight'"),
    ("Cin vs weight x groups", lambda: cc.condconv2d(x, r, w, groups=2), ValueError, "'weight'"),
    ("groups does not divide", lambda: cc.condconv2d(x, r, w[:, :, :1], groups=3), ValueError,
     "'groups'"),
    ("groups zero", lambda: cc.condconv2d(x, r, w, groups=0), ValueError, "'groups'"),
    ("bias shape", lambda: cc.condconv2d(x, r, w, b[:, :2]), ValueError, "'bias'"),
    ("weight dtype", lambda: cc.condconv2d(x, r, w.double()), TypeError, "'weight'"),
    ("routing dtype", lambda: cc.condconv2d(x.double(), r.half(), w.double()), TypeError,
     "'routing'"),
    ("bias dtype", lambda: cc.condconv2d(x, r, w, b.double()), TypeError, "'bias'"),
    ("integer x", lambda: cc.condconv2d(x.long(), r, w.long()), TypeError, "'x'"),
    ("device mismatch", lambda: cc.condconv2d(x, r.to("meta"), w), ValueError, "'routing'"),
    ("stride zero", lambda: cc.condconv2d(x, r, w, stride=0), ValueError, "'stride'"),
    ("stride negative pair", lambda: cc.condconv2d(x, r, w, stride=(1, -1)), ValueError,
     "'stride'"),
    ("dilation zero", lambda: cc.condconv2d(x, r, w, dilation=0), ValueError, "'dilation'"),
    ("negative padding", lambda: cc.condconv2d(x, r, w, padding=-1), ValueError, "'padding'"),
    ("padding 3 values", lambda: cc.condconv2d(x, r, w, padding=(1, 1, 1)), ValueError,
     "'padding'"),
    ("padding unknown string", lambda: cc.condconv2d(x, r, w, padding="full"), ValueError,
     "'padding'"),
    ("padding float", lambda: cc.condconv2d(x, r, w, padding=1.5), TypeError, "'padding'"),
    ("kernel larger than input", lambda: cc.condconv2d(x[:, :, :2, :2], r, w), ValueError,
     "'weight'"),
    ("x not a tensor", lambda: cc.condconv2d(x.tolist(), r, w), TypeError, "'x'"),
    ("unknown backend", lambda: cc.condconv2d(x, r, w, backend="fast"), ValueError, "'backend'"),
    ("layer groups", lambda: ccnn.CondConv2d(4, 6, groups=4), ValueError, "'groups'"),
    ("layer experts", lambda: ccnn.CondConv2d(4, 6, num_experts=0), ValueError, "'num_experts'"),
    ("routing module rank", lambda: ccnn.CondConvRouting(4, 3)(x[0]), ValueError, "'x'"),
]


@pytest.mark.parametrize("call,exc,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(call, exc, needle):
    with pytest.raises(exc, match=needle) as info:
        call()
    print(info.value)


NATIVE_BAD = [
    ("rank", lambda: (x[0], r, w, None, [1, 1], [0] * 4, [1, 1], 1), "'x'"),
    ("E mismatch", lambda: (x, r[:, :2], w, None, [1, 1], [0] * 4, [1, 1], 1), "'routing'"),
    ("groups", lambda: (x, r, w, None, [1, 1], [0] * 4, [1, 1], 0), "'groups'"),
    ("stride", lambda: (x, r, w, None, [0, 1], [0] * 4, [1, 1], 1), "'stride'"),
    ("padding length", lambda: (x, r, w, None, [1, 1], [0] * 2, [1, 1], 1), "'padding'"),
    ("padding negative", lambda: (x, r, w, None, [1, 1], [0, -1, 0, 0], [1, 1], 1), "'padding'"),
    ("bias", lambda: (x, r, w, b[:1], [1, 1], [0] * 4, [1, 1], 1), "'bias'"),
    ("dtype", lambda: (x, r, w.double(), None, [1, 1], [0] * 4, [1, 1], 1), "'weight'"),
    ("kernel too big", lambda: (x[:, :, :2, :2], r, w, None, [1, 1], [0] * 4, [1, 1], 1),
     "'weight'"),
]


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("args,needle", [c[1:] for c in NATIVE_BAD], ids=[c[0] for c in NATIVE_BAD])
def test_native_op_checks_its_inputs(args, needle):
    """Called through torch.ops directly, the C++ operator validates too."""
    with pytest.raises((ValueError, TypeError, RuntimeError), match=needle):
        torch.ops.condconv.native_forward(*args())


def _backward_ops():
    """The backward through the C++ operator and through the op on each Python backend."""
    conv = ([1, 1], [0] * 4, [1, 1], 1)
    ops = {"native_backward": lambda g, bias, mask: torch.ops.condconv.native_backward(
        g, x, r, w, bias, *conv, mask)}
    for backend in ("reference", "triton"):
        ops[backend] = (lambda g, bias, mask, backend=backend:
                        torch.ops.condconv.condconv2d_backward(g, x, r, w, bias, *conv, backend,
                                                               mask))
    return ops


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("route", ["native_backward", "reference", "triton"])
def test_backward_checks_grad_out(route):
    """grad_out and output_mask, checked by the one C++ check on every route (the triton
    backend's checks run before any kernel, so this needs no GPU)."""
    run = _backward_ops()[route]
    out = torch.randn(2, 6, 7, 7)
    with pytest.raises(ValueError, match="'grad_out'"):
        run(out[:, :2], None, [True, True, True, False])
    with pytest.raises(TypeError, match="'grad_out'"):
        run(out.double(), None, [True, True, True, False])
    with pytest.raises(ValueError, match="'output_mask'"):
        run(out, None, [True] * 4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_checks_the_scale_mask(backend):
    """The backward op's output_mask: 4 entries or 7, a scale's gradient only with the scale
    (checked before any kernel runs)."""
    out = torch.randn(2, 6, 7, 7)
    s_in = torch.rand(2, 4)

    def run(mask, **scales):
        return torch.ops.condconv.condconv2d_backward(out, x, r, w, None, [1, 1], [0] * 4,
                                                      [1, 1], 1, backend, mask, **scales)
    with pytest.raises(ValueError, match="'output_mask' must have 4 or 7"):
        run([True] * 5, in_scale=s_in)
    with pytest.raises(ValueError, match="grad_out_scale but 'out_scale' is None"):
        run([True, False, False, False, True, True, False], in_scale=s_in)


# Found by the crash fuzzer (test_crash_fuzz.py): each raised an unhelpful error, or none.
FUZZ_FOUND = [
    ("same padding, 1-D x (was IndexError)",
     lambda: cc.condconv2d(x[0, 0, 0], r, w, padding="same"), ValueError, "'x'"),
    ("stride past int64", lambda: cc.condconv2d(x, r, w, stride=2 ** 64), ValueError, "'stride'"),
    ("padding past int64", lambda: cc.condconv2d(x, r, w, padding=(2 ** 63, 0)), ValueError,
     "'padding'"),
    ("groups past int64", lambda: cc.condconv2d(x, r, w, groups=2 ** 63), ValueError, "'groups'"),
    ("output past 2**63 bytes", lambda: cc.condconv2d(x, r, w, padding=2 ** 40), ValueError,
     "'padding'"),
    ("op: unknown backend (was KeyError)", lambda: torch.ops.condconv.condconv2d(
        x, r, w, None, [1, 1], [0] * 4, [1, 1], 1, "fast"), ValueError, "'backend'"),
    ("op: reference, negative padding (cropped x silently)", lambda: torch.ops.condconv.condconv2d(
        x, r, w, None, [1, 1], [0, -1, 0, 0], [1, 1], 1, "reference"), ValueError, "'padding'"),
    ("op: reference, bad groups", lambda: torch.ops.condconv.condconv2d(
        x, r, w, None, [1, 1], [0] * 4, [1, 1], 3, "reference"), ValueError, "'groups'"),
    ("op: meta, routing shape (fake did not check)", lambda: torch.ops.condconv.condconv2d(
        x.to("meta"), r[:1].to("meta"), w.to("meta"), None, [1, 1], [0] * 4, [1, 1], 1, "cpu"),
     ValueError, "'routing'"),
]


@pytest.mark.parametrize("call,exc,needle", [c[1:] for c in FUZZ_FOUND],
                         ids=[c[0] for c in FUZZ_FOUND])
def test_fuzz_found_bad_input(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


def test_meta_tensors_give_the_output_shape():
    """Meta tensors (shape inference) used to fail in the autocast query."""
    meta = [t.to("meta") for t in (x, r, w, b)]
    out = cc.condconv2d(*meta, padding=1, backend="reference")
    assert out.device.type == "meta" and out.shape == (2, 6, 9, 9)
    layer = ccnn.CondConv2d(4, 6, num_experts=3, device="meta", backend="reference")
    assert layer(meta[0], meta[1]).shape == (2, 6, 9, 9)


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("stride,padding,dilation,needle", [
    ([1, 1], [0] * 4, [2 ** 63 - 1, 1], "'weight'"),   # span wrapped to -1: silently accepted
    ([1, 1], [0] * 4, [2 ** 62, 1], "'weight'"),       # span overflow: "cannot be a SymInt"
    ([1, 1], [2 ** 62, 2 ** 62, 0, 0], [1, 1], "'padding'"),  # padded size wrapped negative
    ([1, 1], [2 ** 40] * 4, [1, 1], "'padding'"),      # output past 2**63 bytes
], ids=["dilation_wraps", "dilation_overflows", "padding_wraps", "output_too_large"])
def test_native_op_sizes_do_not_overflow(stride, padding, dilation, needle):
    with pytest.raises(ValueError, match=needle):
        torch.ops.condconv.native_forward(x, r, w, None, stride, padding, dilation, 1)


# Bad arguments in the op's own form (x, routing, weight, bias, stride[2], padding[4],
# dilation[2], groups): every check, on each route into the one C++ statement of the rules
# (csrc/ops.cpp check_inputs).
OP_ARGS = (x, r, w, None, [1, 1], [0] * 4, [1, 1], 1)
PARITY = [
    ("x rank", {0: x[0]}), ("routing rank", {1: r[0]}), ("weight rank", {2: w[0]}),
    ("E mismatch", {1: r[:, :2]}), ("routing batch", {1: r[:1]}), ("Cin vs weight", {0: x[:, :3]}),
    ("Cin vs weight x groups", {7: 2}), ("groups does not divide", {2: w[:, :, :1], 7: 3}),
    ("groups zero", {7: 0}), ("bias shape", {3: b[:, :2]}), ("weight dtype", {2: w.double()}),
    ("routing dtype", {0: x.double(), 1: r.half(), 2: w.double()}),
    ("bias dtype", {3: b.double()}), ("integer x", {0: x.long(), 2: w.long()}),
    ("stride zero", {4: [0, 1]}), ("dilation zero", {6: [1, 0]}),
    ("negative padding", {5: [0, -1, 0, 0]}), ("kernel larger than input", {0: x[:, :, :2, :2]}),
    ("empty image", {0: x[:, :, :0], 5: [1] * 4}),
    ("output past 2**63 bytes", {5: [2 ** 40] * 4}),
]


def _argument(message: str) -> str:
    import re
    found = re.search(r"argument '(\w+)'", message)
    return found.group(1) if found else message


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("changes", [c[1] for c in PARITY], ids=[c[0] for c in PARITY])
def test_python_and_cpp_checks_agree(changes):
    """Each bad argument, through the public function, the op on the reference backend (which
    calls the C++ check operator) and the C++ kernel operator (which runs the check itself): the
    same exception type, naming the same argument."""
    args = list(OP_ARGS)
    for i, value in changes.items():
        args[i] = value
    calls = {
        "condconv2d": lambda: cc.condconv2d(*args[:4], stride=args[4], padding=args[5],
                                            dilation=args[6], groups=args[7]),
        "op, reference": lambda: torch.ops.condconv.condconv2d(*args, "reference"),
        "native_forward": lambda: torch.ops.condconv.native_forward(*args),
    }
    seen = {}
    for name, call in calls.items():
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            call()
        seen[name] = (type(info.value).__name__, _argument(str(info.value)))
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("expanded", [False, True], ids=["contiguous", "expanded"])
def test_a_stride_near_int64_reads_the_first_window(expanded, backend):
    """stride = 2**63 - 1 leaves one output pixel, the first window. Its index arithmetic used to
    overflow (a crash on an expanded x, a oneDNN error on a contiguous one or on the reference
    backend). Checked against the first window cut out of the padded input and convolved with
    stride 1, values and grads."""
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(1 if expanded else 3, 4, 2, 5, generator=g, dtype=torch.float64)
    ws = torch.randn(2, 6, 2, 4, 3, generator=g, dtype=torch.float64)
    rs = torch.rand(3, 2, generator=g, dtype=torch.float64)
    pad = (2, 1, 1, 0)  # (top, bottom, left, right)

    def grads(route):
        xl, wl, rl = (t.clone().requires_grad_() for t in (xs, ws, rs))
        out = route(xl.expand(3, -1, -1, -1), rl, wl)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6),
                                 dtype=out.dtype))
        return [out.detach(), xl.grad, wl.grad, rl.grad]

    if backend not in cc.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    fused = grads(lambda xx, rr, ww: cc.condconv2d(xx, rr, ww, stride=2 ** 63 - 1, padding=pad,
                                                   groups=2, backend=backend))
    window = grads(lambda xx, rr, ww: cc.condconv2d(
        torch.nn.functional.pad(xx, (pad[2], pad[3], pad[0], pad[1]))[:, :, :4, :3], rr, ww,
        groups=2, backend="reference"))
    assert fused[0].shape == (3, 6, 1, 1)
    for got, want in zip(fused, window):
        torch.testing.assert_close(got, want)
