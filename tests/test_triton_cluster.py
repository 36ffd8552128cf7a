"""The triton backend's cluster pass (condconv_kernels/triton/cluster.py,
CONDCONV_TRITON_CLUSTER): which calls would go to the cuda backend's clustered Hopper kernels,
and, with the conditions met by hand on the CPU (where the cuda backend's ops run the CPU
kernels), that the forward and grad_x come from those ops, the kernel gradient from the Triton
kernels, all against the float64 reference. On a Hopper GPU tests/test_gpu.py runs the real
thing."""
from unittest import mock

import pytest
import torch

from condconv_kernels import _env, reference
from conftest import assert_close

triton_backend = pytest.importorskip("condconv_kernels.triton")
from condconv_kernels.triton import cluster  # noqa: E402


def _layer(dtype, batch=5, experts=3, cin=16, cout=24, side=5):
    g = torch.Generator().manual_seed(3)
    cl = torch.channels_last
    x = torch.randn(batch, cin, side, side, generator=g).to(dtype, memory_format=cl)
    grad_out = torch.randn(batch, cout, side, side, generator=g).to(dtype, memory_format=cl)
    routing = torch.rand(batch, experts, generator=g)
    weight = (torch.randn(experts, cout, cin, 1, 1, generator=g) / cin ** 0.5).to(dtype)
    return grad_out, x, routing, weight


def test_only_16_bit_channels_last_1x1_layers_of_at_most_8_experts_on_a_gpu():
    """Never on the CPU; on a GPU (faked here) the layers the clustered kernels take and none
    of the others."""
    _, x, _, weight = _layer(torch.bfloat16)
    geometry = ((1, 1), (0, 0, 0, 0), 1)
    assert not cluster.eligible(x, weight, *geometry)  # a CPU tensor
    with mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: True)), \
            mock.patch.object(cluster, "_has_cuda_kernels", lambda: True), \
            mock.patch.object(cluster, "_hopper", lambda device: True), \
            mock.patch.object(torch.ops.condconv, "cuda_pointwise_cluster", lambda: 1,
                              create=True):
        assert cluster.eligible(x, weight, *geometry)
        assert not cluster.eligible(x.float(), weight.float(), *geometry)
        assert not cluster.eligible(x.contiguous(), weight, *geometry)
        assert not cluster.eligible(x, weight, (2, 2), (0, 0, 0, 0), 1)
        assert not cluster.eligible(x, weight, (1, 1), (0, 0, 1, 1), 1)
        assert not cluster.eligible(x, weight, *geometry[:2], 2)
        assert not cluster.eligible(x, weight, *geometry, scales=(None, torch.ones(5, 24)))
        nine = weight.repeat(3, 1, 1, 1, 1)  # 9 experts
        assert not cluster.eligible(x, nine, *geometry)
        odd = torch.randn(3, 24, 12, 1, 1).to(torch.bfloat16)  # 12 input channels
        assert not cluster.eligible(x[:, :12], odd, *geometry)
    with mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: True)), \
            mock.patch.object(cluster, "_has_cuda_kernels", lambda: True), \
            mock.patch.object(cluster, "_hopper", lambda device: False):
        assert not cluster.eligible(x, weight, *geometry)  # not compute capability 9


def test_the_passes_come_from_the_cuda_backends_ops(monkeypatch):
    """With the switch on and the conditions met, the forward (with a bias) and grad_x are the
    native ops' (the CPU kernels here), the kernel gradient the Triton kernels' (interpreted):
    all within 3x the error of the reference in the same dtype. float16: Triton's interpreter
    gets bfloat16 dots wrong (tests/test_gpu.py has the GPU's bfloat16)."""
    dtype = torch.float16
    if not hasattr(torch.ops.condconv, "native_forward"):
        pytest.skip("the C++ extension did not load")
    monkeypatch.setattr(_env, "TRITON_CLUSTER", _env.CLUSTER_PASSES)
    monkeypatch.setattr(cluster, "eligible", lambda *a, **k: True)
    grad_out, x, routing, weight = _layer(dtype)
    bias = torch.randn(weight.shape[0], weight.shape[1]).to(dtype)
    calls = []
    forward, grad_x = cluster.forward, cluster.grad_x
    monkeypatch.setattr(cluster, "forward", lambda *a: calls.append("forward") or forward(*a))
    monkeypatch.setattr(cluster, "grad_x", lambda *a: calls.append("grad_x") or grad_x(*a))
    geometry = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
    out = triton_backend.forward(x, routing, weight, bias, *geometry)
    grads = triton_backend.backward(grad_out, x, routing, weight, bias, *geometry,
                                    [True, True, True, True])
    assert calls == ["forward", "grad_x"]
    args = (x, routing, weight, bias)
    truth = reference.forward(*(t.double() for t in args), *geometry)
    assert_close(out, truth.to(dtype), reference.forward(*args, *geometry), "forward", ulps=2)
    want = reference.backward(grad_out.double(), *(t.double() for t in args), *geometry,
                              [True, True, True, True])
    same = reference.backward(grad_out, *args, *geometry, [True, True, True, True])
    for i, name in enumerate(("grad_x", "grad_routing", "grad_weight", "grad_bias")):
        assert_close(grads[i], want[i].to(grads[i].dtype), same[i], name, ulps=2)
