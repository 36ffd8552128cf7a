"""The host side of the experimental dense 1x1 kernel gradient in the tensor cores' accumulator
layout (triton/pointwise_grad.py), which runs without a GPU: its plan, the programs of a launch,
which calls it takes, the launch it makes and the sums the host makes of the kernel's partial
sums, and the triton backend's use of it (the kernel itself runs only on an sm_90 GPU:
tests/test_gpu.py::test_gpu_pointwise_kernel_grad; its compile: test_triton_compile.py)."""
from unittest import mock

import pytest
import torch
from conftest import LaunchRecorder

pointwise_grad = pytest.importorskip("condconv_kernels.triton.pointwise_grad")
pytestmark = pytest.mark.skipif(not pointwise_grad.AVAILABLE, reason="this Triton has no Gluon")

CL = torch.channels_last


def _layer(seed, B=5, E=3, cin=48, cout=80, side=5, dtype=torch.bfloat16):
    """x, grad_out (channels_last), routing and weight of a 1x1 layer, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cin, side, side, generator=g).to(dtype).contiguous(memory_format=CL)
    grad_out = torch.randn(B, cout, side, side, generator=g).to(dtype).contiguous(
        memory_format=CL)
    return x, grad_out, torch.rand(B, E, generator=g), torch.randn(
        E, cout, cin, 1, 1, generator=g).to(dtype)


@pytest.mark.parametrize("experts,cin,cout,pixels,fits", [
    (8, 192, 1152, 49, True), (8, 1152, 192, 49, True), (1, 16, 16, 1, True),
    (8, 16, 16, pointwise_grad.MAX_PIXELS, True), (9, 192, 1152, 49, False),
    (8, 16, 16, pointwise_grad.MAX_PIXELS + 1, False), (8, 24, 32, 49, False),
    (8, 32, 24, 49, False), (0, 16, 16, 49, False)])
def test_plan_scope(experts, cin, cout, pixels, fits):
    """A plan for at most 8 experts, channels in multiples of 16 and planes of at most
    MAX_PIXELS pixels: tiles of 64 x 16 input channels in 4 warps, 64 x 32 in 8 (the
    default); its shared memory two buffers of (64 + BLOCK_CI) x 64 16-bit values."""
    for warps, block_ci in ((4, 16), (8, 32)):
        plan = pointwise_grad.plan(experts, cin, cout, pixels, warps)
        assert (plan is not None) == fits
        if fits:
            assert (plan["BLOCK_CI"], plan["WARPS"], plan["NBUF"]) == (block_ci, warps, 2)
            assert plan["shared_bytes"] == 2 * 2 * (64 + block_ci) * 64
    assert pointwise_grad.plan(experts, cin, cout, pixels) == pointwise_grad.plan(
        experts, cin, cout, pixels, 8)
    with pytest.raises(ValueError, match="warps must be one of"):
        pointwise_grad.plan(experts, cin, cout, pixels, 2)


@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("batch,cin,cout", [(256, 192, 1152), (5, 48, 80), (1, 16, 16),
                                            (9, 1152, 320), (7, 32, 64)])
def test_programs_cover_each_tile_and_example_once(batch, cin, cout, warps):
    """Program i owns input-channel tile i % n_ci, output-channel tile i // n_ci % n_co and the
    examples [i // (n_ci n_co) * per, + per): every (tile, example) exactly once, no program
    without an example, at most 8 batch slices."""
    plan = pointwise_grad.plan(1, cin, cout, 49, warps)
    n_ci, n_co, per, count = pointwise_grad.programs(batch, cin, cout, plan)
    assert (n_ci, n_co) == (-(-cin // (4 * warps)), -(-cout // 64))
    assert count % (n_ci * n_co) == 0
    tiles = n_ci * n_co
    covered = [(i % n_ci, i // n_ci % n_co, b) for i in range(count)
               for b in range(i // tiles * per, min(batch, i // tiles * per + per))]
    assert sorted(covered) == [(c, o, b) for c in range(n_ci) for o in range(n_co)
                               for b in range(batch)]
    assert all(i // tiles * per < batch for i in range(count))
    assert count // tiles <= pointwise_grad.SPLITS


def _emulate(named, kwargs):
    """What the kernel writes, computed in float64 from the launch's own arguments (x and
    grad_out read through the strides it passes): per batch slice every expert's gradient
    tile, per (tile, example, warp) the sums of G_b W[e] over the warp's share of the tile:
    share i = 16 rows (i // WN) and the (i % WN)-th of WN = WARPS / 4 groups of columns, as
    _warp_sums orders them."""
    B, cin, cout, P = named["B"], named["CIN"], named["COUT"], named["P"]
    per, n_ci, n_co = named["PER_SPLIT"], named["N_CI"], named["N_CO"]
    E, bci, bco, warps = kwargs["E"], kwargs["BLOCK_CI"], kwargs["BLOCK_CO"], kwargs["WARPS"]
    x = named["x_ptr"].as_strided((B, P, cin), (named["s_xb"], named["s_xp"], 1)).double()
    g = named["g_ptr"].as_strided((B, P, cout), (named["s_gb"], named["s_gp"], 1)).double()
    r = named["r_ptr"].as_strided((B, E), (named["s_rb"], named["s_re"])).double()
    w = named["w_ptr"].as_strided((E, cout, cin), (named["s_we"], named["s_wr"], 1)).double()
    G = torch.einsum("bpo,bpc->boc", g, x)  # (B, Cout, Cin)
    splits = -(-B // per)
    if kwargs["NEED_W"]:
        gw = named["gw_ptr"].view(splits, E, cout, cin)
        for s in range(splits):
            gw[s] = torch.einsum("be,boc->eoc", r[s * per:(s + 1) * per],
                                 G[s * per:(s + 1) * per]).float()
    if kwargs["NEED_R"]:
        part = named["part_ptr"].view(n_co * n_ci, B, warps, E)
        for i_co in range(n_co):
            for i_ci in range(n_ci):
                wn = warps // 4
                for wp in range(warps):
                    rg, cg = divmod(wp, wn)
                    rows = slice(i_co * bco + 16 * rg, i_co * bco + 16 * (rg + 1))
                    cols = slice(i_ci * bci + cg * bci // wn, i_ci * bci + (cg + 1) * bci // wn)
                    part[i_co * n_ci + i_ci, :, wp] = torch.einsum(
                        "boc,eoc->be", G[:, rows, cols], w[:, rows, cols]).float()


@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("need_r,need_w", [(True, True), (True, False), (False, True)])
def test_launch_and_the_host_sums(need_r, need_w, warps):
    """kernel_grads() on CPU tensors with the launch recorded and its writes emulated: every
    kernel parameter given once, the sizes and strides describing x, grad_out (channels_last)
    and W, and the host's sums of the partial sums equal to grad_weight and grad_routing
    computed independently; a half not asked for is None and its flag off."""
    x, grad_out, routing, weight = _layer(1)
    B, cin = x.shape[:2]
    cout = grad_out.shape[1]
    plan = pointwise_grad.plan(weight.shape[0], cin, cout, 25, warps)
    fn = pointwise_grad.pw_kgrad_kernel
    params = fn.arg_names
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    recorder = LaunchRecorder(fn, lambda grid, named, kwargs: _emulate(named, kwargs))
    launches = recorder.launches
    with mock.patch.object(pointwise_grad, "pw_kgrad_kernel", recorder):
        grad_routing, grad_weight = pointwise_grad.kernel_grads(
            grad_out, x, routing, weight, need_r, need_w, plan)
    (grid, named, kwargs), = launches
    assert len(named) == len(params) - len(constexprs)
    assert set(kwargs) == constexprs | {"num_warps"}
    assert (kwargs["NEED_R"], kwargs["NEED_W"]) == (need_r, need_w)
    assert kwargs["WARPS"] == kwargs["num_warps"] == warps
    assert grid == (pointwise_grad.programs(B, cin, cout, plan)[3],)
    assert named["s_xp"] == cin and named["s_gp"] == cout  # channels_last pixels
    G = torch.einsum("bop,bcp->boc", grad_out.double().flatten(2), x.double().flatten(2))
    w = weight.double()[..., 0, 0]
    if need_r:
        torch.testing.assert_close(grad_routing.double(), torch.einsum("boc,eoc->be", G, w),
                                   rtol=1e-5, atol=1e-4)
    else:
        assert grad_routing is None
    if need_w:
        assert grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype
        torch.testing.assert_close(
            grad_weight.double()[..., 0, 0],
            torch.einsum("be,boc->eoc", routing.double(), G).to(weight.dtype).double())
    else:
        assert grad_weight is None


def test_fits_takes_only_what_the_kernel_reads():
    """Taken: a 1x1 layer at stride 1 without padding, one group, float16 / bfloat16, x and
    grad_out channels_last with channels multiples of 16, no per-example scales. Refused:
    each of those broken, and planes or experts past the plan's limits."""
    x, grad_out, routing, weight = _layer(2, E=4, cin=32, cout=64)
    geometry = ((1, 1), (0, 0, 0, 0), (1, 1), 1)

    def fits(x=x, grad_out=grad_out, weight=weight, geometry=geometry, scales=(None,) * 3):
        return pointwise_grad.fits(x, grad_out, weight, *geometry, scales=scales)
    assert fits() == pointwise_grad.plan(4, 32, 64, 25)
    assert fits(x.half(), grad_out.half(), weight.half()) is not None
    # One pixel an example, where PyTorch leaves channels_last strides as (C, 1, 1, 1).
    one_x, one_g = (torch.randn(3, c, 1, 1, dtype=torch.bfloat16).contiguous(memory_format=CL)
                    for c in (32, 64))
    assert one_x.stride() == (32, 1, 1, 1)
    assert fits(one_x, one_g) == pointwise_grad.plan(4, 32, 64, 1)
    refused = [
        dict(x=x.float(), grad_out=grad_out.float(), weight=weight.float()),  # float32
        dict(x=x.contiguous()),  # NCHW
        dict(grad_out=grad_out.contiguous()),
        dict(geometry=((2, 2), (0, 0, 0, 0), (1, 1), 1)),  # stride
        dict(geometry=((1, 1), (1, 1, 1, 1), (1, 1), 1)),  # padding
        dict(geometry=((1, 1), (0, 0, 0, 0), (1, 1), 2),
             weight=weight[:, :, :16]),  # groups
        dict(weight=torch.randn(4, 64, 32, 3, 3, dtype=torch.bfloat16)),  # 3x3
        dict(weight=torch.randn(9, 64, 32, 1, 1, dtype=torch.bfloat16)),  # 9 experts
        dict(scales=(torch.rand(5, 32), None, None)),
        dict(scales=(None, None, torch.rand(5, 1, 1))),
        dict(x=torch.randn(5, 24, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=CL),
             weight=torch.randn(4, 64, 24, 1, 1, dtype=torch.bfloat16)),  # 24 channels
        dict(x=torch.randn(5, 32, 65, 65, dtype=torch.bfloat16).contiguous(memory_format=CL),
             grad_out=torch.randn(5, 64, 65, 65, dtype=torch.bfloat16).contiguous(
                 memory_format=CL)),  # past MAX_PIXELS
    ]
    for bad in refused:
        assert fits(**bad) is None, bad
    # No examples; an example whose offsets pass int32 (the batch expanded, stride 0, its 17
    # pixels 2**27 elements apart; meta tensors).
    assert fits(x=x[:0], grad_out=grad_out[:0]) is None
    meta = dict(device="meta", dtype=torch.bfloat16)
    go = torch.empty(2, 64, 1, 17, **meta).contiguous(memory_format=CL)
    ok = torch.empty(2, 32, 1, 17, **meta).contiguous(memory_format=CL)
    wide = torch.empty_strided((2, 32, 1, 17), (0, 1, 17 * 2 ** 27, 2 ** 27), **meta)
    w = torch.empty(4, 64, 32, 1, 1, **meta)
    assert fits(x=ok, grad_out=go, weight=w) is not None
    assert fits(x=wide, grad_out=go, weight=w) is None
    # Not on a CPU tensor, whatever fits says.
    assert pointwise_grad.eligible(x, grad_out, weight, *geometry) is None


def test_backend_takes_the_kernel_gradient_where_switched():
    """With the switch's kernel_grad pass on and the kernel taking the call (stand-ins here),
    the triton backward returns its two halves; with the routing pass on too, the stationary
    kernel's grad_routing and this kernel for the weight alone; off, neither is asked."""
    import condconv_kernels.triton as backend
    from condconv_kernels import _env
    x, grad_out, routing, weight = _layer(3, dtype=torch.float32)
    args = (grad_out, x, routing, weight, None, (1, 1), (0, 0, 0, 0), (1, 1), 1,
            (False, True, True, False))
    r_mark, w_mark, s_mark = torch.rand(5, 3), torch.rand_like(weight), torch.rand(5, 3)
    calls = []

    def kernel_grads(g, xx, r, w, need_r, need_w, plan):
        calls.append((need_r, need_w, plan))
        return (r_mark if need_r else None), (w_mark if need_w else None)
    plan = {"BLOCK_CI": 16}
    with mock.patch.object(pointwise_grad, "eligible", lambda *a, **k: plan), \
            mock.patch.object(pointwise_grad, "kernel_grads", kernel_grads), \
            mock.patch.object(backend, "_stationary_routing_grad", lambda *a: s_mark):
        with mock.patch.object(_env, "TRITON_STATIONARY", frozenset({"kernel_grad"})):
            on = backend.backward(*args)
        assert calls == [(True, True, plan)]
        assert on[1] is r_mark and on[2] is w_mark
        calls.clear()
        with mock.patch.object(_env, "TRITON_STATIONARY", frozenset({"kernel_grad",
                                                                     "routing"})):
            both = backend.backward(*args)
        assert calls == [(False, True, plan)]
        assert both[1] is s_mark and both[2] is w_mark
        calls.clear()
        with mock.patch.object(_env, "TRITON_STATIONARY", frozenset()):
            off = backend.backward(*args)
        assert calls == [] and not torch.equal(off[2], w_mark)


def test_a_training_steps_dense_layers_fit():
    """Every dense 1x1 layer's backward in a training step of tf_efficientnet_cc_b0_8e, channels
    last under bfloat16 autocast (as the kit's graphed training step runs it), gets a plan: x
    and grad_out channels_last in bfloat16, the weight in bfloat16 (the autocast rule), no
    scales; recorded from the cpu backend's backward, whose arguments are the same."""
    import condconv_kernels.ops as ops
    from condconv_kernels.models import create_model
    calls = []
    cpu = ops._BACKWARD["cpu"]

    def recorded(grad_out, x, routing, weight, bias, stride, padding, dilation, groups, *rest):
        if weight.shape[-2:] == (1, 1) and weight.shape[2] > 1:
            calls.append(pointwise_grad.fits(x, grad_out, weight, stride, padding, dilation,
                                             groups))
        return cpu(grad_out, x, routing, weight, bias, stride, padding, dilation, groups, *rest)
    model = create_model("tf_efficientnet_cc_b0_8e").to(memory_format=CL)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "cpu"
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    with mock.patch.dict(ops._BACKWARD, {"cpu": recorded}):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
    assert len(calls) == 16 and all(plan is not None for plan in calls), calls
