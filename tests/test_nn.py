"""Layers: timm-compatible parameters, timm's padding conventions, routing."""
import pytest
import torch
import torch.nn.functional as F

from condconv_kernels import nn as ccnn
from condconv_kernels._args import same_padding
from conftest import assert_close


def _per_example(layer, x, routing, pad4):
    """Independent: each example's kernel mixed by hand from the flat timm-layout weight."""
    E = layer.num_experts
    outs = []
    for b in range(x.shape[0]):
        w = (routing[b, :, None] * layer.weight).sum(0).view(layer.weight_shape)
        bias = (routing[b, :, None] * layer.bias).sum(0) if layer.bias is not None else None
        xp = F.pad(x[b:b + 1], (pad4[2], pad4[3], pad4[0], pad4[1]))
        outs.append(F.conv2d(xp, w, bias, layer.stride, 0, layer.dilation, layer.groups))
    assert E == routing.shape[1]
    return torch.cat(outs)


def test_parameter_layout_matches_timm():
    layer = ccnn.CondConv2d(16, 32, 3, groups=2, bias=True, num_experts=8)
    assert layer.weight.shape == (8, 32 * 8 * 3 * 3)
    assert layer.bias.shape == (8, 32)
    assert sorted(layer.state_dict()) == ["bias", "weight"]
    assert ccnn.CondConv2d(16, 32, 1).bias is None
    routing = ccnn.CondConvRouting(16, 8)
    assert sorted(routing.state_dict()) == ["bias", "weight"]
    assert routing.weight.shape == (8, 16)


def test_init_like_conv2d_per_expert():
    torch.manual_seed(0)
    layer = ccnn.CondConv2d(64, 64, 3, num_experts=4, bias=True)
    bound = 1 / (64 * 9) ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 576
    assert layer.weight.abs().max() <= bound + 1e-6
    assert layer.weight.std() > bound / 3
    assert not torch.equal(layer.weight[0], layer.weight[1])
    assert layer.bias.abs().max() <= bound + 1e-6


@pytest.mark.parametrize("padding,kernel,stride,dilation,expected", [
    ("", 3, 1, 1, (1, 1)), ("", 3, 2, 1, (1, 1)), ("", 5, 2, 1, (2, 2)), ("", 3, 1, 2, (2, 2)),
    ("same", 3, 1, 1, (1, 1)), ("same", 5, 1, 1, (2, 2)), ("same", 3, 2, 1, "same"),
    ("same", 2, 1, 1, "same"), ("valid", 3, 1, 1, 0), (2, 3, 1, 1, 2),
])
def test_timm_padding_rules(padding, kernel, stride, dilation, expected):
    layer = ccnn.CondConv2d(4, 4, kernel, stride, padding, dilation)
    assert layer.padding == expected


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, stride=2, padding="same", bias=True),
    dict(kernel_size=5, stride=1, padding="", groups=8),
    dict(kernel_size=1, padding="", num_experts=8),
    dict(kernel_size=3, stride=2, padding="", groups=2, bias=True),
])
def test_layer_matches_per_example_conv(kw, backend):
    torch.manual_seed(1)
    layer = ccnn.CondConv2d(8, 8, backend=backend, **kw).double()
    router = ccnn.CondConvRouting(8, layer.num_experts).double()
    x = torch.randn(3, 8, 14, 11, dtype=torch.float64)
    routing = router(x)
    assert_close(routing, torch.sigmoid(x.mean((2, 3)) @ router.weight.t() + router.bias),
                 None, "routing")
    if layer.padding == "same":
        pad4 = same_padding(14, layer.kernel_size[0], layer.stride[0], 1) + \
            same_padding(11, layer.kernel_size[1], layer.stride[1], 1)
    else:
        p = layer.padding if isinstance(layer.padding, tuple) else (layer.padding,) * 2
        pad4 = (p[0], p[0], p[1], p[1])
    out = layer(x, routing)
    assert_close(out, _per_example(layer, x, routing, pad4), None, "layer")
    out.square().sum().backward()
    assert layer.weight.grad.shape == layer.weight.shape
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


def test_state_dict_roundtrip():
    a = ccnn.CondConv2d(4, 6, 3, bias=True)
    b = ccnn.CondConv2d(4, 6, 3, bias=True)
    b.load_state_dict(a.state_dict(), strict=True)
    x, r = torch.randn(2, 4, 7, 7), torch.rand(2, 4)
    assert torch.equal(a(x, r), b(x, r))
