"""The triton backend's cluster pass (condconv_kernels/triton/cluster.py,
CONDCONV_TRITON_CLUSTER): which calls would go to the cuda backend's Hopper kernels (the
clustered forward and grad_x, the kernel gradient's kernel), and, with the conditions met by
hand on the CPU (where the cuda backend's ops run the CPU kernels), that each pass switched on
comes from those ops and the others from the Triton kernels, all against the float64
reference. On a Hopper GPU tests/test_gpu.py runs the real thing."""
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


def test_a_hopper_gpu_needs_the_builds_sm90_code():
    """The pass's device check (faked here): compute capability 9.x and a build with the
    kernels' sm_90 code (the op ``cuda_hopper_kernels``, asked for the tensor's device, or the
    current one); an older GPU is never asked about; each device asked once."""
    assert torch.ops.condconv.cuda_hopper_kernels.default  # registered in every build
    capability, built, asked = {0: (9, 0), 1: (9, 0), 2: (8, 0)}, {0: 1, 1: 0, 2: 1}, []

    def hopper_kernels(index):
        asked.append(index)
        return built[index]
    cluster._hopper.cache_clear()
    try:
        with mock.patch.object(torch.cuda, "get_device_capability", capability.__getitem__), \
                mock.patch.object(torch.cuda, "current_device", lambda: 1), \
                mock.patch.object(torch.ops.condconv, "cuda_hopper_kernels", hopper_kernels,
                                  create=True):
            got = [cluster._hopper(torch.device(d)) for d in
                   ("cuda:0", "cuda:1", "cuda:2", "cuda", "cuda:0")]
    finally:
        cluster._hopper.cache_clear()
    assert got == [True, False, False, False, True] and asked == [0, 1, 1]


def test_the_kernel_gradient_needs_both_tensors_laid_out_and_its_switch_on():
    """The kernel gradient reads x and grad_out: either not channels_last, or misaligned, keeps
    it Triton's; so does the kernel-gradient switch off, whatever the cluster switch says."""
    grad_out, x, _, weight = _layer(torch.bfloat16)
    geometry = ((1, 1), (0, 0, 0, 0), 1)
    kgrad = [1]
    with mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: True)), \
            mock.patch.object(cluster, "_has_cuda_kernels", lambda: True), \
            mock.patch.object(cluster, "_hopper", lambda device: True), \
            mock.patch.object(torch.ops.condconv, "cuda_pointwise_kgrad", lambda: kgrad[0],
                              create=True), \
            mock.patch.object(torch.ops.condconv, "cuda_pointwise_cluster", lambda: 0,
                              create=True):
        assert cluster.kgrad_eligible(x, grad_out, weight, *geometry)
        assert not cluster.eligible(x, weight, *geometry)  # the cluster switch is off
        assert not cluster.kgrad_eligible(x, grad_out.contiguous(), weight, *geometry)
        assert not cluster.kgrad_eligible(x.contiguous(), grad_out, weight, *geometry)
        shifted = torch.empty(grad_out.numel() + 1, dtype=grad_out.dtype)[1:]
        shifted = shifted.as_strided(grad_out.shape, grad_out.stride()).copy_(grad_out)
        assert shifted.is_contiguous(memory_format=torch.channels_last)
        assert not cluster.kgrad_eligible(x, shifted, weight, *geometry)  # 2 bytes off
        assert not cluster.kgrad_eligible(x, grad_out, weight, *geometry,
                                          scales=(torch.ones(5, 16), None))
        kgrad[0] = 0
        assert not cluster.kgrad_eligible(x, grad_out, weight, *geometry)


@pytest.mark.parametrize("passes", [frozenset({"forward", "grad_x"}), frozenset({"kernel_grad"}),
                                    frozenset({"forward", "grad_x", "kernel_grad"})])
def test_the_passes_come_from_the_cuda_backends_ops(monkeypatch, passes):
    """With the passes switched on and the conditions met, the forward (with a bias), grad_x and
    the kernel gradient are the native ops' (the CPU kernels here) where their pass is on, the
    Triton kernels' (interpreted) where not: all within 3x the error of the reference in the
    same dtype. float16: Triton's interpreter gets bfloat16 dots wrong (tests/test_gpu.py has
    the GPU's bfloat16)."""
    dtype = torch.float16
    if not hasattr(torch.ops.condconv, "native_forward"):
        pytest.skip("the C++ extension did not load")
    monkeypatch.setattr(_env, "TRITON_CLUSTER", passes)
    monkeypatch.setattr(cluster, "eligible", lambda *a, **k: True)
    monkeypatch.setattr(cluster, "kgrad_eligible", lambda *a, **k: True)
    grad_out, x, routing, weight = _layer(dtype)
    bias = torch.randn(weight.shape[0], weight.shape[1]).to(dtype)
    calls = []
    for name in ("forward", "grad_x", "kernel_grads"):
        def counted(*a, _name=name, _fn=getattr(cluster, name)):
            calls.append(_name)
            return _fn(*a)
        monkeypatch.setattr(cluster, name, counted)
    geometry = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
    out = triton_backend.forward(x, routing, weight, bias, *geometry)
    grads = triton_backend.backward(grad_out, x, routing, weight, bias, *geometry,
                                    [True, True, True, True])
    expected = [n for p, n in (("forward", "forward"), ("grad_x", "grad_x"),
                               ("kernel_grad", "kernel_grads")) if p in passes]
    assert calls == expected
    args = (x, routing, weight, bias)
    truth = reference.forward(*(t.double() for t in args), *geometry)
    assert_close(out, truth.to(dtype), reference.forward(*args, *geometry), "forward", ulps=2)
    want = reference.backward(grad_out.double(), *(t.double() for t in args), *geometry,
                              [True, True, True, True])
    same = reference.backward(grad_out, *args, *geometry, [True, True, True, True])
    for i, name in enumerate(("grad_x", "grad_routing", "grad_weight", "grad_bias")):
        assert grads[i].dtype == same[i].dtype, name
        assert_close(grads[i], want[i].to(grads[i].dtype), same[i], name, ulps=2)


