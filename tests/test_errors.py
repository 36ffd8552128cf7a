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


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
def test_native_backward_checks_grad_out():
    out = torch.ops.condconv.native_forward(x, r, w, None, [1, 1], [0] * 4, [1, 1], 1)
    with pytest.raises(ValueError, match="'grad_out'"):
        torch.ops.condconv.native_backward(out[:, :2], x, r, w, None, [1, 1], [0] * 4, [1, 1],
                                           1, [True] * 4)
    with pytest.raises(ValueError, match="'output_mask'"):
        torch.ops.condconv.native_backward(out, x, r, w, None, [1, 1], [0] * 4, [1, 1], 1,
                                           [True] * 4)
