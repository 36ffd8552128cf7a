"""Determinism, 64-bit offsets, NaN routing, atomic checkpoints."""
import os

import pytest
import torch

import condconv_kernels as cc
from condconv_kernels.models import create_model, load_checkpoint, save_checkpoint
from conftest import (CASES_BY_NAME, CPU_BACKENDS, INTERPRETED, assert_close, assert_repeatable,
                      ground_truth, make_inputs, run_op)

DETERMINISM = [CASES_BY_NAME[n] for n in ("k1_s2_e8", "dw3_s2_b1_e1_nobias", "k3_s2_asym",
                                          "g2_s2_e8_b1")]


# The interpreted backend gets one case: ten runs of each are slow there.
@pytest.mark.parametrize("backend,case", [
    pytest.param(b, c, id=f"{b}-{c}") for b in CPU_BACKENDS
    for c in (DETERMINISM[:1] if b in INTERPRETED else DETERMINISM)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_bitwise_deterministic(case, deterministic, backend):
    c = type(case)(**{**case.__dict__, "B": 9})  # more examples than threads: chunks, partials
    inputs = make_inputs(c, torch.float32, seed=3)
    grad_out = torch.randn(run_op(c, inputs, backend)[0].shape)
    assert_repeatable(c, inputs, backend, grad_out, deterministic)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b not in INTERPRETED])
@pytest.mark.parametrize("case", ["k3_s2_asym", "dw3", "k1"])
def test_strides_beyond_32_bits(case, backend):
    """x is a view whose batch stride is 2**31 elements: every offset past example 0 needs 64-bit
    arithmetic. The storage is virtual memory: only the touched pages are ever backed. (Triton's
    interpreter copies whole storages to the host, so the triton backend is checked for this on
    the GPU.)"""
    c = CASES_BY_NAME[case]
    c = type(c)(**{**c.__dict__, "B": 2})  # 2**31 + a few elements of address space
    x, routing, weight, bias = make_inputs(c, torch.float32, seed=4)
    B, C, H, W = x.shape
    big = torch.empty(2 ** 31 * (B - 1) + C * H * W, dtype=torch.float32)
    view = big.as_strided(x.shape, (2 ** 31, H * W, W, 1))
    view.copy_(x)
    truth, _ = ground_truth(c, (x, routing, weight, bias))
    grad_out = torch.randn(truth.shape, dtype=torch.float32)
    out, grads = run_op(c, (view, routing, weight, bias), backend, grad_out)
    ref_out, ref_grads = run_op(c, (x.contiguous(), routing, weight, bias), backend, grad_out)
    # The contiguous copy may take another path (float32 NCHW depthwise: the grouped
    # convolution), so the comparison is to float32 rounding, not bitwise.
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert_close(out, truth, None, "out", atol=1e-4)
    del big, view


def test_nan_routing_stays_in_its_example(backend):
    """Documented behaviour: NaN/Inf routing weights are not checked (that would synchronise the
    GPU); they propagate to that example's output only."""
    c = CASES_BY_NAME["k3"]
    x, routing, weight, bias = make_inputs(c, torch.float32, seed=5)
    routing = routing.clone()
    routing[1, 0] = float("nan")
    out = cc.condconv2d(x, routing, weight, bias, padding=1, backend=backend)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    model = create_model("tf_efficientnet_b0", num_classes=10)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(model, str(path))
    original = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, str(path))
    assert path.read_bytes() == original  # the old checkpoint survives
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary file left behind
    monkeypatch.undo()
    other = create_model("tf_efficientnet_b0", num_classes=10)
    load_checkpoint(other, str(path))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    st = save_checkpoint(model, str(tmp_path / "ckpt.safetensors"))
    load_checkpoint(other, st)