def test_the_kernel_gradient_alone_and_in_part(monkeypatch):
    """grad_weight alone and grad_routing alone through the pass, each against the reference;
    the gradient not asked for is None."""
    dtype = torch.float16
    if not hasattr(torch.ops.condconv, "native_forward"):
        pytest.skip("the C++ extension did not load")
    monkeypatch.setattr(_env, "TRITON_CLUSTER", frozenset({"kernel_grad"}))
    monkeypatch.setattr(cluster, "kgrad_eligible", lambda *a, **k: True)
    grad_out, x, routing, weight = _layer(dtype, batch=3, experts=2)
    geometry = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
    args = (x, routing, weight, None)
    for mask in ([False, True, False, False], [False, False, True, False]):
        grads = triton_backend.backward(grad_out, *args, *geometry, mask)
        want = reference.backward(grad_out.double(), *(t.double() if t is not None else None
                                                        for t in args), *geometry, mask)
        same = reference.backward(grad_out, *args, *geometry, mask)
        for i, name in enumerate(("grad_x", "grad_routing", "grad_weight", "grad_bias")):
            if mask[i]:
                assert_close(grads[i], want[i].to(grads[i].dtype), same[i], name, ulps=2)
            else:
                assert grads[i] is None, name


def test_a_replayed_call_is_one_made_with_the_same_cluster_settings(monkeypatch):
    """The replays' signature (triton/_replay.py: key) holds the cluster pass's passes and, with
    the pass on, the cuda backend's two switches: a call whose launches were Triton's with the
    pass off (or a kernel's switch off) is not replayed once the pass would send it to the
    cuda backend."""
    from types import SimpleNamespace

    from condconv_kernels.triton import _replay
    _, x, routing, weight = _layer(torch.bfloat16)
    # (no Triton driver on the CPU: the current device stood in)
    monkeypatch.setattr(_replay, "driver",
                        SimpleNamespace(active=SimpleNamespace(get_current_device=lambda: 0)))
    modes = {"cluster": 1, "kgrad": 0}
    monkeypatch.setattr(torch.ops.condconv, "cuda_pointwise_cluster",
                        lambda: modes["cluster"], raising=False)
    monkeypatch.setattr(torch.ops.condconv, "cuda_pointwise_kgrad", lambda: modes["kgrad"],
                        raising=False)

    def key():
        return _replay.key("backward", (x, routing, weight), (1, 1))
    monkeypatch.setattr(_env, "TRITON_CLUSTER", frozenset())
    off = key()
    monkeypatch.setattr(_env, "TRITON_CLUSTER", _env.CLUSTER_PASSES)
    on = key()
    modes["kgrad"] = 1
    kgrad_on = key()
    modes["cluster"] = 3
    wgmma = key()
    assert len({off, on, kgrad_on, wgmma}) == 4
    assert key() == wgmma  # (the same settings, the same signature)


def test_the_kernel_gradient_asks_for_a_float32_grad_routing(monkeypatch):
    """kernel_grads hands the cuda backend's op the routing in float32 (so that grad_routing
    comes back unrounded, for the bias's share to be added to it) and the mask of the
    gradients asked for; a float16 routing stands in for one of lower precision."""
    if not hasattr(torch.ops.condconv, "native_forward"):
        pytest.skip("the C++ extension did not load")
    grad_out, x, routing, weight = _layer(torch.float16)
    seen = []
    native = torch.ops.condconv.native_backward

    def recorded(*args):
        seen.append((args[2].dtype, list(args[9])))
        return native(*args)
    monkeypatch.setattr(torch.ops.condconv, "native_backward", recorded)
    r, w = cluster.kernel_grads(grad_out, x, routing.half(), weight, True, False)
    assert seen == [(torch.float32, [False, True, False, False])]
    assert r.dtype == torch.float32 and r.shape == routing.shape and w is None
