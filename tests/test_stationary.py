"""The experimental experts-stationary 1x1 kernel's host side (triton/stationary.py), which runs
without a GPU: its shared-memory plan, the launch it makes, which calls it takes (the dual's and
the scales' layouts) and the triton backend's use of it pass by pass (the kernel itself runs
only on an sm_90 GPU: tests/test_gpu.py::test_gpu_stationary_*; its compile:
test_triton_compile.py; its switch's values: test_env.py)."""
from unittest import mock

import pytest
import torch

stationary = pytest.importorskip("condconv_kernels.triton.stationary")
pytestmark = pytest.mark.skipif(not stationary.AVAILABLE, reason="this Triton has no Gluon")


def _small_layer(seed: int, cout: int = 16):
    """x (2, 16, 4, 4), routing (2, 3), weight (3, cout, 16, 1, 1) and a generator for more,
    for the triton backend on the CPU (skips where it has none)."""
    import condconv_kernels as cc
    if "triton" not in cc.available_backends("cpu"):
        pytest.skip("no triton backend on the CPU")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, 3, generator=g),
            torch.randn(3, cout, 16, 1, 1, generator=g), g)


@pytest.mark.parametrize("experts,k,pixels", [(8, 192, 49), (8, 112, 196), (8, 80, 196),
                                              (2, 448, 49), (8, 16, 12544)])
