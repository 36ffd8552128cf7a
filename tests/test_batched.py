"""The experimental batched 1x1 kernel gradient (condconv_kernels/triton/batched.py): per-example
G in chunks by batched products, folded by two more. Plain PyTorch products, so it runs here on
the CPU exactly as it does on the GPU (cuBLAS there): checked against the float64 reference,
its chunks, the slices of its long reductions, which calls take it, and the switch."""
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
    monkeypatch.setattr(_env, "TRITON_BATCHED", True)
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
    monkeypatch.setattr(_env, "TRITON_BATCHED", True)
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


def test_which_calls_take_it():
    """Only 1x1, stride 1, unpadded, ungrouped, half-precision calls without scales whose x
    and grad_out keep their pixels at one stride, of at most MAX_PIXELS pixels."""
    grad_out, x, routing, weight, _ = _layer(3, torch.bfloat16)
    ok = dict(stride=(1, 1), padding=(0, 0, 0, 0), groups=1)
    assert batched.eligible(x, grad_out, weight, **ok)
    assert not batched.eligible(x.float(), grad_out.float(), weight.float(), **ok)
    assert not batched.eligible(x, grad_out, weight, **ok, scales=(None, routing, None))
    assert not batched.eligible(x, grad_out, weight, **dict(ok, stride=(2, 2)))
    assert not batched.eligible(x, grad_out, weight, **dict(ok, padding=(1, 1, 1, 1)))
    assert not batched.eligible(x, grad_out, weight, **dict(ok, groups=2))
    w3 = torch.randn(3, 40, 24, 3, 3, dtype=torch.bfloat16)
    assert not batched.eligible(x, grad_out, w3, **ok)
    sliced = torch.randn(6, 24, 5, 7, dtype=torch.bfloat16)[..., :5]  # rows not at one stride
    assert not batched.eligible(sliced, grad_out, weight, **ok)
    with mock.patch.object(batched, "MAX_PIXELS", 24):
        assert not batched.eligible(x, grad_out, weight, **ok)


def test_off_by_default_and_the_dense_kernel_otherwise(monkeypatch):
    """The switch off (the default), or a call it does not take (float32), never reaches the
    batched products."""
    assert _env._switch("CONDCONV_TEST_UNSET_SWITCH") is False
    with mock.patch.object(batched, "kernel_grads", side_effect=AssertionError("taken")), \
            mock.patch.object(triton_backend, "dense_bwd_w_kernel") as dense:
        monkeypatch.setattr(_env, "TRITON_BATCHED", False)
        _backward(triton_backend.backward, *_layer(4, torch.float16), mask=(False, True, True,
                                                                            False))
        monkeypatch.setattr(_env, "TRITON_BATCHED", True)
        _backward(triton_backend.backward, *_layer(4, torch.float32), mask=(False, True, True,
                                                                            False))
    assert dense.__getitem__.call_count == 2


def test_the_switch_names_itself_on_a_bad_value(monkeypatch):
    monkeypatch.setenv("CONDCONV_TRITON_BATCHED", "yes")
    with pytest.raises(ValueError, match="CONDCONV_TRITON_BATCHED must be 0 or 1"):
        _env._switch("CONDCONV_TRITON_BATCHED")
