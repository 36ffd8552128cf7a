"""DynamicConv2d and ODConv2d against per-example loops written from the papers' formulas.

Each layer's attentions are recomputed here from its parameters with plain PyTorch, each
example's kernel built from them, and the example convolved alone; forward and the gradients of
x and every parameter are compared, float64 and float32, on every backend that runs the layer
(triton under the interpreter on one layer of each). Then the state dicts
(the official implementations' names and shapes), temperature handling, padding="same", ONNX
export with a dynamic batch and torch.compile with one graph for several batch sizes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import condconv_kernels as cc
from condconv_kernels.export import decomposed
from condconv_kernels.nn import DynamicConv2d, ODConv2d
from conftest import INTERPRETED

CPU_BACKENDS = [b for b in ("cpu", "reference") if b in cc.available_backends("cpu")]
LAYER_BACKENDS = CPU_BACKENDS + [b for b in ("triton",) if b in INTERPRETED]
# The layers the interpreter runs (its dot is float32: float32 only).
INTERPRETED_LAYERS = ("dynamic_k3", "odconv_k3")


def _pad(x, layer):
    p = layer.padding
    if isinstance(p, int):
        p = (p, p)
    return F.pad(x, (p[1], p[1], p[0], p[0]))


def dynamic_loop(layer: DynamicConv2d, x):
    """pi = softmax(fc2(relu(fc1(mean(x)))) / T); each example convolved with sum_k pi_k W_k
    and sum_k pi_k b_k."""
    att = layer.attention
    pooled = x.mean((2, 3))
    hidden = F.relu(pooled @ att.fc1.weight.flatten(1).t())
    pi = torch.softmax((hidden @ att.fc2.weight.flatten(1).t() + att.fc2.bias) / att.temperature,
                       dim=1)
    outs = []
    for b in range(x.shape[0]):
        kernel = sum(pi[b, k] * layer.weight[k] for k in range(layer.K))
        bias = None if layer.bias is None else sum(pi[b, k] * layer.bias[k]
                                                   for k in range(layer.K))
        outs.append(F.conv2d(_pad(x[b:b + 1], layer), kernel, bias, layer.stride, 0,
                             layer.dilation, layer.groups))
    return torch.cat(outs)


def odconv_loop(layer: ODConv2d, x):
    """a = relu(bn(fc(mean(x)))); channel/filter/spatial sigmoids and the kernel softmax at
    temperature T; each example: filter * conv(x * channel, sum_e kernel_e (spatial * W_e))."""
    att = layer.attention
    t = att.temperature
    a = F.relu(att.bn(att.fc(x.mean((2, 3), keepdim=True)))).flatten(1)

    def fc(m):
        return a @ m.weight.flatten(1).t() + m.bias
    channel = torch.sigmoid(fc(att.channel_fc) / t)
    filt = torch.sigmoid(fc(att.filter_fc) / t) if att.filter_fc is not None else None
    k = layer.kernel_size
    spatial = torch.sigmoid(fc(att.spatial_fc) / t).view(-1, *k) \
        if att.spatial_fc is not None else None
    kernel_att = torch.softmax(fc(att.kernel_fc) / t, dim=1) if att.kernel_fc is not None \
        else torch.ones(x.shape[0], 1, dtype=x.dtype)
    outs = []
    for b in range(x.shape[0]):
        kernel = 0
        for e in range(layer.kernel_num):
            w = layer.weight[e] if spatial is None else layer.weight[e] * spatial[b]
            kernel = kernel + kernel_att[b, e] * w
        y = F.conv2d(_pad(x[b:b + 1] * channel[b].view(1, -1, 1, 1), layer), kernel, None,
                     layer.stride, 0, layer.dilation, layer.groups)
        outs.append(y if filt is None else y * filt[b].view(1, -1, 1, 1))
    return torch.cat(outs)


LAYERS = {
    "dynamic_k3": lambda: DynamicConv2d(8, 12, 3, padding=1),
    "dynamic_g2_s2_nobias": lambda: DynamicConv2d(8, 6, 3, stride=2, padding=1, groups=2,
                                                  bias=False, K=3),
    "dynamic_dw5_rgb": lambda: DynamicConv2d(3, 3, 5, padding=2, groups=3),
    "odconv_k3": lambda: ODConv2d(8, 12, 3, padding=1),
    "odconv_k1": lambda: ODConv2d(8, 16, 1),
    "odconv_dw3_s2": lambda: ODConv2d(8, 8, 3, stride=2, padding=1, groups=8),
    "odconv_g2_d2_e1": lambda: ODConv2d(8, 6, 3, padding=2, dilation=2, groups=2, kernel_num=1),
}


def _loop(layer, x):
    return dynamic_loop(layer, x) if isinstance(layer, DynamicConv2d) else odconv_loop(layer, x)


def _perturbed(layer, dtype, seed):
    """The layer in ``dtype`` with every parameter (biases and BN included) random and a
    temperature away from 1, in eval mode (BatchNorm's running statistics, also random)."""
    torch.manual_seed(seed)
    layer = layer.to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for name, buf in layer.named_buffers():
            if "running_var" in name:
                buf.copy_(torch.rand_like(buf) + 0.5)
            elif "running_mean" in name:
                buf.copy_(torch.randn_like(buf) * 0.1)
    layer.attention.temperature = 4.0 if isinstance(layer, DynamicConv2d) else 2.0
    return layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_the_loop(name, dtype):
    layer = _perturbed(LAYERS[name](), dtype, seed=1)
    x = torch.randn(3, layer.in_channels, 9, 11, dtype=dtype)
    params = [p for p in layer.parameters()]
    xt = x.clone().requires_grad_(True)
    want = _loop(layer, xt)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [xt] + params, grad_out)
    rtol = 1e-11 if dtype == torch.float64 else 2e-5
    for backend in LAYER_BACKENDS:
        if backend == "triton" and (dtype == torch.float64 or name not in INTERPRETED_LAYERS):
            continue  # test_triton and test_scales have the op
        layer.backend = backend
        xb = x.clone().requires_grad_(True)
        got = layer(xb)
        grads = torch.autograd.grad(got, [xb] + params, grad_out)
        tol = rtol if backend != "triton" else 1e-4
        for what, g, w in zip(["out", "x"] + [n for n, _ in layer.named_parameters()],
                              (got,) + grads, (want,) + want_grads):
            err = (g - w).abs().max().item()
            assert err <= tol * max(w.abs().max().item(), 1e-3), f"{backend} {what}: {err:.3g}"


