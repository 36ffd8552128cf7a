"""Where PyTorch users work: torch.compile with a dynamic batch, torch.export, ONNX with a dynamic
batch (onnxruntime), CPU autocast, channels_last end to end, and the timm layer swap."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import condconv_kernels as cc
from condconv_kernels import _args, reference
from condconv_kernels.export import decomposed, export_onnx
from condconv_kernels.models import create_model
from condconv_kernels.nn import CondConv2d
from condconv_kernels.timm_compat import convert, is_timm_condconv

from conftest import CPU_BACKENDS

SIZE = 64  # input resolution: enough for every stride of the network


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model(name="tf_efficientnet_cc_b0_8e", **kw):
    torch.manual_seed(0)
    return create_model(name, num_classes=kw.pop("num_classes", 10), **kw).eval()


def _condconv_layers(model):
    return [m for m in model.modules() if isinstance(m, CondConv2d)]


def test_compile_whole_model_dynamic_batch_does_not_recompile():
    """fullgraph inductor compile of the whole model; batch sizes 2, 3, 5 share one graph (timm's
    grouped conv bakes the batch into its group count and recompiles for each)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = _model()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, SIZE, SIZE)
            torch._dynamo.mark_dynamic(x, 0)
            out = compiled(x)
            assert _rel(out, model(x)) < 1e-5, batch
    assert counter.frame_count == 1


