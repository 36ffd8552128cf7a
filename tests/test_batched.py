"""The experimental batched 1x1 passes (condconv_kernels/triton/batched.py): the forward and
grad_x from chunks of mixed kernels, the kernel gradient from chunks of per-example G, each a
batched product. Plain PyTorch products, so they run here on the CPU as they do on the GPU
(cuBLAS there; only the folds' float32 results take another route, out_dtype): checked against
the float64 reference, with their chunks, the slices of the long reductions, which calls take
them, and the switch."""
from unittest import mock

import pytest
import torch

from condconv_kernels import _env, reference
from condconv_kernels._epilogue import _inner_products
from condconv_kernels.triton import batched
from conftest import assert_close

triton_backend = pytest.importorskip("condconv_kernels.triton")


def _layer(seed, dtype, batch=6, experts=3, cin=24, cout=40, side=5, channels_last=True,
           bias=True):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, cin, side, side, generator=g).to(dtype, memory_format=fmt)
    grad_out = torch.randn(batch, cout, side, side, generator=g).to(dtype, memory_format=fmt)
    routing = torch.rand(batch, experts, generator=g).to(dtype)
    weight = (torch.randn(experts, cout, cin, 1, 1, generator=g) / cin ** 0.5).to(dtype)
    b = torch.randn(experts, cout, generator=g).to(dtype) if bias else None
    return grad_out, x, routing, weight, b


def _backward(fn, grad_out, x, routing, weight, bias, mask=(False, True, True, True)):
    return fn(grad_out, x, routing, weight, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1, list(mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 3000], ids=["one_chunk", "chunks"])