def test_state_dicts_have_the_official_names_and_shapes():
    od = ODConv2d(16, 32, 3, reduction=0.25, kernel_num=4)
    shapes = {k: tuple(v.shape) for k, v in od.state_dict().items()}
    hidden = 16  # max(int(16 * 0.25), 16)
    assert shapes == {
        "weight": (4, 32, 16, 3, 3), "attention.fc.weight": (hidden, 16, 1, 1),
        "attention.bn.weight": (hidden,), "attention.bn.bias": (hidden,),
        "attention.bn.running_mean": (hidden,), "attention.bn.running_var": (hidden,),
        "attention.bn.num_batches_tracked": (),
        "attention.channel_fc.weight": (16, hidden, 1, 1), "attention.channel_fc.bias": (16,),
        "attention.filter_fc.weight": (32, hidden, 1, 1), "attention.filter_fc.bias": (32,),
        "attention.spatial_fc.weight": (9, hidden, 1, 1), "attention.spatial_fc.bias": (9,),
        "attention.kernel_fc.weight": (4, hidden, 1, 1), "attention.kernel_fc.bias": (4,)}
    # Depthwise: no filter attention; 1x1: no spatial one; one kernel: no kernel one.
    assert not any("filter_fc" in k for k in ODConv2d(8, 8, 3, groups=8).state_dict())
    assert not any("spatial_fc" in k for k in ODConv2d(8, 8, 1).state_dict())
    assert not any("kernel_fc" in k for k in ODConv2d(8, 8, 3, kernel_num=1).state_dict())
    dy = DynamicConv2d(32, 64, 3, ratio=0.25, K=4)
    assert {k: tuple(v.shape) for k, v in dy.state_dict().items()} == {
        "weight": (4, 64, 32, 3, 3), "bias": (4, 64), "attention.fc1.weight": (9, 32, 1, 1),
        "attention.fc2.weight": (4, 9, 1, 1), "attention.fc2.bias": (4,)}
    assert DynamicConv2d(3, 8, 3, K=5).attention.fc1.weight.shape[0] == 5  # RGB input: K


def test_state_dict_round_trip():
    for make in (lambda: ODConv2d(8, 12, 3, padding=1), lambda: DynamicConv2d(8, 12, 3, 1)):
        a, b = _perturbed(make(), torch.float32, 2), make().eval()
        b.load_state_dict(a.state_dict())
        b.attention.temperature = a.attention.temperature
        x = torch.randn(2, 8, 7, 7)
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_temperatures():
    dy = DynamicConv2d(8, 8, 3)
    assert dy.temperature == 34
    assert [dy.update_temperature() for _ in range(13)][-3:] == [1, 1, 1]
    with pytest.raises(ValueError, match="'temperature'"):
        DynamicConv2d(8, 8, 3, temperature=0.5)
    od = ODConv2d(8, 8, 3)
    od.update_temperature(31)
    assert od.temperature == 31.0
    with pytest.raises(ValueError, match="'temperature'"):
        od.update_temperature(0)


@pytest.mark.parametrize("make", [lambda: DynamicConv2d(4, 6, 3, stride=2, padding="same"),
                                  lambda: ODConv2d(4, 6, 3, stride=2, padding="same")],
                         ids=["dynamic", "odconv"])
