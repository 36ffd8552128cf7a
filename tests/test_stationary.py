"""The experimental experts-stationary 1x1 kernel's host side (triton/stationary.py), which runs
without a GPU: its shared-memory plan and the launch it makes (the kernel itself runs only on an
sm_90 GPU: tests/test_gpu.py::test_gpu_stationary_*; its compile: test_triton_compile.py)."""
from unittest import mock

import pytest
import torch

stationary = pytest.importorskip("condconv_kernels.triton.stationary")
pytestmark = pytest.mark.skipif(not stationary.AVAILABLE, reason="this Triton has no Gluon")


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


def test_no_plan_past_shared_memory():
    """The project layers' forward (K = 1152 at E = 8) does not fit; E = 8 at K = 192 fits only
    with one pixel tile of 64 (7x7), not with the 14x14 form's extra buffers."""
    assert stationary.plan(8, 1152, 49) is None
    assert stationary.plan(8, 192, 49) is not None
    assert stationary.plan(8, 192, 196) is None


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "grad_x"])
def test_launch_arguments(transposed):
    """run() on CPU tensors with the launch recorded: every kernel parameter given once, the
    weight read as (E, rows, K) through its strides (W^T for grad_x), one program per SM at
    most, and the batch slices covering the batch."""
    B, E, cin, cout, side = 10, 4, 48, 96, 5
    x = torch.randn(B, cin, side, side).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(E, cout, cin, 1, 1)
    inp = torch.randn(B, cout, side, side).contiguous(
        memory_format=torch.channels_last) if transposed else x
    rows, k = (cin, cout) if transposed else (cout, cin)
    out = torch.empty(B, rows, side, side).contiguous(memory_format=torch.channels_last)
    plan = stationary.plan(E, k, side * side)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))
    props = mock.Mock(multi_processor_count=6)
    with mock.patch.object(stationary, "pw_fwd_stationary_kernel", Recorder()), \
            mock.patch("torch.cuda.get_device_properties", return_value=props):
        stationary.run(inp, torch.rand(B, E), weight, None, out, plan, transposed=transposed)
    (grid, args, kwargs), = launches
    fn = stationary.pw_fwd_stationary_kernel
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