def test_compile_training_step_dynamic_batch():
    """Forward + handwritten backward under compile (aot_eager), batch marked dynamic:
    gradients match eager, one compilation for two batch sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    layer = CondConv2d(8, 12, 3, padding="same", stride=2, bias=True, num_experts=4).double()
    routing = nn.Linear(8, 4).double()

    def loss_fn(x):
        r = torch.sigmoid(routing(x.mean((2, 3))))
        return (layer(x, r) ** 2).mean()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    params = list(layer.parameters()) + list(routing.parameters())
    for batch in (3, 4):
        x = torch.randn(batch, 8, 9, 9, dtype=torch.float64, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 0)
        got = torch.autograd.grad(compiled(x), [x] + params)
        want = torch.autograd.grad(loss_fn(x), [x] + params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1


def test_export_keeps_one_condconv_node_per_layer():
    model = _model("tf_efficientnet_cc_b0_4e")
    x = torch.randn(2, 3, SIZE, SIZE)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    nodes = [n for n in program.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.condconv.condconv2d.default]
    assert len(nodes) == len(_condconv_layers(model)) == 24
    for n in (1, 3):
        xb = torch.randn(n, 3, SIZE, SIZE)
        with torch.no_grad():
            assert _rel(program.module()(xb), model(xb)) < 1e-6


def test_decomposed_form_matches_op():
    model = _model("tf_efficientnet_cc_b0_4e")
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        fused = model(x)
        with decomposed(model):
            assert all(m.decompose for m in _condconv_layers(model))
            plain = model(x)
    assert not any(m.decompose for m in _condconv_layers(model))
    assert _rel(plain, fused) < 1e-5


def test_onnx_dynamic_batch_matches_pytorch(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _model("tf_efficientnet_cc_b0_4e")
    model.train()  # export_onnx exports in eval mode and restores the mode
    path = export_onnx(model, str(tmp_path / "cc.onnx"), input_size=(3, SIZE, SIZE))
    assert model.training
    model.eval()
    graph = onnx.load(path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # standard ops only
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, SIZE, SIZE)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = model(x)
        assert got.shape == tuple(want.shape)
        assert _rel(torch.from_numpy(got), want) < 1e-5, batch


def test_export_onnx_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="'model'"):
        export_onnx("resnet", str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="'input_size'"):
        export_onnx(nn.Conv2d(3, 4, 3), str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="'input_size'"):
        export_onnx(nn.Conv2d(3, 4, 3), str(tmp_path / "x.onnx"), input_size=(3, 0, 8))


class _RecordCondConv(TorchDispatchMode):
    """Records the dtypes the condconv op's kernel receives (below autocast)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.condconv.condconv2d.default:
            self.calls.append((args[0].dtype, args[1].dtype, args[2].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_cpu_bfloat16_model(backend):
    """Under CPU autocast (bfloat16) the fused op gets bfloat16 x and weights and float32
    routing; the logits stay close to the float32 model's."""
    model = _model("tf_efficientnet_cc_b0_4e", backend=backend)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
        record = _RecordCondConv()
        with torch.autocast("cpu", dtype=torch.bfloat16), record:
            got = model(x)
    assert len(record.calls) == 24
    assert set(record.calls) == {(torch.bfloat16, torch.float32, torch.bfloat16)}
    assert _rel(got.float(), want) < 5e-2


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_channels_last_end_to_end_without_copies(backend):
    """A channels_last model stays channels_last through every fused layer, and the fused op
    makes no copy of its input (the reference backend does: timm's (1, B*C, H, W) reshape)."""
    model = _model("tf_efficientnet_cc_b0_4e", backend=backend).to(memory_format=torch.channels_last)
    seen = []

    def hook(module, inputs, output):
        seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)
                    and output.is_contiguous(memory_format=torch.channels_last))

    handles = [m.register_forward_hook(hook) for m in _condconv_layers(model)]
    x = torch.randn(2, 3, SIZE, SIZE).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.profiler.profile() as prof:
        features = model.forward_features(x)
    for h in handles:
        h.remove()
    assert seen and all(seen) and len(seen) == 24
    assert features.is_contiguous(memory_format=torch.channels_last)
    ops = [e for e in prof.events() if e.name in ("condconv::condconv2d",
                                                   "condconv::native_forward")]
    assert len(ops) >= 24
    copies = [c.name for e in ops for c in _descendants(e)
              if c.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")]
    assert copies == []


class CondConv2d_TimmInterface(nn.Module):
    """A stand-in with timm's CondConv2d interface (flat expert weights, ``dynamic_padding`` for
    TF same, static symmetric ``padding`` otherwise), computed with the per-example loop."""

    def __init__(self, cin, cout, k, stride=1, same=False, groups=1, bias=False, experts=4):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.kernel_size, self.stride, self.dilation = (k, k), (stride, stride), (1, 1)
        self.groups, self.num_experts, self.dynamic_padding = groups, experts, same
        self.padding = (0, 0) if same else (((stride - 1) + (k - 1)) // 2,) * 2
        self.weight_shape = (cout, cin // groups, k, k)
        self.weight = nn.Parameter(torch.randn(experts, cout * cin // groups * k * k) * 0.2)
        self.bias = nn.Parameter(torch.randn(experts, cout)) if bias else None

    def forward(self, x, routing_weights):
        if self.dynamic_padding:
            pad = _args.resolve_padding("same", x.shape[-2:], self.kernel_size, self.stride,
                                        self.dilation)
        else:
            pad = (self.padding[0],) * 2 + (self.padding[1],) * 2
        weight = self.weight.view((self.num_experts,) + self.weight_shape)
        return reference.condconv2d_loop(x, routing_weights, weight, self.bias, self.stride, pad,
                                         self.dilation, self.groups)


# The test looks the class up by name, as timm's layer is named.
CondConv2d_TimmInterface.__name__ = "CondConv2d"


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.route = nn.Linear(8, 4)
        self.pw = CondConv2d_TimmInterface(8, 16, 1, bias=True)
        self.dw = CondConv2d_TimmInterface(16, 16, 5, stride=2, same=True, groups=16)
        self.conv = CondConv2d_TimmInterface(16, 12, 3, stride=2)

    def forward(self, x):
        r = torch.sigmoid(self.route(x.mean((2, 3))))
        return self.conv(self.dw(self.pw(x, r), r), r)


def test_timm_convert_on_the_interface():
    torch.manual_seed(0)
    net = _TwoLayers()
    x = torch.randn(3, 8, 15, 15)
    want = net(x)
    params = dict(net.named_parameters())
    convert(net, backend="cpu" if "cpu" in CPU_BACKENDS else "reference")
    assert all(isinstance(m, CondConv2d) for m in (net.pw, net.dw, net.conv))
    assert not any(is_timm_condconv(m) for m in net.modules())
    assert all(p is params[n] for n, p in net.named_parameters())  # shared, not copied
    assert net.dw.padding == "same" and net.conv.padding == (1, 1)
    got = net(x)
    assert _rel(got, want) < 1e-5
    got.sum().backward()
    assert net.pw.weight.grad is not None and net.dw.weight.grad.abs().sum() > 0


def test_timm_convert_bad_argument():
    with pytest.raises(TypeError, match="'model'"):
        convert(object())


def test_timm_convert_real_timm_model():
    """Needs timm (and its torchvision dependency): run on a machine that has them."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_cc_b0_4e", num_classes=10).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
        n_timm = sum(is_timm_condconv(m) for m in model.modules())
        convert(model)
        assert n_timm == len(_condconv_layers(model)) == 24
        assert _rel(model(x), want) < 1e-5


def test_autocast_still_rejects_non_floating_arguments():
    x = torch.randn(2, 4, 5, 5)
    weight = torch.randint(0, 3, (3, 4, 4, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="'weight'"):
            cc.condconv2d(x, torch.rand(2, 3), weight, padding=1)