def test_same_padding(make):
    layer = make().eval()
    for size in (8, 9):
        out = layer(torch.randn(2, 4, size, size))
        assert out.shape[-2:] == (math.ceil(size / 2),) * 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="'K'"):
        DynamicConv2d(8, 8, 3, K=0)
    with pytest.raises(ValueError, match="'kernel_num'"):
        ODConv2d(8, 8, 3, kernel_num=0)
    with pytest.raises(ValueError, match="'groups'"):
        ODConv2d(8, 6, 3, groups=4)
    with pytest.raises(ValueError, match="'x'"):
        ODConv2d(8, 8, 3)(torch.randn(8, 7, 7))


def test_decomposed_matches_the_fused_layer():
    for make in (lambda: ODConv2d(8, 12, 3, padding=1), lambda: DynamicConv2d(8, 12, 3, 1)):
        layer = _perturbed(make(), torch.float32, 3)
        x = torch.randn(3, 8, 7, 7)
        fused = layer(x)
        with decomposed(layer):
            assert layer.decompose
            plain = layer(x)
            empty = layer(x[:0])  # an empty batch, as the fused op takes it
        torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-5)
        assert empty.shape == (0,) + fused.shape[1:] and layer(x[:0]).shape == empty.shape


def test_onnx_export_keeps_the_dynamic_batch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from condconv_kernels.export import export_onnx
    model = torch.nn.Sequential(ODConv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                DynamicConv2d(8, 8, 3, padding=1, groups=2))
    _perturbed(model[0], torch.float32, 4)
    model.eval()
    path = export_onnx(model, str(tmp_path / "dyn.onnx"), example_input=torch.randn(2, 3, 8, 8))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 8, 8)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_compile_one_graph_for_several_batches():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = torch.nn.Sequential(ODConv2d(4, 8, 3, padding=1), DynamicConv2d(8, 8, 3, padding=1))
    model = model.double().eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 4, 6, 6, dtype=torch.float64, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 0)
        got = compiled(x)
        torch.testing.assert_close(got, model(x), rtol=1e-10, atol=1e-12)
        (gx,) = torch.autograd.grad(got.square().sum(), [x])
        (wx,) = torch.autograd.grad(model(x).square().sum(), [x])
        torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1


class _TinyResNet(torch.nn.Module):
    """A stem, one residual block (3x3 - 3x3), a depthwise 3x3 and a 1x1 projection."""

    def __init__(self, bias=False):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=bias)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=bias))
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=bias)
        self.proj = nn.Conv2d(8, 16, 1, bias=bias)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block(x))
        x = self.proj(torch.relu(self.dw(x)))
        return self.head(x.mean((2, 3)))


def test_dynamic_conversion_with_copied_kernels_computes_the_original():
    torch.manual_seed(5)
    model = _TinyResNet(bias=True).double().eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    converted = cc.convert_model(model, "dynamic", num_experts=3)
    assert converted is model
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if "." not in name}
    assert kinds == {"": "_TinyResNet", "stem": "DynamicConv2d", "block": "Sequential",
                     "dw": "DynamicConv2d", "proj": "DynamicConv2d", "head": "Linear"}
    assert isinstance(model.block[0], DynamicConv2d)
    assert model.block[0].weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-12)


def test_conversion_filters_and_kinds():
    model = cc.convert_model(_TinyResNet(), "odconv", include=["block.*", "dw"], exclude=["*.2"])
    assert isinstance(model.block[0], ODConv2d) and isinstance(model.dw, ODConv2d)
    assert type(model.block[2]) is torch.nn.Conv2d and type(model.stem) is torch.nn.Conv2d
    model = cc.convert_model(_TinyResNet(bias=True), "condconv", num_experts=2)
    assert isinstance(model.proj, cc.convert.CondConvBlock)
    assert model.proj.conv.num_experts == 2 and model.proj.routing.in_features == 8
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model.proj.routing.weight.grad is not None
    with pytest.raises(ValueError, match="odconv"):
        cc.convert_model(_TinyResNet(bias=True), "odconv")
    single = cc.convert_model(torch.nn.Conv2d(4, 4, 3), "dynamic")
    assert isinstance(single, DynamicConv2d)


def test_conversion_bad_arguments():
    with pytest.raises(TypeError, match="'model'"):
        cc.convert_model("resnet")
    with pytest.raises(ValueError, match="'kind'"):
        cc.convert_model(_TinyResNet(), "dyconv")
    with pytest.raises(ValueError, match="'num_experts'"):
        cc.convert_model(_TinyResNet(), num_experts=0)
    with pytest.raises(ValueError, match="'init'"):
        cc.convert_model(_TinyResNet(), init="zeros")
    with pytest.raises(TypeError, match="'include'"):
        cc.convert_model(_TinyResNet(), include="block.*")
