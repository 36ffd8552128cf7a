"""Aliased and unusual views as arguments: x expanded (stride 0) or an overlapping as_strided
view, routing broadcast from (1, E), a permuted (non-contiguous) weight, and one tensor's memory
passed as two arguments (routing and bias; x and routing; x and weight). Forward and the
gradients of the underlying leaves (autograd sums the contributions of every view) against the
float64 per-example loop built the same way, on every CPU backend (triton, interpreted, once).
"""
import pytest
import torch

import condconv_kernels as cc
from condconv_kernels import reference
from conftest import CPU_BACKENDS, INTERPRETED

AVAILABLE = cc.available_backends("cpu")


def _x_expanded(g):
    # batch stride 0 and a row repeated along H (stride 0)
    leaf = torch.randn(1, 4, 1, 9, generator=g)
    return [leaf], lambda x: x.expand(3, 4, 7, 9)


def _x_overlapping(g):
    # x[b, c, h, w] = base[b * 5 + c * 3 + h + w]: every element read through many positions
    leaf = torch.randn(3 * 5 + 4 * 3 + 7 + 9, generator=g)
    return [leaf], lambda x: x.as_strided((3, 4, 7, 9), (5, 3, 1, 1))


def _plain_x(g):
    leaf = torch.randn(3, 4, 7, 9, generator=g)
    return [leaf], lambda x: x


def case_views(name):
    """(leaves, build): build(*leaves) -> (x, routing, weight, bias, conv kwargs)."""
    g = torch.Generator().manual_seed(hash(name) % 2 ** 31)
    if name in ("x_expanded", "x_overlapping", "routing_expanded", "weight_permuted"):
        xl, xf = {"x_expanded": _x_expanded, "x_overlapping": _x_overlapping}.get(
            name, _plain_x)(g)
        r = torch.rand(1 if name == "routing_expanded" else 3, 3, generator=g)
        if name == "weight_permuted":  # (kh, kw, Cin, Cout, E) memory, permuted to the layout
            w = torch.randn(3, 3, 4, 6, 3, generator=g) / 6
            wf = lambda t: t.permute(4, 3, 2, 0, 1)  # noqa: E731
        else:
            w = torch.randn(3, 6, 4, 3, 3, generator=g) / 6
            wf = lambda t: t  # noqa: E731
        b = torch.randn(3, 6, generator=g)

        def build(x, r, w, b):
            routing = r.expand(3, 3) if name == "routing_expanded" else r
            return xf(x), routing, wf(w), b, dict(stride=(1, 2), padding=1)
        return [*xl, r, w, b], build
    if name == "routing_is_bias":
        # B = E = Cout = 3: one (3, 3) tensor as routing and as bias
        x = torch.randn(3, 2, 6, 6, generator=g)
        t = torch.rand(3, 3, generator=g)
        w = torch.randn(3, 3, 2, 3, 3, generator=g) / 4
        return [x, t, w], lambda x, t, w: (x, t, w, t, dict(padding="same"))
    if name == "routing_is_view_of_x":
        # routing = x[:, :, 0, 0] (Cin = E = 4): x's memory is also the routing
        x = torch.rand(2, 4, 5, 5, generator=g)
        w = torch.randn(4, 6, 2, 3, 3, generator=g) / 4
        return [x, w], lambda x, w: (x, x[:, :, 0, 0], w, None, dict(groups=2, padding=1))
    if name == "weight_is_view_of_x":
        # weight (E=1, Cout=B, Cin, H, W) = x itself: the kernel is the size of the input
        x = torch.randn(2, 3, 4, 4, generator=g) / 4
        r = torch.rand(2, 1, generator=g)
        return [x, r], lambda x, r: (x, r, x.unsqueeze(0), None, dict(padding=1))
    if name == "depthwise_expanded":
        x = torch.randn(2, 5, 1, 8, generator=g)
        r = torch.rand(1, 2, generator=g)
        w = torch.randn(2, 5, 1, 3, 3, generator=g)
        return [x, r, w], lambda x, r, w: (x.expand(2, 5, 6, 8), r.expand(2, 2), w, None,
                                           dict(groups=5, padding=(1, 0, 1, 2), stride=2))
    raise KeyError(name)


NAMES = ["x_expanded", "x_overlapping", "routing_expanded", "weight_permuted", "routing_is_bias",
         "routing_is_view_of_x", "weight_is_view_of_x", "depthwise_expanded"]


def _run(name, backend, dtype):
    leaves, build = case_views(name)
    ours = [t.to(dtype).requires_grad_(True) for t in leaves]
    truth = [t.double().requires_grad_(True) for t in leaves]
    x, r, w, b, kw = build(*ours)
    out = cc.condconv2d(x, r, w, b, backend=backend, **kw)
    tx, tr, tw, tb, _ = build(*truth)
    from condconv_kernels import _args
    stride = _args.pair(kw.get("stride", 1), "stride", 1)
    pad = _args.resolve_padding(kw.get("padding", 0), tx.shape[-2:], tw.shape[-2:], stride,
                                (1, 1))
    ref = reference.condconv2d_loop(tx, tr, tw, tb, stride, pad, (1, 1), kw.get("groups", 1))
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64)
    grads = torch.autograd.grad(out, ours, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, truth, grad_out)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.double(), ref, **tol)
    for i, (a, t) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(a.double(), t, **tol, msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_aliased_arguments(name, backend, dtype):
    _run(name, backend, dtype)


@pytest.mark.skipif("triton" not in AVAILABLE or "triton" not in INTERPRETED,
                    reason="triton's interpreter is not available")
@pytest.mark.parametrize("name", ["x_expanded", "routing_is_bias"])
def test_aliased_arguments_triton_interpreted(name):
    _run(name, "triton", torch.float32)


def test_inputs_are_not_modified():
    """No backend writes into its inputs (an aliased output buffer would show here)."""
    leaves, build = case_views("routing_is_view_of_x")
    before = [t.clone() for t in leaves]
    x, r, w, b, kw = build(*leaves)
    for backend in CPU_BACKENDS:
        cc.condconv2d(x, r, w, b, backend=backend, **kw)
    for t, t0 in zip(leaves, before):
        assert torch.equal(t, t0)