def test_matches_the_reference(dtype, channels_last, chunk_bytes, monkeypatch):
    """grad_routing, grad_weight and grad_bias of the triton backend with the switch on (the
    batched products; 3000 bytes: chunks of 1 example) against the float64 reference, within
    3x the error of the reference computed in the same dtype."""
    monkeypatch.setattr(batched, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(_env, "TRITON_BATCHED", frozenset({"kernel_grad"}))
    args = _layer(1, dtype, channels_last=channels_last)
    calls = []
    real = batched.kernel_grads
    with mock.patch.object(batched, "kernel_grads",
                           lambda *a: calls.append(1) or real(*a)):
        ours = _backward(triton_backend.backward, *args)
    assert calls, "the batched path was not taken"
    truth = _backward(reference.backward, *(t.double() for t in args))
    same = _backward(reference.backward, *args)
    for i, name in ((1, "grad_routing"), (2, "grad_weight"), (3, "grad_bias")):
        assert ours[i].dtype == args[i - 1 if i < 3 else 4].dtype
        assert_close(ours[i], truth[i].to(ours[i].dtype), same[i], name, ulps=2)


@pytest.mark.parametrize("need_r,need_w", [(True, False), (False, True)])
def test_one_gradient_at_a_time(need_r, need_w, monkeypatch):
    """Asked for one of the two, it returns that one (as the dense kernel does) and None."""
    monkeypatch.setattr(_env, "TRITON_BATCHED", frozenset({"kernel_grad"}))
    args = _layer(2, torch.float16, bias=False)
    ours = _backward(triton_backend.backward, *args, mask=(False, need_r, need_w, False))
    truth = _backward(reference.backward, *(t.double() if t is not None else None
                                            for t in args))
    same = _backward(reference.backward, *args)
    for i, wanted in ((1, need_r), (2, need_w)):
        if wanted:
            assert_close(ours[i], truth[i].to(ours[i].dtype), same[i], f"gradient {i}", ulps=2)
        else:
            assert ours[i] is None


def test_keeps_the_stationary_routing_gradient(monkeypatch):
    """With the stationary kernel's routing pass on as well (a stand-in here), the batched
    products compute grad_weight alone and the backward returns the stationary grad_routing,
    not the None of the half the products were not asked for."""
    monkeypatch.setattr(_env, "TRITON_BATCHED", frozenset({"kernel_grad"}))
    monkeypatch.setattr(_env, "TRITON_STATIONARY", frozenset({"routing"}))
    args = _layer(5, torch.float16, bias=False)
    marker = torch.rand(args[2].shape, dtype=torch.float32)
    monkeypatch.setattr(triton_backend, "_stationary_routing_grad", lambda *a: marker.clone())
    ours = _backward(triton_backend.backward, *args, mask=(False, True, True, False))
    monkeypatch.setattr(_env, "TRITON_STATIONARY", frozenset())
    alone = _backward(triton_backend.backward, *args, mask=(False, True, True, False))
    assert torch.equal(ours[1], marker.to(ours[1].dtype))
    assert torch.equal(ours[2], alone[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_examples_that_cancel(dtype, monkeypatch):
    """Examples whose G_b cancel in grad_weight's sum over the batch (the same x, grad_out of
    alternating sign plus 1% of noise, the same routing): G kept in float32, grad_weight within
    2 ulps of its scale of the float64 truth (rounded to half, the G_b would leave errors of
    several times that: 5-10% of the scale)."""
    monkeypatch.setattr(_env, "TRITON_BATCHED", frozenset({"kernel_grad"}))
    g = torch.Generator().manual_seed(8)
    B, E, cin, cout, side = 16, 3, 32, 48, 6
    x = torch.randn(1, cin, side, side, generator=g).expand(B, -1, -1, -1).contiguous()
    sign = torch.tensor([(-1.0) ** b for b in range(B)]).view(B, 1, 1, 1)
    grad_out = sign * torch.randn(1, cout, side, side, generator=g) + 0.01 * torch.randn(
        B, cout, side, side, generator=g)
    routing = torch.rand(1, E, generator=g).expand(B, -1).contiguous()
    weight = torch.randn(E, cout, cin, 1, 1, generator=g) / cin ** 0.5
    args = [t.to(dtype) for t in (grad_out, x, routing, weight)] + [None]
    ours = _backward(triton_backend.backward, *args, mask=(False, False, True, False))[2]
    truth = _backward(reference.backward, *(t.double() for t in args[:4]), None,
                      mask=(False, False, True, False))[2]
    assert_close(ours, truth.to(dtype), None, "grad_weight", ulps=2)


def test_chunks_are_even_and_within_the_bytes():
    """Every chunk the same size but the last, G's bytes within CHUNK_BYTES, as few as fit."""
    for batch, numel in ((256, 1152 * 192), (256, 1152 * 320), (7, 10), (1, 1 << 30)):
        step = batched.chunk(batch, numel, 2)
        chunks = -(-batch // step)
        assert step * numel * 2 <= max(batched.CHUNK_BYTES, numel * 2)
        assert chunks == max(1, -(-batch * numel * 2 // batched.CHUNK_BYTES)) or step == 1
        assert (chunks - 1) * step < batch <= chunks * step


@pytest.mark.parametrize("n,slices", [(2048 * 8, 8), (2048 * 3, 2), (4094, 1), (4095, 1),
                                      (1152 * 192, 64)])
def test_inner_products_over_column_slices(n, slices):
    """<G_b, W_e> summed over column slices (as many as the rule gives) equals the plain
    product to float32 rounding; the slices are what the rule says."""
    g = torch.Generator().manual_seed(n)
    G = torch.randn(5, n, generator=g)
    W = torch.randn(3, n, generator=g)
    truth = G.double() @ W.double().t()
    ours = _inner_products(G, W)
    assert ours.dtype == torch.float32
    assert_close(ours, truth.float(), G @ W.t(), "inner products")
    with mock.patch.object(torch, "bmm", wraps=torch.bmm) as bmm:
        _inner_products(G, W)
    assert bmm.call_count == (slices > 1)
    if slices > 1:
        assert bmm.call_args[0][0].shape == (slices, 5, n // slices)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("x_format,g_format", [("channels_last", "channels_last"),
                                               ("contiguous", "contiguous"),
                                               ("channels_last", "contiguous")])
@pytest.mark.parametrize("chunk_bytes", [32 << 20, 3000], ids=["one_chunk", "chunks"])
def test_forward_and_grad_x_match_the_reference(dtype, x_format, g_format, chunk_bytes,
                                                monkeypatch):
    """The forward (with and without bias) and grad_x from chunks of mixed kernels (3000 bytes:
    one example a chunk) against the float64 reference, within 3x the error of the reference in
    the same dtype; each in the memory format of x, grad_out in its own."""
    monkeypatch.setattr(batched, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(_env, "TRITON_BATCHED", frozenset({"forward", "grad_x"}))
    grad_out, x, routing, weight, bias = _layer(5, dtype, channels_last=x_format ==
                                                "channels_last")
    fmt = torch.channels_last if g_format == "channels_last" else torch.contiguous_format
    grad_out = grad_out.contiguous(memory_format=fmt)
    geometry = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
    with mock.patch.object(triton_backend, "dense_fwd_kernel",
                           side_effect=AssertionError("the dense kernel ran")), \
            mock.patch.object(triton_backend, "dense_bwd_x_kernel",
                              side_effect=AssertionError("the dense kernel ran")):
        for b in (bias, None):
            ours = triton_backend.forward(x, routing, weight, b, *geometry)
            truth = reference.forward(x.double(), routing.double(), weight.double(),
                                      None if b is None else b.double(), *geometry)
            same = reference.forward(x, routing, weight, b, *geometry)
            assert ours.is_contiguous(memory_format=torch.channels_last) == (
                x_format == "channels_last")
            assert_close(ours, truth.to(dtype), same, "out", ulps=2)
        ours = _backward(triton_backend.backward, grad_out, x, routing, weight, bias,
                         mask=(True, False, False, False))[0]
    truth = _backward(reference.backward, *(t.double() for t in (grad_out, x, routing, weight,
                                                                 bias)),
                      mask=(True, False, False, False))[0]
    same = _backward(reference.backward, grad_out, x, routing, weight, bias,
                     mask=(True, False, False, False))[0]
    assert ours.is_contiguous(memory_format=torch.channels_last) == (x_format == "channels_last")
    assert_close(ours, truth.to(dtype), same, "grad_x", ulps=2)


def test_which_calls_take_it():
    """Only 1x1, stride 1, unpadded, ungrouped, half-precision calls without scales whose
    tensors read keep their pixels at one stride; the kernel gradient also at most MAX_PIXELS
    pixels an example."""
    grad_out, x, routing, weight, _ = _layer(3, torch.bfloat16)
    ok = dict(stride=(1, 1), padding=(0, 0, 0, 0), groups=1)
    assert batched.eligible(x, weight, **ok)
    assert batched.eligible(x, weight, **ok, also=grad_out)
    assert not batched.eligible(x.float(), weight.float(), **ok)
    assert not batched.eligible(x, weight, **ok, scales=(None, routing, None))
    assert not batched.eligible(x, weight, **dict(ok, stride=(2, 2)))
    assert not batched.eligible(x, weight, **dict(ok, padding=(1, 1, 1, 1)))
    assert not batched.eligible(x, weight, **dict(ok, groups=2))
    w3 = torch.randn(3, 40, 24, 3, 3, dtype=torch.bfloat16)
    assert not batched.eligible(x, w3, **ok)
    sliced = torch.randn(6, 24, 5, 7, dtype=torch.bfloat16)[..., :5]  # rows not at one stride
    assert not batched.eligible(sliced, weight, **ok)
    assert not batched.eligible(x, weight, **ok, also=sliced)
    with mock.patch.object(batched, "MAX_PIXELS", 24):
        assert batched.eligible(x, weight, **ok)  # the forward has no chain over the pixels
        assert not batched.eligible(x, weight, **ok, also=grad_out)


def test_off_by_default_and_the_dense_kernels_otherwise(monkeypatch):
    """The switch off (the default), or a call it does not take (float32), never reaches the
    batched products; each pass named turns on that pass alone."""
    assert _env.TRITON_BATCHED == frozenset()
    geometry = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
    names = ("forward", "grad_x", "kernel_grads")
    for on, dtype, taken in ((frozenset(), torch.float16, set()),
                             (_env.BATCHED_PASSES, torch.float32, set()),
                             (frozenset({"grad_x"}), torch.float16, {"grad_x"}),
                             (frozenset({"forward", "kernel_grad"}), torch.float16,
                              {"forward", "kernel_grads"})):
        monkeypatch.setattr(_env, "TRITON_BATCHED", on)
        grad_out, x, routing, weight, bias = _layer(4, dtype)
        with mock.patch.multiple(batched, **{n: mock.DEFAULT for n in names}) as ours, \
                mock.patch.multiple(triton_backend, dense_fwd_kernel=mock.DEFAULT,
                                    dense_bwd_x_kernel=mock.DEFAULT,
                                    dense_bwd_w_kernel=mock.DEFAULT):
            ours["kernel_grads"].return_value = (None, None)
            triton_backend.forward(x, routing, weight, bias, *geometry)
            _backward(triton_backend.backward, grad_out, x, routing, weight, bias,
                      mask=(True, True, True, False))
        assert {n for n in names if ours[n].called} == taken, (on, dtype)


def test_float32_routing_enters_as_two_half_parts():
    """autocast keeps the routing weights in float32 beside bfloat16 tensors: the batched
    passes' mixed kernels (and grad_weight's fold, through routing_parts) carry them as two
    bfloat16 parts, so each mixed weight is the float64 mix rounded once (within one bfloat16
    ulp), where rounding the routing to bfloat16 first misses by more."""
    from condconv_kernels._epilogue import routing_parts
    g = torch.Generator().manual_seed(6)
    r = torch.rand(16, 8, generator=g)
    w = torch.randn(8, 64, 48, 1, 1, generator=g).to(torch.bfloat16)
    parts = routing_parts(r, torch.bfloat16)
    assert parts.shape == (16, 16) and parts.dtype == torch.bfloat16
    assert (parts[:, :8].double() + parts[:, 8:].double() - r.double()).abs().max() <= 2 ** -16
    assert routing_parts(r.to(torch.bfloat16), torch.bfloat16).shape == (16, 8)
    truth = (r.double() @ w.double().reshape(8, -1)).view(16, 64, 48)
    # One ulp of each (at most), and float32's sums where the experts cancel to near zero.
    magnitude = (r.double() @ w.double().abs().reshape(8, -1)).view(16, 64, 48)
    bound = truth.abs().to(torch.bfloat16).double() * 2 ** -7 + magnitude * 2 ** -16
    ours = batched._Mixer(r, w, torch.bfloat16)(slice(0, 16)).double()
    rounded = batched._Mixer(r.to(torch.bfloat16), w, torch.bfloat16)(slice(0, 16)).double()
    assert ((ours - truth).abs() <= bound).all()
    assert ((rounded - truth).abs() > bound).any()
    # grad_weight's fold: routing^T G with float32 routing, float32 results.
    from condconv_kernels._epilogue import fold_kernel_grads
    G = torch.randn(16, 64 * 48, generator=g).to(torch.bfloat16)
    _, gw = fold_kernel_grads(G, r, w, False, True, torch.float32, weight_dtype=torch.float32)
    truth = (r.double().t() @ G.double()).view(w.shape)
    magnitude = (r.double().t() @ G.double().abs()).view(w.shape)
    assert ((gw.double() - truth).abs() <= magnitude * 2 ** -15).all()
    _, gw_rounded = fold_kernel_grads(G, r.to(torch.bfloat16), w, False, True, torch.float32,
                                      weight_dtype=torch.float32)
    assert ((gw_rounded.double() - truth).abs() > magnitude * 2 ** -15).any()
