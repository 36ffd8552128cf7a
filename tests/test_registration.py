"""The torch.library registration: gradcheck, opcheck, torch.compile, FLOP formula, autocast."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import condconv_kernels as cc
from condconv_kernels import nn as ccnn
from conftest import (CASES_BY_NAME, CPU_BACKENDS, INTERPRETED, assert_close, conv_args,
                      ground_truth, low_precision_dtypes, make_inputs)

GRADCHECK_CASES = ["k3_s2_asym", "dw3_s2_b1_e1_nobias", "g2_s2_e8_b1", "k1_s2_e8",
                   "k5_d2_s2_asym"]


# The interpreted backend gets the first two cases (dense and depthwise).
@pytest.mark.parametrize("backend,case", [
    pytest.param(b, c, id=f"{b}-{c}") for b in CPU_BACKENDS
    for c in (GRADCHECK_CASES[:2] if b in INTERPRETED else GRADCHECK_CASES)])
def test_gradcheck_float64(case, backend):
    c = CASES_BY_NAME[case]
    inputs = [t.requires_grad_(True) for t in make_inputs(c, torch.float64, "sliced", seed=7)
              if t is not None]

    def fn(*args):
        return cc.condconv2d(*args, stride=c.stride, padding=c.padding, dilation=c.dilation,
                             groups=c.groups, backend=backend)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def _op_args(case, backend, layout="contiguous", dtype=torch.float64):
    x, routing, weight, bias = make_inputs(case, dtype, layout, seed=8)
    stride, pad, dilation, groups = conv_args(case, x)
    return [x.requires_grad_(True), routing.requires_grad_(True), weight.requires_grad_(True),
            bias.requires_grad_(True) if bias is not None else None,
            list(stride), list(pad), list(dilation), groups, backend]


@pytest.mark.parametrize("case,layout", [("k3_s2_asym", "channels_last"),
                                         ("dw3", "contiguous"), ("g2_k1", "sliced")])
def test_opcheck(case, layout, backend):
    args = _op_args(CASES_BY_NAME[case], backend, layout)
    torch.library.opcheck(torch.ops.condconv.condconv2d.default, args)
    with torch.no_grad():
        out = torch.ops.condconv.condconv2d(*args)
    grad_out = torch.randn_like(out)
    bwd_args = [grad_out] + [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bwd_args.append([True, True, False, args[3] is not None])
    torch.library.opcheck(torch.ops.condconv.condconv2d_backward.default, bwd_args)


@pytest.mark.skipif("cpu" not in cc.available_backends("cpu"), reason="C++ extension not built")
def test_opcheck_native_ops():
    args = _op_args(CASES_BY_NAME["k3_s2_asym"], "cpu", "channels_last")[:-1]
    torch.library.opcheck(torch.ops.condconv.native_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_layer(backend):
    torch.manual_seed(0)
    layer = ccnn.CondConv2d(8, 16, 3, stride=2, padding="same", num_experts=4, bias=True,
                            backend=backend)
    routing_fn = ccnn.CondConvRouting(8, 4)

    def block(x):
        return layer(x, routing_fn(x))
    x = torch.randn(3, 8, 13, 13)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager = block(x)
    out = compiled(x)
    assert_close(out, eager.double(), None, "compiled vs eager")
    out.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_compile_inductor_matches_eager(backend):
    case = CASES_BY_NAME["dw3"]
    x, routing, weight, bias = make_inputs(case, torch.float32, seed=9)

    def fn(x, r, w, b):
        return F.relu(cc.condconv2d(x, r, w, b, padding=1, groups=case.groups, backend=backend))
    out = torch.compile(fn, fullgraph=True)(x, routing, weight, bias)
    assert_close(out, fn(x, routing, weight, bias).double(), None, "inductor vs eager")


@pytest.mark.parametrize("case", ["k3_s2_asym", "dw5_s2_same_e8", "g2_k1"])
def test_flop_formula(case, backend):
    """2 x (conv multiply-adds + B*E*|W| mixing), conv counted by PyTorch's own conv formula."""
    c = CASES_BY_NAME[case]
    x, routing, weight, bias = make_inputs(c, torch.float32, seed=10)
    stride, pad, dilation, groups = conv_args(c, x)
    with FlopCounterMode(display=False) as counter:
        cc.condconv2d(x, routing, weight, bias, c.stride, c.padding, c.dilation, c.groups,
                      backend=backend)
    xp = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    with FlopCounterMode(display=False) as static:
        F.conv2d(xp, weight[0], None, stride, 0, dilation, groups)
    mix = routing.shape[0] * weight.numel()
    assert counter.get_total_flops() == static.get_total_flops() + 2 * mix


def test_autocast_cpu(backend):
    """x and weights run in the autocast dtype (bfloat16; float16 where the backend is
    interpreted), routing stays float32."""
    dtype = low_precision_dtypes(backend)[0]
    case = CASES_BY_NAME["k3_s2_asym"]
    x, routing, weight, bias = make_inputs(case, torch.float32, seed=11)
    truth, _ = ground_truth(case, (x, routing, weight, bias))
    with torch.autocast("cpu", dtype=dtype):
        out = cc.condconv2d(x, routing, weight, bias, case.stride, case.padding,
                            backend=backend)
    assert out.dtype == dtype
    same, _ = ground_truth(case, [t.to(dtype) for t in (x, routing, weight, bias)], dtype=dtype)
    assert_close(out, truth, same, f"autocast {dtype}", factor=4.0)