def test_plan_counts_the_shared_memory_it_allocates(experts, k, pixels):
    """The plan's bytes, counted independently from the buffers the kernel allocates: the E
    experts' (64 x K) slab, the pixel tiles (two where the mix goes to shared memory) and the
    mixed (64 x K) kernel; K padded to the chunk; chunks of 64 unless 32 pads less."""
    plan = stationary.plan(experts, k, pixels)
    k_pad = plan["NUM_KC"] * plan["BLOCK_K"]
    assert k_pad >= k and k_pad - k < plan["BLOCK_K"]
    assert k_pad == min(-(-k // 64) * 64, -(-k // 32) * 32)
    n = plan["BLOCK_N"]
    assert n >= min(pixels, 128) and n <= 128 and plan["A_SMEM"] == (n > 64)
    buffers = experts * 64 * k_pad + (2 if plan["A_SMEM"] else 1) * k_pad * n
    buffers += 64 * k_pad if plan["A_SMEM"] else 0
    assert plan["shared_bytes"] == 2 * buffers <= 227 * 1024
    assert plan["NBUF"] == (2 if plan["A_SMEM"] else 1)


@pytest.mark.parametrize("experts,k,pixels,block_n,nbuf", [
    (8, 192, 49, 32, 2), (8, 112, 196, 64, 2), (4, 192, 49, 64, 2), (8, 80, 196, 64, 2),
    (3, 48, 9, 16, 2), (2, 200, 3136, 64, 2)])
def test_routing_plan(experts, k, pixels, block_n, nbuf):
    """The routing-gradient form: no mixed kernel; per pixel tile (at most 64) the K x BLOCK_N
    tile and the dual's 64 x BLOCK_N, two buffers of the widest tile that fits beside the slab
    (at E = 8, K = 192 tiles of 32 pixels); at most 4 K chunks."""
    plan = stationary.plan(experts, k, pixels, routing=True)
    k_pad = plan["NUM_KC"] * plan["BLOCK_K"]
    assert k_pad >= k and plan["NUM_KC"] <= 4 and not plan["A_SMEM"]
    assert (plan["BLOCK_N"], plan["NBUF"]) == (block_n, nbuf)
    tile = (k_pad + 64) * block_n
    assert plan["shared_bytes"] == 2 * (experts * 64 * k_pad + nbuf * tile) <= 226 * 1024
    if block_n < min(64, pixels):  # the wider tile would not fit
        assert 2 * (experts * 64 * k_pad + nbuf * (k_pad + 64) * 2 * block_n) > 226 * 1024


def test_routing_plan_limits():
    """More than 4 K chunks of 64 (K > 256) has no routing plan; K = 144 takes chunks of 64
    (3) rather than 5 of 32."""
    assert stationary.plan(2, 320, 49, routing=True) is None
    assert stationary.plan(8, 144, 49, routing=True)["BLOCK_K"] == 64
    assert stationary.plan(8, 144, 49)["BLOCK_K"] == 32  # the forward pads less


def test_no_plan_past_shared_memory():
    """The project layers' forward (K = 1152 at E = 8) does not fit; E = 8 at K = 192 fits only
    with one pixel tile of 64 (7x7), not with the 14x14 form's extra buffers."""
    assert stationary.plan(8, 1152, 49) is None
    assert stationary.plan(8, 192, 49) is not None
    assert stationary.plan(8, 192, 196) is None


@pytest.mark.parametrize("scaled", [False, True], ids=["", "scaled"])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "grad_x"])
def test_launch_arguments(transposed, scaled):
    """run() on CPU tensors with the launch recorded: every kernel parameter given once, the
    weight read as (E, rows, K) through its strides (W^T for grad_x), one program per SM at
    most, and the batch slices covering the batch; with the per-example scales, the one over
    the reduction (in_scale forward, out_scale for grad_x) as the column scale, the other as
    the row scale, tap_scale as (B, 1), each read through its stride between examples."""
    B, E, cin, cout, side = 10, 4, 48, 96, 5
    x = torch.randn(B, cin, side, side).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(E, cout, cin, 1, 1)
    inp = torch.randn(B, cout, side, side).contiguous(
        memory_format=torch.channels_last) if transposed else x
    rows, k = (cin, cout) if transposed else (cout, cin)
    out = torch.empty(B, rows, side, side).contiguous(memory_format=torch.channels_last)
    plan = stationary.plan(E, k, side * side)
    launches = []
    # in_scale a slice of a wider tensor (examples 2 * Cin apart), out_scale contiguous.
    scales = ((torch.rand(B, 2 * cin)[:, :cin], torch.rand(B, cout), torch.rand(B, 1, 1))
              if scaled else stationary.NO_SCALES)

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))
    props = mock.Mock(multi_processor_count=6)
    with mock.patch.object(stationary, "pw_stationary_kernel", Recorder()), \
            mock.patch("torch.cuda.get_device_properties", return_value=props):
        stationary.run(inp, torch.rand(B, E), weight, None, out, plan, transposed=transposed,
                       scales=scales)
    (grid, args, kwargs), = launches
    fn = stationary.pw_stationary_kernel
    params = fn.arg_names
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    assert len(args) == len(params) - len(constexprs) and set(kwargs) == constexprs | {
        "num_warps"}
    named = dict(zip(params, args))
    assert (named["K"], named["COUT"], named["P"]) == (k, rows, side * side)
    element = {"s_we": cout * cin}
    element.update({"s_wr": 1, "s_wk": cin} if transposed else {"s_wr": cin, "s_wk": 1})
    assert {n: named[n] for n in element} == element
    assert named["s_xp"] == k and named["s_op"] == rows  # channels_last pixels
    n_co = -(-rows // 64)
    assert named["N_CO"] == n_co and grid[0] <= max(6, n_co)
    slices = grid[0] // n_co
    assert grid[0] % n_co == 0 and (slices - 1) * named["PER_PROG"] < B <= slices * named[
        "PER_PROG"]
    assert kwargs["W_T"] == transposed and kwargs["HAS_BIAS"] is False
    assert kwargs["ROUTING_GRAD"] is False and kwargs["NBUF"] == plan["NBUF"]
    flags = (kwargs["COL_SCALE"], kwargs["ROW_SCALE"], kwargs["TAP_SCALE"])
    assert flags == (scaled,) * 3
    if scaled:
        in_s, out_s, tap_s = scales
        col, row = (out_s, in_s) if transposed else (in_s, out_s)
        assert named["cs_ptr"].data_ptr() == col.data_ptr() and named["s_cb"] == col.stride(0)
        assert named["rs_ptr"].data_ptr() == row.data_ptr() and named["s_rsb"] == row.stride(0)
        assert named["cs_ptr"].shape == (B, k) and named["rs_ptr"].shape == (B, rows)
        assert named["ts_ptr"].shape == (B, 1) and named["s_tb"] == 1
        assert named["s_cb"] == (cout if transposed else 2 * cin)


@pytest.mark.parametrize("batch,rows,sms", [(256, 1152, 132), (256, 480, 132), (7, 160, 132),
                                            (256, 64 * 200, 132), (1, 64, 1), (33, 96, 5)])
def test_programs_cover_each_row_block_and_example_once(batch, rows, sms):
    """Program i owns row block i % n_co and the examples [i // n_co * per, + per): every
    (row block, example) pair exactly once, no program without an example, and no more
    programs than SMs unless the row blocks alone outnumber them."""
    n_co, per, count = stationary.programs(batch, rows, sms)
    assert n_co == -(-rows // 64) and count % n_co == 0
    covered = [(i % n_co, b) for i in range(count)
               for b in range(i // n_co * per, min(batch, i // n_co * per + per))]
    assert sorted(covered) == [(m, b) for m in range(n_co) for b in range(batch)]
    assert all(i // n_co * per < batch for i in range(count))
    assert count <= max(sms, n_co)


def test_routing_grad_launch():
    """routing_grad() on CPU tensors with the launch recorded: the routing-gradient form, its
    partial sums one row per 64 rows of the slab, summed into (B, E)."""
    B, E, cin, cout, side = 7, 3, 48, 160, 4
    x = torch.randn(B, cin, side, side).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(B, cout, side, side).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(E, cout, cin, 1, 1)
    plan = stationary.plan(E, cin, side * side, routing=True)
    launches = []
    params = stationary.pw_stationary_kernel.arg_names

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(params, args))
                named["part_ptr"].copy_(torch.arange(named["part_ptr"].numel()).view_as(
                    named["part_ptr"]).float())  # a stand-in for the kernel's sums
                launches.append((named, kwargs))
            return launch
    props = mock.Mock(multi_processor_count=132)
    with mock.patch.object(stationary, "pw_stationary_kernel", Recorder()), \
            mock.patch("torch.cuda.get_device_properties", return_value=props):
        grad = stationary.routing_grad(x, grad_out, weight, plan)
    (named, kwargs), = launches
    assert kwargs["ROUTING_GRAD"] is True and kwargs["E_POW2"] == 4 and not kwargs["W_T"]
    assert named["out_ptr"] is grad_out and named["COUT"] == cout and named["K"] == cin
    assert named["part_ptr"].shape == (3, B, E)  # ceil(160 / 64) row blocks
    expected = torch.arange(3 * B * E).view(3, B, E).float().sum(0)
    assert grad.shape == (B, E) and torch.equal(grad, expected)


def test_switch_on_without_a_gpu_changes_nothing():
    """With CONDCONV_TRITON_STATIONARY on, a call the kernel cannot take (here: CPU tensors,
    the triton backend in Triton's interpreter) runs the dense kernels: the same forward and
    gradients as with the switch off."""
    import condconv_kernels as cc
    from condconv_kernels import _env
    x, r, w, g = _small_layer(3)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 16, 4, 4, generator=g)
    results = []
    for on in (frozenset(), _env.STATIONARY_PASSES):
        leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        with mock.patch.object(_env, "TRITON_STATIONARY", on):
            out = cc.condconv2d(*leaves, backend="triton")
            out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_backend_picks_the_routing_slab():
    """The triton backend's routing-gradient helper: the slab W over x (its dual grad_out)
    where it fits, else W^T over grad_out (its dual x: the same sum), and None where neither
    fits."""
    import condconv_kernels.triton as backend
    B, E, cin, cout, side = 2, 3, 32, 48, 4
    x = torch.randn(B, cin, side, side).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(B, cout, side, side).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(E, cout, cin, 1, 1)
    calls, asked = [], []

    def routing_grad(inp, dual, w, plan, transposed=False, scales=None):
        calls.append((id(inp), id(dual), transposed))
        return torch.zeros(B, E)

    def eligible(inp, *args, transposed=False, routing=False, dual=None, scales=None):
        asked.append((id(inp), id(dual), transposed, routing))
        return {} if transposed in fits else None
    fits = set()
    with mock.patch.object(stationary, "eligible", eligible), \
            mock.patch.object(stationary, "routing_grad", routing_grad):
        for fits in ({False, True}, {True}, set()):
            calls.clear()
            asked.clear()
            got = backend._stationary_routing_grad(grad_out, x, weight, 1, (1, 1),
                                                   (0, 0, 0, 0))
            assert asked[0] == (id(x), id(grad_out), False, True)
            if fits:
                assert got is not None
                first = False if False in fits else True
                assert calls == [(id(x), id(grad_out), False) if not first else
                                 (id(grad_out), id(x), True)]
            else:
                assert got is None and calls == []
                assert asked[1] == (id(grad_out), id(x), True, True)


def test_fits_checks_the_routing_dual():
    """The routing form copies its dual's tiles 16 bytes at a time: a dual that is missing,
    of another shape or dtype, not channels_last, sliced (pixels not at one stride) or whose
    rows are not a multiple of 16 is refused; a channels_last one of the right shape is
    taken."""
    B, E, k, rows, side = 2, 4, 32, 64, 6
    cl = torch.channels_last
    inp = torch.randn(B, k, side, side, dtype=torch.bfloat16).contiguous(memory_format=cl)

    def dual_of(rows=rows, dtype=torch.bfloat16, fmt=cl):
        return torch.randn(B, rows, side, side, dtype=dtype).contiguous(memory_format=fmt)

    def fits(dual, rows=rows):
        return stationary.fits(inp, E, rows, 1, True, False, routing=True, dual=dual)
    assert fits(dual_of()) == stationary.plan(E, k, side * side, routing=True)
    sliced = torch.randn(B, rows, 2 * side, side, dtype=torch.bfloat16).contiguous(
        memory_format=cl)[:, :, ::2]
    assert sliced.shape == (B, rows, side, side)
    for bad in (None, dual_of(rows=48), dual_of(dtype=torch.float16),
                dual_of(fmt=torch.contiguous_format), sliced):
        assert fits(bad) is None
    assert fits(dual_of(rows=56), rows=56) is None  # rows not a multiple of 16
    # Without the routing form the dual is not asked for.
    assert stationary.fits(inp, E, rows, 1, True, False) is not None
    empty = torch.empty(B, k, 0, side, dtype=torch.bfloat16).contiguous(memory_format=cl)
    assert stationary.fits(empty, E, rows, 1, True, False) is None  # no pixels


def test_backward_leaves_the_routing_half_to_the_stationary_kernel():
    """With the switch on and the routing-gradient form taking the call (here a stand-in), the
    triton backward returns its grad_routing and runs the dense kernel gradient for the weight
    alone: grad_weight as with the switch off."""
    import condconv_kernels.triton as backend
    from condconv_kernels import _env
    x, r, w, g = _small_layer(4)
    grad_out = torch.randn(2, 16, 4, 4, generator=g)
    marker = torch.randn(2, 3, generator=g)
    args = (grad_out, x, r, w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1, (False, True, True, False))
    off = backend.backward(*args)
    with mock.patch.object(_env, "TRITON_STATIONARY", _env.STATIONARY_PASSES), \
            mock.patch.object(backend, "_stationary_routing_grad", lambda *a: marker.clone()):
        on = backend.backward(*args)
    assert torch.equal(on[1], marker) and not torch.equal(off[1], marker)
    torch.testing.assert_close(on[2], off[2], rtol=0, atol=0)




def test_backend_takes_only_the_switched_passes():
    """With the switch naming some passes, the backend asks the kernel about those only (the
    kernel's eligibility recorded on CPU tensors, where it declines and the dense kernels run)."""
    import condconv_kernels as cc
    from condconv_kernels import _env
    x, r, w, _ = _small_layer(5)
    for passes in ({"forward"}, {"grad_x"}, {"routing"}, {"forward", "routing"}):
        asked = []

        def eligible(inp, *args, transposed=False, routing=False, dual=None, scales=None):
            asked.append("routing" if routing else "grad_x" if transposed else "forward")
            return None
        leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        with mock.patch.object(_env, "TRITON_STATIONARY", frozenset(passes)), \
                mock.patch.object(stationary, "eligible", eligible):
            cc.condconv2d(*leaves, backend="triton").sum().backward()
        assert set(asked) == passes, (passes, asked)


def test_fits_checks_the_scales():
    """Per-example scales are taken where they are contiguous along their channels (any
    stride between examples), of the call's sizes; a scale read with a stride along its
    channels, or of the wrong size, sends the call to the dense kernels."""
    B, E, cin, cout, side = 3, 4, 32, 48, 5
    x = torch.randn(B, cin, side, side, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)

    def fits(*scales, transposed=False):
        inp = x if not transposed else torch.randn(B, cout, side, side, dtype=torch.bfloat16
                                                   ).contiguous(memory_format=torch.channels_last)
        rows = cin if transposed else cout
        return stationary.fits(inp, E, rows, 1, True, False, transposed=transposed,
                               scales=scales)
    good = (torch.rand(B, cin), torch.rand(B, cout), torch.rand(B, 1, 1))
    assert fits(*good) is not None and fits(*good, transposed=True) is not None
    assert fits(torch.rand(B, 2 * cin)[:, ::2], None, None) is None  # strided along Cin
    assert fits(torch.rand(2 * B, cin)[::2], None, None) is not None  # strided between examples
    assert fits(None, torch.rand(B, cin), None) is None  # out_scale of Cin values
    assert fits(None, None, torch.rand(B, 3, 3)) is None  # nine taps on a 1x1 layer


def test_backend_passes_the_scales_to_each_pass():
    """With the switch on and the per-example scales given, the backend asks the kernel about
    each pass with the call's own scale tensors (the kernel's eligibility recorded on CPU
    tensors, where it declines and the dense kernels run)."""
    import condconv_kernels as cc
    from condconv_kernels import _env
    x, r, w, g = _small_layer(6, cout=32)
    scales = (torch.rand(2, 16, generator=g), torch.rand(2, 32, generator=g),
              torch.rand(2, 1, 1, generator=g))
    asked = {}

    def eligible(inp, *args, transposed=False, routing=False, dual=None, scales=None):
        asked["routing" if routing else "grad_x" if transposed else "forward"] = scales
        return None
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    with mock.patch.object(_env, "TRITON_STATIONARY", _env.STATIONARY_PASSES), \
            mock.patch.object(stationary, "eligible", eligible):
        cc.condconv2d(*leaves, in_scale=scales[0], out_scale=scales[1], tap_scale=scales[2],
                      backend="triton").sum().backward()
    assert set(asked) == {"forward", "grad_x", "routing"}
    for name, got in asked.items():
        assert len(got) == 3 and all(a is b for a, b in zip(got, scales)), name


@pytest.mark.parametrize("shape", [(3, 16, 1, 1), (3, 32, 1, 5), (3, 32, 4, 1), (1, 16, 3, 3)])
def test_packed_strides_of_size_one_dimensions(shape):
    """A channels_last tensor with a dimension of size 1 may carry any stride there (PyTorch
    gives (3, 16, 1, 1) the strides (16, 1, 1, 1)): packed_strides names the packed
    channels_last ones, which address the same elements, so the one-pixel and one-row layers
    pass _copyable as their packed form does; a slice that breaks the pixels' one stride
    still does not."""
    t = torch.randn(shape, dtype=torch.float64).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    s = stationary.packed_strides(t)
    packed = torch.empty_strided(shape, (shape[1] * shape[2] * shape[3], 1,
                                         shape[1] * shape[3], shape[1]), dtype=t.dtype)
    assert s == packed.stride()
    assert stationary._copyable(t)
    # The same elements through the packed strides.
    assert torch.equal(t.as_strided(shape, s), t)
    # A spatial slice whose rows are longer than its pixels: refused where rows of more than
    # one pixel follow one another (one row, or one pixel a row, is one stride again).
    wide = torch.randn(shape[0], shape[1], shape[2], shape[3] + 1, dtype=torch.bfloat16)
    sliced = wide.contiguous(memory_format=torch.channels_last)[..., :shape[3]]
    assert stationary._copyable(sliced) == (shape[2] == 1 or shape[3] == 1)
