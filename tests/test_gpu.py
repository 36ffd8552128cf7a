"""Every CUDA backend against the float64 ground truth (computed on the CPU): forward and all four
gradients; float32 exact (TF32 off: IEEE float32 in the triton backend, the CUDA-core path in the
cuda backend), float16, bfloat16 and float64; contiguous, channels_last and sliced inputs; batch
up to 256; determinism; CUDA-graph replay; and one check of the TF32 path with a tolerance derived
from TF32's 10-bit mantissa. Outputs are poisoned with NaN before the kernels run, so an element
a kernel forgets to write fails. Skipped on machines without CUDA.

Selection, by environment variable:

- ``CONDCONV_GPU_BACKENDS=triton`` (comma-separated): the backends to test; default every
  available one but the reference.
- ``CONDCONV_GPU_MATRIX=full``: every case x layout x dtype. The default takes each case once
  per dtype with the layouts in turn (every case meets every layout, every dtype every layout):
  a third of the Triton compiles.
- ``CONDCONV_GPU_TEST_DEVICE=cpu``: run this file on the CPU with the ``cpu`` backend standing in
  for the GPU ones (the GPU kit's dry run uses it to check the tests themselves).

The >2^31-element tests (about 20 GB of GPU memory each) are marked ``huge``: run them alone and
one at a time (``pytest -m huge -p no:xdist``); ``-m "not huge"`` leaves them out.
"""
import contextlib
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import condconv_kernels as cc
from condconv_kernels import reference
from conftest import (CASES, CASES_BY_NAME, LAYOUTS, Case, assert_close, assert_repeatable, conv_args,
                      ground_truth, make_inputs, poisoned_outputs, run_op)
from launch_log import record_stages

DEVICE = os.environ.get("CONDCONV_GPU_TEST_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                reason="needs a CUDA device")


def _backends():
    if ON_GPU and not torch.cuda.is_available():
        return []
    chosen = os.environ.get("CONDCONV_GPU_BACKENDS")
    found = [b for b in cc.available_backends(DEVICE) if b != "reference"]
    if not ON_GPU:
        found = [b for b in found if b == "cpu"]  # the compiled stand-in, not the interpreter
    return [b for b in found if not chosen or b in chosen.split(",")]


GPU_BACKENDS = _backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _matrix():
    """(case, dtype, layout): the full product, or each case once per dtype, layouts in turn."""
    if os.environ.get("CONDCONV_GPU_MATRIX") == "full":
        return [(c, d, lay) for c in CASES for d in DTYPES for lay in LAYOUTS]
    return [(c, d, LAYOUTS[(i + j) % len(LAYOUTS)])
            for i, c in enumerate(CASES) for j, d in enumerate(DTYPES)]


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for convolutions and matrix products (cuDNN, cuBLAS and both backends,
    which follow torch.backends.cudnn.allow_tf32)."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


def _to_device(tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _run(case, inputs, backend, grad_out):
    """Forward and the four gradients on the device, every output poisoned with NaN first."""
    leaves = [t.detach().to(DEVICE).requires_grad_(True) if t is not None else None
              for t in inputs]
    with poisoned_outputs():
        out = cc.condconv2d(*leaves, stride=case.stride, padding=case.padding,
                            dilation=case.dilation, groups=case.groups, backend=backend)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None],
                                    grad_out.to(DEVICE))
    return out.cpu(), [g.cpu() for g in grads]


def _check(case, backend, dtype, layout, factor, ulps=64):
    inputs = make_inputs(case, dtype, layout, seed=1)
    truth, _ = ground_truth(case, inputs)
    grad_out = torch.randn(truth.shape, dtype=torch.float64).to(dtype)
    out, grads = _run(case, inputs, backend, grad_out)
    truth, truth_grads = ground_truth(case, inputs, grad_out)
    # PyTorch's own computation in this precision, on the device (cuDNN, TF32 as configured).
    same, same_grads = ground_truth(case, _to_device(inputs), grad_out.to(DEVICE), dtype=dtype)
    assert_close(out, truth, same.cpu(), f"{backend} out", factor, ulps=ulps)
    for g, t, s in zip(grads, truth_grads, same_grads):
        assert_close(g, t, s.cpu(), f"{backend} grad", factor, ulps=ulps)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case,dtype,layout", _matrix(),
                         ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_matrix(case, dtype, layout, backend):
    """float32 with TF32 off, so that it is held to IEEE float32 (PyTorch's own float32 result on
    the device is the yardstick); float16/bfloat16 within 4x PyTorch's own error."""
    with tf32(False):
        _check(case, backend, dtype, layout, factor=3.0 if dtype == torch.float32 else 4.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["k3_s2_asym", "g2_s2_e8_b1", "dw5_s2_same_e8"])
def test_gpu_float64(name, backend):
    case = CASES_BY_NAME[name]
    _check(case, backend, torch.float64, "channels_last", factor=3.0)


def _tf32_scales(case, inputs, grad_out):
    """sqrt(sum_k t_k^2) per element of out, grad_x and grad_weight, where t_k are the products
    the element sums (float64): out sums x * W_b, grad_x sums grad_out * W_b, grad_weight[e]
    sums routing[b, e] * x * grad_out. Each product is off by at most about 2^-10 of itself
    once its operands are rounded to TF32, and the roundings are independent, so an element's
    error is about 2^-10 * sqrt(sum_k t_k^2): 2^-10 * sqrt(K) times the products' size."""
    x, routing, weight, _ = [t.detach().double() if t is not None else None for t in inputs]
    stride, pad, dilation, groups = conv_args(case, x)
    go2 = grad_out.double() ** 2

    def conv(u, v):
        return F.conv2d(F.pad(u, (pad[2], pad[3], pad[0], pad[1])), v, None, stride, 0,
                        dilation, groups)
    outs, gxs, kernel_sq = [], [], []
    for b in range(x.shape[0]):
        wb2 = torch.einsum("e,e...->...", routing[b], weight) ** 2
        u = x[b:b + 1].clone().requires_grad_(True)
        v = wb2.clone().requires_grad_(True)
        outs.append(conv(x[b:b + 1] ** 2, wb2))
        (gx,) = torch.autograd.grad(conv(u, wb2), [u], go2[b:b + 1])
        (gk,) = torch.autograd.grad(conv(x[b:b + 1] ** 2, v), [v], go2[b:b + 1])
        gxs.append(gx)
        kernel_sq.append(gk)
    gw = torch.einsum("be,b...->e...", routing ** 2, torch.stack(kernel_sq))
    return [torch.cat(outs).sqrt(), torch.cat(gxs).sqrt(), gw.sqrt()]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["k3_s2_asym", "k5_same", "g2_s2_e8_b1"])
def test_gpu_tf32(name, backend):
    """TF32 on (PyTorch's default for convolutions): out, grad_x and grad_weight within
    6 * 2^-10 * sqrt(2 sum_k t_k^2) of the float64 truth, element by element (see
    _tf32_scales), plus float32 rounding. A wrong index or a lost term is off by the size of
    the result, about sqrt(sum_k t_k^2): over a hundred times this bound."""
    case = CASES_BY_NAME[name]
    inputs = make_inputs(case, torch.float32, "contiguous", seed=7)
    truth, _ = ground_truth(case, inputs)
    grad_out = torch.randn(truth.shape, dtype=torch.float64).float()
    with tf32(True):
        out, grads = _run(case, inputs, backend, grad_out)
    truth, truth_grads = ground_truth(case, inputs, grad_out)
    grad_x, grad_weight = grads[0], grads[2]
    for name_, ours, want, scale in zip(["out", "grad_x", "grad_weight"],
                                        [out, grad_x, grad_weight],
                                        [truth, truth_grads[0], truth_grads[2]],
                                        _tf32_scales(case, inputs, grad_out)):
        eps32 = torch.finfo(torch.float32).eps
        bound = 6 * 2.0 ** -10 * (2 * scale ** 2).sqrt() + 64 * eps32 * want.abs().max()
        err = (ours.double() - want).abs()
        worst = (err / bound).max().item()
        print(f"{backend} {name_}: max err / bound {worst:.3f}")
        assert torch.isfinite(ours).all(), f"{name_}: non-finite values"
        assert worst <= 1.0, f"{backend} {name_}: error {worst:.2f}x the TF32 bound"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["k1", "dw5_s2_same_e8", "k3_s2_asym"])
def test_gpu_batch_256(name, backend):
    case = CASES_BY_NAME[name]
    case = type(case)(**{**case.__dict__, "B": 256})
    _check(case, backend, torch.float16, "channels_last", factor=4.0)


def _other_tile_kinds():
    """The CONDCONV_TRITON_CONFIG indices whose dense forward / grad_x configuration holds more
    than 2 examples a program, or whose dense kernel-gradient one 128-pixel tiles: kinds of
    tile that the first configurations, which the rest of this file runs, never take."""
    try:
        from condconv_kernels.triton import _config
    except ImportError:  # no Triton: no triton backend to test
        return []
    dense, kgrad = _config._table(_config.DENSE_TILES), _config._table(_config.KGRAD_TILES)
    return [i for i in range(_config.MAX_CONFIGS)
            if dense[i % len(dense)][0]["BLOCK_B"] > 2 or kgrad[i % len(kgrad)][0]["BLOCK_P"] > 64]


def _every_other_configuration():
    """The CONDCONV_TRITON_CONFIG indices past the first that together force every
    configuration of the dense forward / grad_x table and of the dense kernel gradient's (an
    index forces entry index mod the table's length of each)."""
    try:
        from condconv_kernels.triton import _config
    except ImportError:
        return []
    tables = (_config._table(_config.DENSE_TILES), _config._table(_config.KGRAD_TILES))
    return list(range(1, max(map(len, tables))))


def _every_kernel_gradient_configuration():
    """The CONDCONV_TRITON_CONFIG indices of every entry of the dense kernel gradient's table."""
    try:
        from condconv_kernels.triton import _config
    except ImportError:
        return []
    return list(range(len(_config._table(_config.KGRAD_TILES))))


def _pipelined_rows():
    """The CONDCONV_TRITON_CONFIG indices whose depthwise forward / grad_x configuration
    pipelines its rows of taps (ROW_STAGES > 1: Triton's asynchronous copies rows ahead)."""
    try:
        from condconv_kernels.triton import _config
    except ImportError:
        return []
    return [i for i, (blocks, _, _) in enumerate(_config._table(_config.DW_TILES))
            if blocks["ROW_STAGES"] > 1]


# Cases of the forced configurations: (name, fields changed, indices). The 7x7 1x1 layer is
# EfficientNet's last stage in small (49 pixels against 64-pixel tiles, 3 K tiles of 16 and a
# part-filled second tile of 64 output channels, a batch slice part-filled), where the second
# GPU run's tuner picked a kernel-gradient configuration no test had run. At 2 and 3 experts,
# every kernel-gradient configuration (the first too): Triton 3.6 summed the wrong lanes in
# most of them where grad_routing was one reduction over the reshaped tile (16-byte vectors of
# W need its channels a multiple of 8, which the file's small cases are not). At 16 experts,
# the 3- and 4-example blocks hold more routing weights than HELD_ROUTING (_config.py) and
# reload the rest in every K block, a path 8 experts no longer reach. The depthwise ones whose
# rows of taps are pipelined, on a 3x3 layer at 7x7 and a 5x5 one at stride 2 (grad_x by
# parity), 72 channels (a part-filled channel tile).
_FORCED_CASES = (
    ("k1", dict(E=8, cin=48, cout=72, B=37, H=7, W=7), _every_other_configuration()),
    ("k1", dict(E=3, cin=48, cout=72, B=37, H=7, W=7), _every_kernel_gradient_configuration()),
    ("k1", dict(E=2, cin=48, cout=72, B=37, H=7, W=7), _every_kernel_gradient_configuration()),
    ("k1", dict(E=8, cin=40, cout=40, B=19, H=14, W=14), _other_tile_kinds()),
    ("k3_s2_asym", dict(E=8, B=13), _other_tile_kinds()),
    ("k1", dict(E=16, cin=48, cout=72, B=37, H=7, W=7), _other_tile_kinds()),
    ("dw3", dict(E=8, cin=72, cout=72, groups=72, B=13, H=7, W=7), _pipelined_rows()),
    ("dw5_s2_same_e8", dict(E=8, cin=72, cout=72, groups=72, B=13), _pipelined_rows()),
)


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b == "triton"])
@pytest.mark.parametrize("name,more,index", [
    pytest.param(name, more, i, id=f"{name}_{more.get('H', 'case')}"
                 f"{'' if more.get('E') == 8 else '_e%d' % more.get('E')}-{i}")
    for name, more, indices in _FORCED_CASES for i in indices])
def test_gpu_forced_configuration(name, more, index, backend, monkeypatch):
    """Configurations the first ones (which the rest of this file runs) leave untested, forced
    as CONDCONV_TRITON_CONFIG does, in bfloat16: every configuration of the dense tables on a
    7x7 1x1 layer of 8 experts, and those only the autotuner picks (blocks of 3 and 4
    examples; 128-pixel kernel-gradient tiles) on a 14x14 1x1 layer (3 K blocks each way, a
    batch that leaves the last block of examples part-filled), a 3x3 one and the 7x7 one at 16
    experts (routing weights past HELD_ROUTING), and the depthwise configurations that pipeline
    their rows of taps on two depthwise layers: forward and every gradient against the
    ground truth, with a floor of 8 ulps of the output's scale (6%) instead of the file's 64
    (half of it in bfloat16): an example whose last K block is dropped would pass the looser
    one."""
    from condconv_kernels.triton import _config
    if _config.AUTOTUNE:
        pytest.skip("forcing a configuration needs CONDCONV_TRITON_AUTOTUNE=0, as the kit runs it")
    monkeypatch.setattr(_config, "FORCED_CONFIG", index)
    case = CASES_BY_NAME[name]
    _check(type(case)(**{**case.__dict__, **more}), backend, torch.bfloat16, "channels_last",
           factor=4.0, ulps=8)


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b == "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,more", [
    ("k1", dict(E=5, cin=40, cout=56, B=11, H=9, W=9)),
    ("k3_s2_asym", dict(E=5, cin=24, cout=40, B=7)),
], ids=["k1", "k3_s2_asym"])
def test_gpu_with_less_shared_memory(name, more, dtype, backend, monkeypatch):
    """What a GPU with less shared memory a block than an H100 runs (an A100 163 KB, the RTX 30
    and 40 series 99 KB), autotuning off, on this GPU with Triton told it has 25000 bytes a
    block: the dense forward and grad_x at the stages that fit (one), the dense kernel
    gradient's configuration launched again with a stage fewer where Triton refuses it (float32:
    3 stages, 26624 bytes, compiled launched dry for sm_90), forward and every gradient against
    the ground truth (float32 with TF32 off)."""
    from triton.runtime import driver
    from condconv_kernels import _env
    from condconv_kernels.triton import _config
    if _config.AUTOTUNE:
        pytest.skip("the fixed configurations need CONDCONV_TRITON_AUTOTUNE=0, as the kit runs it")
    for switch in ("TRITON_STATIONARY", "TRITON_BATCHED", "TRITON_CLUSTER"):  # the Triton kernels
        monkeypatch.setattr(_env, switch, frozenset())
    limit = 25000
    utils = driver.active.utils
    real = utils.get_device_properties
    monkeypatch.setattr(utils, "get_device_properties",
                        lambda device: {**real(device), "max_shared_mem": limit})
    launched = record_stages(monkeypatch.setattr)
    _config._cuda_device_shared.cache_clear()
    case = CASES_BY_NAME[name]
    try:
        with tf32(False):
            _check(type(case)(**{**case.__dict__, **more}), backend, dtype, "channels_last",
                   factor=3.0 if dtype == torch.float32 else 4.0)
    finally:
        _config._cuda_device_shared.cache_clear()
    stages = {kernel: (asked, got) for kernel, asked, got, _ in launched}
    assert all(shared <= limit for *_, shared in launched), launched
    assert stages["dense_fwd_kernel"] == stages["dense_bwd_x_kernel"] == (1, 1), launched
    if dtype == torch.float32:
        assert stages["dense_bwd_w_kernel"][1] < stages["dense_bwd_w_kernel"][0], launched


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b == "cuda"])
@pytest.mark.parametrize("name,more", [
    ("k1", dict(E=8, cin=48, cout=72, B=37, H=7, W=7)),
    ("g2_k1", dict(E=4, cin=48, cout=72, B=9, H=7, W=7)),
    ("dw5_s2_same_e8", dict(E=8, cin=72, cout=72, groups=72, B=13)),
    ("dw_mult2_d2_asym", dict(cin=40, cout=80, groups=40, B=5, H=11, W=9)),
], ids=["k1_b37", "g2_k1_b9", "dw5_s2_c72", "dw_mult2_c40"])
def test_gpu_cuda_backend_tiles_of_channels_and_examples(name, more, backend):
    """The cuda backend's kernels past one block's channels and examples, channels_last,
    bfloat16: the dense forward and grad_x in blocks of 4 examples of a group (37 and 9: the
    last block part-filled; two groups), the depthwise kernels in tiles of 32 consecutive
    channels (72: the last tile of 8; 40 input channels times a multiplier of 2 for grad_x's
    tiles of taps) over planes of 169 and 99 pixels, against the ground truth."""
    case = CASES_BY_NAME[name]
    _check(type(case)(**{**case.__dict__, **more}), backend, torch.bfloat16, "channels_last",
           factor=4.0)


def _cluster_launches(prof, kernel="pointwise_cluster_kernel"):
    return sum(e.count for e in prof.key_averages() if kernel in e.key)


def _wgmma_built():
    """Whether the extension takes the clustered switch's mode 3 (built for sm_90a); an
    extension built where TORCH_CUDA_ARCH_LIST names 9.0a (as the GPU kit's) must."""
    switch = torch.ops.condconv.cuda_pointwise_cluster
    try:
        switch(3)
    except RuntimeError as exc:
        assert "9.0a" not in os.environ.get("TORCH_CUDA_ARCH_LIST", ""), exc
        return False
    switch(1)
    return True


# 1x1 channels_last layers for the cuda backend's Hopper kernels: s6.b1.expand and
# s7.b0.project at small batches, 14x14 with a bias in float16 at 5 experts, 3 experts.
HOPPER_1X1 = [
    (dict(E=8, cin=192, cout=1152, B=37, H=7, W=7, bias=False), torch.bfloat16),
    (dict(E=8, cin=1152, cout=320, B=9, H=7, W=7, bias=False), torch.bfloat16),
    (dict(E=5, cin=80, cout=480, B=9, H=14, W=14), torch.float16),
    (dict(E=3, cin=40, cout=72, B=6, H=9, W=7), torch.bfloat16),
]
HOPPER_1X1_IDS = ["expand_b37", "project_k1152_b9", "e5_14x14_f16_bias", "e3_b6"]


@pytest.mark.skipif(not ON_GPU, reason="a Hopper GPU's kernel")
@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b == "cuda"])
@pytest.mark.parametrize("more,dtype", HOPPER_1X1, ids=HOPPER_1X1_IDS)
def test_gpu_cuda_pointwise_cluster(more, dtype, backend):
    """The cuda backend's clustered Hopper kernel (csrc/cuda/pointwise_cluster.cuh) on 1x1
    channels_last layers: tf_efficientnet_cc_b0_8e's s6.b1.expand (6 steps of 32 channels, 18
    tiles of output channels; 37 examples: 10 blocks of 4, the last of one, in 3 clusters of 4
    blocks, two of them empty) and s7.b0.project (36 steps: its stages refilled many times;
    grad_x 10), 14x14 with a bias in float16 (4 tiles of pixels, 5 experts shared unevenly
    over a cluster), 3 experts (stages of 4): forward and every gradient against the ground
    truth, with the kernel seen in the profiler (forward and grad_x), in each form of its
    products (ldmatrix and mma.sync on swizzled tiles, mode 1; wmma, mode 2), then the wgmma
    kernel (csrc/cuda/pointwise_wgmma.cuh, mode 3, where the build has it), then with the
    switch off (mode 0: the tiled kernels, not seen)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the clustered kernel runs on compute capability 9.x only")
    case = dataclasses.replace(CASES_BY_NAME["k1"], **more)
    switch = torch.ops.condconv.cuda_pointwise_cluster
    assert switch() == 1, "not the default (CONDCONV_CUDA_CLUSTER set?)"
    activities = [torch.profiler.ProfilerActivity.CUDA]
    modes = [(1, 2, 0), (2, 2, 0)] + ([(3, 0, 2)] if _wgmma_built() else []) + [(0, 0, 0)]
    try:
        for mode, launches, wgmma_launches in modes:
            switch(mode)
            with torch.profiler.profile(activities=activities) as prof:
                _check(case, backend, dtype, "channels_last", factor=4.0)
            assert _cluster_launches(prof) == launches, f"mode {mode}"
            assert _cluster_launches(prof, "pointwise_wgmma_kernel") == wgmma_launches, mode
    finally:
        switch(1)


@pytest.mark.skipif(not ON_GPU, reason="a Hopper GPU's kernel")
@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b == "cuda"])
@pytest.mark.parametrize("more,dtype", HOPPER_1X1, ids=HOPPER_1X1_IDS)
def test_gpu_cuda_pointwise_kgrad(more, dtype, backend):
    """The cuda backend's 1x1 kernel gradient kernel (csrc/cuda/pointwise_kgrad.cuh, switched on:
    torch.ops.condconv.cuda_pointwise_kgrad(1)) on the clustered kernels' layers: the forward
    and every gradient against the ground truth, the kernel seen once in the backward's
    profile (37 examples: slices of unequal length; 1152 input channels: 36 tiles of them)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the kernel runs on compute capability 9.x only")
    case = dataclasses.replace(CASES_BY_NAME["k1"], **more)
    switch = torch.ops.condconv.cuda_pointwise_kgrad
    assert switch() == 0, "not the default (CONDCONV_CUDA_KGRAD set?)"
    activities = [torch.profiler.ProfilerActivity.CUDA]
    try:
        switch(1)
        with torch.profiler.profile(activities=activities) as prof:
            _check(case, backend, dtype, "channels_last", factor=4.0)
        assert _cluster_launches(prof, "pointwise_kgrad_kernel") == 1
    finally:
        switch(0)


@pytest.mark.skipif(not ON_GPU, reason="a Hopper GPU's kernel")
@pytest.mark.parametrize("built", [b for b in GPU_BACKENDS if b == "cuda"])
def test_gpu_triton_cluster_pass(built, monkeypatch):
    """The triton backend's cluster pass (triton/cluster.py, CONDCONV_TRITON_CLUSTER=1) on
    s6.b1.expand at batch 37 in bfloat16 channels_last: the forward and every gradient against
    the ground truth, the forward and grad_x from the cuda backend's clustered kernel (seen in
    the profiler, once each), the kernel gradient from the Triton kernels (the kernel-gradient
    switch off); then the same with the wgmma kernel (mode 3) where the build has it; then with
    the kernel-gradient switch on, the kernel gradient from pointwise_kgrad_kernel, once, and
    no Triton kernel gradient. Run with the cuda backend's tests (``built``): it needs the
    extension's CUDA kernels and the triton backend both."""
    backend = "triton"
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the clustered kernels run on compute capability 9.x only")
    from condconv_kernels import _env
    from condconv_kernels.triton import cluster
    # the build has their sm_90 code (the kit's is for 9.0a), as the pass's check sees it
    assert torch.ops.condconv.cuda_hopper_kernels(torch.cuda.current_device()) == 1
    assert cluster._hopper(torch.device("cuda"))
    monkeypatch.setattr(_env, "TRITON_CLUSTER", _env.CLUSTER_PASSES)
    case = dataclasses.replace(CASES_BY_NAME["k1"], E=8, cin=192, cout=1152, B=37, H=7, W=7,
                               bias=False)
    switch = torch.ops.condconv.cuda_pointwise_cluster
    activities = [torch.profiler.ProfilerActivity.CUDA]
    modes = [(1, "pointwise_cluster_kernel")] + (
        [(3, "pointwise_wgmma_kernel")] if _wgmma_built() else [])
    kgrad = torch.ops.condconv.cuda_pointwise_kgrad
    try:
        kgrad(0)
        for mode, kernel in modes:
            switch(mode)
            with torch.profiler.profile(activities=activities) as prof:
                _check(case, backend, torch.bfloat16, "channels_last", factor=4.0)
            assert _cluster_launches(prof, kernel) == 2, mode
            assert _cluster_launches(prof, "dense_bwd_w_kernel") >= 1, mode
        switch(1)
        kgrad(1)
        with torch.profiler.profile(activities=activities) as prof:
            _check(case, backend, torch.bfloat16, "channels_last", factor=4.0)
        assert _cluster_launches(prof, "pointwise_cluster_kernel") == 2
        assert _cluster_launches(prof, "pointwise_kgrad_kernel") == 1
        assert _cluster_launches(prof, "dense_bwd_w_kernel") == 0
    finally:
        switch(1)
        kgrad(0)


@pytest.mark.skipif(not ON_GPU, reason="about 5 GB: GPU only")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_kernel_gradient_over_a_long_reduction(backend):
    """One example of 8192 x 8192 pixels, 1x1 and 8 -> 8 channels: the kernel gradient sums
    6.7e7 products per element. Tensor cores do not round their float32 accumulators to
    nearest, so one chain of dots over all of them drifts toward zero (measured on an H200:
    grad_routing off by ~4000 of ~4e4); the kernels add chunks of the chain on CUDA cores.
    grad_weight and grad_routing against float64 sums over row bands."""
    torch.manual_seed(1)
    side, cin, experts = 8192, 8, 4
    x = torch.randn(1, cin, side, side, device="cuda", dtype=torch.float16)
    routing = torch.rand(1, experts, device="cuda", requires_grad=True)
    weight = (torch.randn(experts, cin, cin, 1, 1, device="cuda") * 0.3).half()
    weight.requires_grad_(True)
    out = cc.condconv2d(x, routing, weight, None, backend=backend)
    grad_out = torch.randn_like(out)
    grad_r, grad_w = torch.autograd.grad(out, [routing, weight], grad_out)
    del out
    G = torch.zeros(cin, cin, device="cuda", dtype=torch.float64)  # sum_p g[:, p] x[:, p]^T
    for h0 in range(0, side, 1024):
        g = grad_out[0, :, h0:h0 + 1024].reshape(cin, -1).double()
        G += g @ x[0, :, h0:h0 + 1024].reshape(cin, -1).double().t()
    want_w = routing.detach().double()[0, :, None, None] * G
    want_r = (weight.detach().double()[:, :, :, 0, 0] * G).sum((1, 2))
    scale = G.abs().max().item()
    torch.testing.assert_close(grad_w[:, :, :, 0, 0].double(), want_w, rtol=1e-2,
                               atol=1e-2 * scale)
    torch.testing.assert_close(grad_r[0].double(), want_r, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.huge
@pytest.mark.skipif(not ON_GPU, reason="about 20 GB: GPU only")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kernel,groups", [(1, 1), (3, 8)], ids=["pw", "dw3"])
def test_gpu_more_than_2_31_elements(kernel, groups, backend):
    """x has 8 * 16400 * 16400 > 2**31 float16 elements (about 4.3 GB); the last 64 x 64 pixels
    of the output and of grad_x, whose offsets need 64-bit arithmetic, are compared with the
    reference on a crop (with its halo), and grad_routing with an independent reduction."""
    torch.manual_seed(0)
    side, cin, pad, crop = 16400, 8, kernel // 2, 64
    x = torch.randn(1, cin, side, side, device="cuda", dtype=torch.float16)
    assert x.numel() > 2 ** 31
    routing = torch.rand(1, 4, device="cuda", dtype=torch.float32, requires_grad=True)
    weight = (torch.randn(4, cin, cin // groups, kernel, kernel, device="cuda") * 0.3).half()
    x.requires_grad_(True)
    out = cc.condconv2d(x, routing, weight, None, 1, pad, 1, groups, backend=backend)
    grad_out = torch.randn_like(out)
    grad_x, grad_r = torch.autograd.grad(out, [x, routing], grad_out)

    lo = side - crop - pad  # the crop with its halo; the image's own padding on the far side
    xc = x.detach()[:, :, lo:, lo:].float()
    want = reference.condconv2d_loop(xc, routing.detach(), weight.float(), None, (1, 1),
                                     (0, pad, 0, pad), (1, 1), groups)
    got = out[:, :, side - crop:, side - crop:].float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(grad_x[:, :, -crop:, -crop:]).all()
    # grad_x on the far corner: the transposed convolution of grad_out there.
    xc_leaf = xc.clone().requires_grad_(True)
    ref = reference.condconv2d_loop(xc_leaf, routing.detach(), weight.float(), None, (1, 1),
                                    (0, pad, 0, pad), (1, 1), groups)
    (ref_gx,) = torch.autograd.grad(ref, [xc_leaf], grad_out[:, :, side - crop:, side - crop:]
                                    .float())
    torch.testing.assert_close(grad_x[:, :, -crop + pad:, -crop + pad:].float(),
                               ref_gx[:, :, 2 * pad:, 2 * pad:], rtol=2e-2, atol=5e-2)
    # grad_routing[e] = <G, W_e> = sum over pixels of grad_out * (W_e conv x): per expert, in
    # float32 over row bands (an independent computation, not the kernel's).
    want_r = torch.zeros(4, device="cuda")
    for e in range(4):
        for h0 in range(0, side, 2048):
            h1 = min(side, h0 + 2048)
            band = x.detach()[:, :, max(0, h0 - pad):min(side, h1 + pad)].float()
            top, bottom = pad - (h0 - max(0, h0 - pad)), pad - (min(side, h1 + pad) - h1)
            y = F.conv2d(F.pad(band, (pad, pad, top, bottom)), weight[e].float(), groups=groups)
            want_r[e] += (y * grad_out[:, :, h0:h1].float()).sum()
    torch.testing.assert_close(grad_r[0], want_r, rtol=2e-2, atol=1.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["k1_s2_e8", "dw3_s2_b1_e1_nobias", "k3_s2_asym", "g2_s2_e8_b1"])
def test_gpu_backward_is_bitwise_deterministic(name, backend, monkeypatch):
    """Ten forward + backward runs give bitwise-identical results, in deterministic mode too
    (cuBLAS needs CUBLAS_WORKSPACE_CONFIG there, as for any PyTorch op that uses it)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    case = CASES_BY_NAME[name]
    case = type(case)(**{**case.__dict__, "B": 9})
    inputs = _to_device(make_inputs(case, torch.float32, seed=3))
    grad_out = torch.randn(run_op(case, inputs, backend)[0].shape, device=DEVICE)
    assert_repeatable(case, inputs, backend, grad_out, deterministic=True)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["k3_s2_asym", "dw5_s2_same_e8"])
def test_gpu_graph_replay_matches_eager(name, backend):
    """Forward + backward captured in a CUDA graph (on a side stream, as torch.cuda.graph does)
    and replayed on new inputs gives eager's results: the kernels run on the current stream and
    make no host synchronisation."""
    case = CASES_BY_NAME[name]
    static = [t.cuda().requires_grad_(True) if t is not None else None
              for t in make_inputs(case, torch.float32, seed=5)]
    leaves = [t for t in static if t is not None]

    def step():
        out = cc.condconv2d(*static, stride=case.stride, padding=case.padding,
                            dilation=case.dilation, groups=case.groups, backend=backend)
        return out, torch.autograd.grad(out, leaves, torch.ones_like(out))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (autotuning, lazy initialisation)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_grads = step()

    fresh = [t.cuda() if t is not None else None for t in make_inputs(case, torch.float32, seed=6)]
    with torch.no_grad():
        for s, f in zip(static, fresh):
            if s is not None:
                s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_grads = run_op(case, fresh, backend,
                                    torch.ones(graph_out.shape, device="cuda"))
    # A wrong stream replays stale or unwritten memory: far off. The tolerance only allows a
    # library (cuBLAS) to pick another algorithm inside the capture.
    torch.testing.assert_close(graph_out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(graph_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


class _SmallCondConvNet(torch.nn.Module):
    """A dense 3x3, a depthwise 5x5 at stride 2 and a 1x1 CondConv layer sharing one routing."""

    def __init__(self, backend: str):
        super().__init__()
        self.route = torch.nn.Linear(16, 4)
        self.dense = cc.nn.CondConv2d(16, 32, 3, padding="same", bias=True, num_experts=4,
                                   backend=backend)
        self.dw = cc.nn.CondConv2d(32, 32, 5, stride=2, padding="same", groups=32, num_experts=4,
                                backend=backend)
        self.pw = cc.nn.CondConv2d(32, 24, 1, num_experts=4, backend=backend)

    def forward(self, x):
        r = torch.sigmoid(self.route(x.mean((2, 3))))
        y = F.relu(self.dense(x, r))
        return self.pw(F.relu(self.dw(y, r)), r)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_compile_reduce_overhead(backend):
    """torch.compile(mode="reduce-overhead") of a training step (inductor, which captures the
    forward and the backward in CUDA graphs) on a small CondConv network, channels_last float32:
    no graph is skipped for the op (it makes no host synchronisation and mutates no input), and
    each step, warm-up, recording, replays, then a new batch size, gives the loss and the
    gradients of the same step run eagerly, on fresh inputs. The triton backend's stand-ins
    (one element for each output the flags leave unwritten, kept for the process), made again in
    the compiled warm-up, stay out of the graphs' memory pool."""
    import copy
    import torch._inductor.config
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    stand_ins = {}
    if backend == "triton":
        from condconv_kernels import triton as triton_backend
        stand_ins = triton_backend._STAND_INS
        stand_ins.clear()
    torch.manual_seed(11)
    net = _SmallCondConvNet(backend).cuda().to(memory_format=torch.channels_last)
    eager = copy.deepcopy(net)

    def loss_of(model, x):
        return (model(x) ** 2).mean()

    compiled = torch.compile(lambda x: loss_of(net, x), mode="reduce-overhead", fullgraph=True)
    # (inductor's kernels compiled in this process: the tests run in several at once)
    with tf32(False), torch._inductor.config.patch(compile_threads=1):
        for batch in (8, 8, 8, 8, 5):
            x = torch.randn(batch, 16, 12, 12, device="cuda").contiguous(
                memory_format=torch.channels_last)
            torch.compiler.cudagraph_mark_step_begin()
            net.zero_grad(set_to_none=True)
            loss = compiled(x)
            loss.backward()
            eager.zero_grad(set_to_none=True)
            want = loss_of(eager, x)
            want.backward()
            torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-4, atol=0)
            for (name, p), q in zip(net.named_parameters(), eager.parameters()):
                scale = q.grad.abs().max()
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale,
                                           msg=lambda m, n=name, b=batch: f"{n} at {b}: {m}")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    kept = [t for (_, device), t in stand_ins.items() if device.type == "cuda"]
    assert bool(kept) == (backend == "triton")  # (the dense kernel gradient's)
    segments = torch.cuda.memory_snapshot()
    for t in kept:
        pools = [tuple(s["segment_pool_id"]) for s in segments
                 if s["address"] <= t.data_ptr() < s["address"] + s["total_size"]]
        assert pools == [(0, 0)], f"a stand-in in the memory pool {pools}"


@pytest.mark.skipif(not ON_GPU, reason="replays run on the GPU")
@pytest.mark.parametrize("name,dtype,layout,mix", [
    ("k1", torch.bfloat16, "channels_last", False),
    ("k1", torch.bfloat16, "channels_last", True),
    ("k3_s2_asym", torch.float32, "contiguous", False),
    ("dw5_s2_same_e8", torch.float16, "channels_last", False),
])
def test_gpu_replayed_calls_match_tritons_launches(name, dtype, layout, mix, monkeypatch):
    """A call whose signature was met before replays its launches (``triton/_replay.py``; with
    autotuning off, as here, plans kept from a plain kernel's first launch, and a tuned one's,
    the sum kernel's, from its second): on new inputs and on a side stream, its forward and
    backward replayed, its output and four gradients are bitwise those of the same call
    launched through the launchers and Triton (the plans cleared), on the same stream (cuBLAS,
    in the host tails, is reproducible on one stream); ``mix``: with the mix pass on (its Gluon
    kernels' forward and grad_x replayed, on an sm_90 GPU)."""
    from condconv_kernels import _env
    from condconv_kernels.triton import _replay
    if mix:
        if not _hopper():
            pytest.skip("the mix pass needs an sm_90 GPU")
        monkeypatch.setattr(_env, "TRITON_STATIONARY", frozenset({"mix"}))
    case = CASES_BY_NAME[name]
    case = type(case)(**{**case.__dict__, "B": 6})
    if mix:  # channels the mix kernel takes (multiples of 16), no bias
        case = type(case)(**{**case.__dict__, "cin": 32, "cout": 48, "bias": False})
    first, fresh = (_to_device(make_inputs(case, dtype, layout, seed=seed,
                                           routing_dtype=torch.float32)) for seed in (11, 12))
    # (in the output's layout: a channels_last grad_out takes the mix pass's grad_x)
    grad_out = torch.randn_like(run_op(case, first, "triton")[0].detach())
    _replay.PLANS.clear()
    for _ in range(2):  # launched, the plans kept (a kernel compiled in a call: from the next)
        run_op(case, first, "triton", grad_out)
    assert {"forward", "backward"} <= {signature[0] for signature in _replay.PLANS}, \
        list(_replay.PLANS)
    kernels = {step[2].name for plan in _replay.PLANS.values() for step in plan.steps}
    assert ("pw_mix_kernel" in kernels) == mix, kernels
    plan_runs = []
    run = _replay.Plan.run
    monkeypatch.setattr(_replay.Plan, "run",
                        lambda self, inputs: plan_runs.append(1) or run(self, inputs))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        replayed = run_op(case, fresh, "triton", grad_out)
        assert len(plan_runs) == 2, "the forward and the backward should have replayed"
        _replay.PLANS.clear()
        launched = run_op(case, fresh, "triton", grad_out)
        assert len(plan_runs) == 2  # (launched, not replayed)
    torch.cuda.synchronize()
    assert torch.equal(replayed[0], launched[0])
    for r, g in zip(replayed[1], launched[1]):
        assert torch.equal(r, g)


@pytest.mark.skipif(not ON_GPU, reason="the CUDA build")
def test_cuda_backend_was_built():
    """Where torch has CUDA, the extension must carry the CUDA kernels, unless the build was
    told to skip them (CONDCONV_SKIP_CUDA=1): `make test` falls back to a CPU-only build when
    the CUDA build fails, and this is where that shows."""
    if os.environ.get("CONDCONV_SKIP_CUDA", "0") == "1":
        pytest.skip("CONDCONV_SKIP_CUDA=1: the CUDA kernels were not asked for")
    from torch.utils.cpp_extension import CUDA_HOME

    from condconv_kernels import backends
    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit (CUDA_HOME) on this machine: the CUDA kernels cannot be built")
    assert "cuda" in cc.available_backends("cuda"), backends.why_unavailable("cuda", "cuda")


# Past the limit on the GPU; the CPU stand-in (the kit's dry run) checks the test with fewer.
_PAST_GRID = 70000 if ON_GPU else 700


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", [
    Case("dw3_batch_70000", B=_PAST_GRID, cin=4, cout=4, H=4, W=4, groups=4, E=3),
    Case("pw_g4_batch_70000", B=_PAST_GRID, cin=8, cout=8, H=2, W=2, kernel=(1, 1), padding=0,
         groups=4, E=3),
], ids=str)
def test_gpu_batch_past_the_grid_limit(case, backend):
    """More than 65535 examples (x groups): past what a grid's y or z axis can hold, where the
    Triton kernels used to put the batch. Forward and every gradient against the unfolded form
    in float64 on the device (the per-example loop would take minutes)."""
    with tf32(False):
        inputs = make_inputs(case, torch.float32, seed=4)
        x, routing, weight, bias = inputs
        ho, wo = ground_truth(case, [x[:1], routing[:1], weight, bias])[0].shape[2:]
        grad_out = torch.randn(case.B, case.cout, ho, wo)
        out, grads = _run(case, inputs, backend, grad_out)
        device_inputs = _to_device(inputs)
        truth, truth_grads = ground_truth(case, device_inputs, grad_out.to(DEVICE),
                                          form=reference.condconv2d_unfold)
        same, same_grads = ground_truth(case, device_inputs, grad_out.to(DEVICE),
                                        form=reference.condconv2d_unfold, dtype=torch.float32)
    assert_close(out, truth.cpu(), same.cpu(), f"{backend} out")
    for g, t, s in zip(grads, truth_grads, same_grads):
        assert_close(g, t.cpu(), s.cpu(), f"{backend} grad")

def _scaled(case, tensors, scales, grad_out, fn, device):
    """fn (the op with a backend, or the per-example loop) with the per-example scales, and the
    gradients of every input and scale, on ``device``."""
    leaves = [t.detach().to(device).requires_grad_(True) if t is not None else None
              for t in tuple(tensors) + tuple(scales)]
    x, routing, weight, bias, in_s, out_s, tap_s = leaves
    out = fn(x, routing, weight, bias, *conv_args(case, x), in_scale=in_s, out_scale=out_s,
             tap_scale=tap_s)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(device))
    return out.cpu(), [g.cpu() for g in grads]


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b in ("triton", "cpu")])
@pytest.mark.parametrize("name,dtype", [
    ("k3_s2_asym", torch.float32), ("k1_s2_e8", torch.bfloat16), ("g2_k1", torch.float16),
    ("dw5_s2_same_e8", torch.bfloat16), ("dw_mult2_d2_asym", torch.float32)],
    ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_per_example_scales(name, dtype, backend):
    """The three per-example scales (ODConv's attentions, float32 as autocast keeps them) in
    the kernels: forward and all seven gradients against the per-example loop in float64 on the
    CPU, within the error of the same loop run by PyTorch in ``dtype`` on the device."""
    import test_scales
    case = CASES_BY_NAME[name]
    inputs = make_inputs(case, dtype, "channels_last", seed=6)
    scales = test_scales._scales(case, test_scales.SUBSETS["all"], torch.float32, seed=7)
    with tf32(False):
        shape = reference.condconv2d_loop(*[t.double() if t is not None else None
                                            for t in inputs], *conv_args(case, inputs[0])).shape
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(8),
                               dtype=torch.float64).to(dtype)
        truth, truth_grads = _scaled(case, [t.double() if t is not None else None
                                            for t in inputs], [s.double() for s in scales],
                                     grad_out.double(), reference.condconv2d_loop, "cpu")
        same, same_grads = _scaled(case, inputs, scales, grad_out, reference.condconv2d_loop,
                                   DEVICE)
        with poisoned_outputs():
            out, grads = _scaled(case, inputs, scales, grad_out,
                                 lambda *a, **k: cc.condconv2d(*a, **k, backend=backend), DEVICE)
    assert_close(out, truth, same, f"{backend} out", factor=4.0)
    for g, t, s in zip(grads, truth_grads, same_grads):
        assert_close(g, t, s, f"{backend} grad", factor=4.0)


def _hopper() -> bool:
    return ON_GPU and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _pointwise_inputs(seed, batch, experts, cin, cout, side):
    """x (B, Cin, side, side), routing (B, E), weight (E, Cout, Cin, 1, 1) scaled by
    1/sqrt(Cin) and grad_out (B, Cout, side, side), float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, side, side, generator=g, dtype=torch.float64)
    r = torch.rand(batch, experts, generator=g, dtype=torch.float64)
    w = torch.randn(experts, cout, cin, 1, 1, generator=g, dtype=torch.float64) / cin ** 0.5
    go = torch.randn(batch, cout, side, side, generator=g, dtype=torch.float64)
    return x, r, w, go


def _pointwise_scales(seed, batch, cin, cout, scaled):
    """ODConv's per-example scales of a 1x1 layer, in_scale (B, Cin), out_scale (B, Cout) and
    tap_scale (B, 1, 1), float64 in [0.5, 1.5] on the CPU; three Nones unless ``scaled``, only
    in_scale where it is "in"."""
    if not scaled:
        return None, None, None
    g = torch.Generator().manual_seed(seed)
    scales = tuple(0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
                   for shape in ((batch, cin), (batch, cout), (batch, 1, 1)))
    return (scales[0], None, None) if scaled == "in" else scales


def _on_device(scales, dtype=torch.float32):
    return tuple(None if t is None else t.to(DEVICE, dtype) for t in scales)


@pytest.mark.skipif(not _hopper(), reason="the stationary kernel needs an sm_90 GPU")
@pytest.mark.parametrize("experts,cin,cout,side,batch,dtype,bias,scaled", [
    (8, 192, 1152, 7, 37, torch.bfloat16, True, False),  # A from registers, 3 K chunks of 64
    (8, 112, 200, 14, 9, torch.float16, True, False),  # A from shared memory, 2 pixel tiles
    (8, 80, 480, 14, 5, torch.bfloat16, False, False),  # K chunks of 32
    (4, 48, 96, 5, 3, torch.bfloat16, True, False),  # K padded to 64, 25 pixels
    (3, 16, 64, 12, 2, torch.bfloat16, True, False),  # K = 16, 144 pixels (2 tiles)
    (2, 448, 128, 7, 300, torch.bfloat16, True, False),  # 7 K chunks; 300 in slices of 5
    (8, 112, 200, 14, 40, torch.bfloat16, True, False),  # shared-memory form, 2 a program
    (8, 192, 1152, 7, 11, torch.bfloat16, True, True),  # A from registers, with the scales
    (8, 112, 200, 14, 9, torch.bfloat16, True, True),  # A from shared memory, with the scales
    (8, 192, 1152, 7, 6, torch.float16, False, "in"),  # in_scale alone, in x's dtype
], ids=["7x7-K192", "14x14-K112-fp16", "K80-no-bias", "5x5-K48", "K16-12x12", "K448-E2",
        "14x14-2-per-program", "7x7-K192-scales", "14x14-K112-scales", "7x7-in-scale-fp16"])
def test_gpu_stationary_forward(experts, cin, cout, side, batch, dtype, bias, scaled):
    """The experimental experts-stationary 1x1 forward (triton/stationary.py), called directly
    (it is behind CONDCONV_TRITON_STATIONARY): against the per-example loop in float64 on the
    CPU (with ODConv's three per-example scales where ``scaled``, in_scale alone in ``dtype``
    where it is "in"), within the error of the same
    loop run by PyTorch in ``dtype`` on the device; the output poisoned with NaN first, so an
    unwritten element fails; and through ``condconv2d(backend="triton")`` with the switch on:
    the same output."""
    from unittest import mock
    from condconv_kernels import _env
    from condconv_kernels.triton import stationary
    x, r, w, _ = _pointwise_inputs(11, batch, experts, cin, cout, side)
    b = torch.randn(experts, cout, generator=torch.Generator().manual_seed(14),
                    dtype=torch.float64) if bias else None
    scales = _pointwise_scales(15, batch, cin, cout, scaled)
    named = dict(zip(("in_scale", "out_scale", "tap_scale"), scales))
    truth = reference.condconv2d_loop(x, r, w, b, **named)
    xd = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    rd, wd = r.to(DEVICE, torch.float32), w.to(DEVICE, dtype)
    bd = b.to(DEVICE, dtype) if bias else None
    sd = _on_device(scales, dtype if scaled == "in" else torch.float32)
    named_d = dict(zip(("in_scale", "out_scale", "tap_scale"), sd))
    same = reference.condconv2d_loop(xd, rd.to(dtype), wd, bd, **named_d).cpu()
    plan = stationary.eligible(xd, experts, cout, 1, True, False, scales=sd)
    assert plan is not None, "the kernel should take this call"
    out = torch.full((batch, cout, side, side), float("nan"), device=DEVICE,
                     dtype=dtype).contiguous(memory_format=torch.channels_last)
    stationary.run(xd, rd, wd, bd, out, plan, scales=sd)
    assert_close(out.cpu(), truth, same, "stationary out", factor=4.0)
    with mock.patch.object(_env, "TRITON_STATIONARY", stationary.PASSES):
        routed = cc.condconv2d(xd, rd, wd, bd, backend="triton", **named_d)
    assert torch.equal(routed, out), "condconv2d with the switch on took another kernel"


@pytest.mark.skipif(not _hopper(), reason="the stationary kernel needs an sm_90 GPU")
@pytest.mark.parametrize("experts,cin,cout,side,batch,dtype,x_format,scaled", [
    (8, 1152, 192, 7, 37, torch.bfloat16, torch.channels_last, False),  # A from registers
    (8, 672, 112, 14, 9, torch.float16, torch.channels_last, False),  # A from shared memory
    (8, 672, 112, 14, 64, torch.bfloat16, torch.channels_last, False),  # 6 examples a program
    (8, 480, 80, 14, 24, torch.bfloat16, torch.contiguous_format, False),  # K chunks of 32
    (4, 96, 48, 5, 3, torch.bfloat16, torch.channels_last, False),  # K = 48 padded to 64
    (8, 1152, 192, 7, 9, torch.bfloat16, torch.channels_last, True),  # with the scales
    (8, 672, 112, 14, 5, torch.bfloat16, torch.channels_last, True),  # A_SMEM, the scales
], ids=["7x7-1152-192", "14x14-672-112-fp16", "14x14-6-per-program", "K80-nchw-x",
        "5x5-96-48", "7x7-1152-192-scales", "14x14-672-112-scales"])
def test_gpu_stationary_grad_x(experts, cin, cout, side, batch, dtype, x_format, scaled):
    """The stationary kernel transposed (the slab of W^T: grad_x of a 1x1 layer), called
    directly: grad_x = W_b^T grad_out (with ODConv's scales where ``scaled``: in_scale x
    tap_scale x W_b^T (out_scale x grad_out)) against float64 on the CPU, within 4x the error
    of the same product in ``dtype`` on the device; and the triton backend's backward with the
    switch on gives the same grad_x (in x's memory format: NCHW for an NCHW x, written through
    its strides)."""
    from unittest import mock
    from condconv_kernels import _env
    from condconv_kernels.triton import stationary
    x, r, w, go = _pointwise_inputs(12, batch, experts, cin, cout, side)
    in_s, out_s, tap_s = _pointwise_scales(16, batch, cin, cout, scaled)
    if scaled:
        truth = torch.einsum("be,eoc,bo,bohw->bchw", r, w[..., 0, 0], out_s, go)
        truth = truth * (in_s * tap_s.view(batch, 1))[:, :, None, None]
    else:
        truth = torch.einsum("be,eoc,bohw->bchw", r, w[..., 0, 0], go)
    god = go.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    rd, wd = r.to(DEVICE, torch.float32), w.to(DEVICE, dtype)
    sd = _on_device((in_s, out_s, tap_s))
    mixed = torch.einsum("be,eoc->boc", rd.to(dtype), wd[..., 0, 0])
    if scaled:
        mixed = mixed * (sd[1] * sd[2].view(batch, 1))[:, :, None].to(dtype)
    same = torch.einsum("boc,bohw->bchw", mixed, god)
    if scaled:
        same = same * sd[0][:, :, None, None].to(dtype)
    same = same.cpu()
    plan = stationary.eligible(god, experts, cin, 1, True, False, transposed=True, scales=sd)
    assert plan is not None, "the kernel should take this call"
    grad_x = torch.full((batch, cin, side, side), float("nan"), device=DEVICE,
                        dtype=dtype).contiguous(memory_format=torch.channels_last)
    stationary.run(god, rd, wd, None, grad_x, plan, transposed=True, scales=sd)
    assert_close(grad_x.cpu(), truth, same, "stationary grad_x", factor=4.0)
    xd = x.to(DEVICE, dtype).contiguous(memory_format=x_format).requires_grad_()
    named = dict(zip(("in_scale", "out_scale", "tap_scale"), sd))
    with mock.patch.object(_env, "TRITON_STATIONARY", stationary.PASSES):
        cc.condconv2d(xd, rd, wd, backend="triton", **named).backward(god)
    assert torch.equal(xd.grad, grad_x), "the backward with the switch on took another kernel"


@pytest.mark.skipif(not _hopper(), reason="the kernel needs an sm_90 GPU")
@pytest.mark.parametrize("experts,cin,cout,side,batch,dtype,transposed,bias,register_a", [
    (8, 192, 1152, 7, 37, torch.bfloat16, False, False, True),  # s6.b1.expand, 10 blocks
    (8, 1152, 192, 7, 37, torch.bfloat16, True, False, True),  # its project layer's grad_x (W^T)
    (8, 672, 192, 7, 22, torch.bfloat16, True, False, True),  # 672 rows: a half row block
    (8, 192, 1152, 7, 256, torch.bfloat16, False, False, True),  # the benchmarks' batch
    (4, 112, 200, 8, 9, torch.float16, False, True, True),  # 64 pixels, 7 chunks, 200 rows, a bias
    (1, 16, 16, 1, 3, torch.bfloat16, False, True, True),  # one pixel, expert and chunk
    (8, 48, 64, 4, 5, torch.bfloat16, True, False, True),  # 16-pixel tiles, W^T
    (3, 32, 96, 5, 13, torch.bfloat16, False, False, True),  # 3 experts, 32-pixel tiles
    (8, 112, 672, 14, 22, torch.bfloat16, False, False, True),  # 14x14: 4 tiles, 7 chunks
    (8, 112, 672, 14, 64, torch.bfloat16, False, False, True),  # 6 examples a program: two blocks
    (8, 672, 112, 14, 22, torch.bfloat16, True, False, True),  # its project layer's grad_x
    (8, 80, 480, 14, 9, torch.float16, False, True, True),  # 5 chunks, a bias, fp16
    (4, 32, 48, 10, 7, torch.bfloat16, False, False, True),  # 100 pixels: two of the 4 tiles empty
    # the mixed tiles through shared memory (the plan's fallback for one tile an example)
    (8, 192, 1152, 7, 37, torch.bfloat16, False, False, False),
    (8, 1152, 192, 7, 37, torch.bfloat16, True, False, False),
], ids=["7x7-192-1152", "7x7-1152-192-grad-x", "7x7-672-192-grad-x", "7x7-batch-256",
        "8x8-E4-K112-fp16-bias", "1x1-E1-bias", "4x4-grad-x", "5x5-E3", "14x14-112-672",
        "14x14-two-blocks",
        "14x14-672-112-grad-x", "14x14-80-480-fp16-bias", "10x10-E4", "7x7-192-1152-smem-A",
        "7x7-1152-192-grad-x-smem-A"])
def test_gpu_stationary_mix(experts, cin, cout, side, batch, dtype, transposed, bias,
                            register_a):
    """The experts-stationary kernel with the mix on the tensor cores (triton/stationary_mix.py),
    called directly, its output poisoned with NaN (an unwritten element fails): the forward
    (or, ``transposed``, grad_x with W^T) against float64 on the CPU, within 4x the error of
    the same per-example product in ``dtype`` on the device with the routing rounded to
    ``dtype`` as the kernel's mix rounds it; and through the triton backend with the switch's
    mix pass alone: the same result, bitwise. ``register_a`` False (two 7x7 cases): the plan's
    other way to the products, the mixed tiles through shared memory, the one to fall back
    to: as close to float64, and bitwise the result with them in registers."""
    from unittest import mock
    from condconv_kernels import _env
    from condconv_kernels.triton import stationary_mix
    x, r, w, go = _pointwise_inputs(19, batch, experts, cin, cout, side)
    b = torch.randn(experts, cout, generator=torch.Generator().manual_seed(20),
                    dtype=torch.float64) if bias else None
    rd, wd = r.to(DEVICE, torch.float32), w.to(DEVICE, dtype)
    mixed = torch.einsum("be,eoc->boc", rd.to(dtype), wd[..., 0, 0])  # in dtype
    if transposed:
        truth = torch.einsum("be,eoc,bohw->bchw", r, w[..., 0, 0], go)
        inp = go.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
        same = torch.einsum("boc,bohw->bchw", mixed, inp).cpu()
        rows = cin
    else:
        truth = reference.condconv2d_loop(x, r, w, b)
        inp = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
        same = torch.einsum("boc,bchw->bohw", mixed, inp)
        if bias:
            same = same + (rd.to(dtype) @ b.to(DEVICE, dtype))[:, :, None, None]
        same = same.cpu()
        rows = cout
    bd = b.to(DEVICE, dtype) if bias else None
    out = torch.full((batch, rows, side, side), float("nan"), device=DEVICE,
                     dtype=dtype).contiguous(memory_format=torch.channels_last)
    plan = stationary_mix.eligible(inp, experts, rows, 1, True, False, transposed=transposed,
                                   out=out)
    assert plan is not None, "the kernel should take this call"
    if not register_a:
        assert plan["REG_A"], "this case's plan takes the mixed tiles from registers"
        from_registers = stationary_mix.run(inp, rd, wd, bd, out.clone(), plan,
                                            transposed=transposed)
        plan = dict(plan, REG_A=False)
    stationary_mix.run(inp, rd, wd, bd, out, plan, transposed=transposed)
    assert_close(out.cpu(), truth, same, "mix grad_x" if transposed else "mix out",
                 factor=4.0)
    if not register_a:
        # the same products of the same values in the same order
        assert torch.equal(out, from_registers), "the two ways to the products differ"
        return
    with mock.patch.object(_env, "TRITON_STATIONARY", frozenset({"mix"})):
        if transposed:
            xd = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
            xd.requires_grad_()
            cc.condconv2d(xd, rd, wd, backend="triton").backward(inp)
            routed = xd.grad
        else:
            routed = cc.condconv2d(inp, rd, wd, bd, backend="triton")
    assert torch.equal(routed, out), "the triton backend with the switch on took another kernel"


@pytest.mark.skipif(not _hopper(), reason="the kernel needs an sm_90 GPU")
@pytest.mark.parametrize("experts,cin,cout,side,batch,dtype,need_r,need_w,warps", [
    (8, 192, 1152, 7, 37, torch.bfloat16, True, True, 8),  # 6 x 18 tiles, one pixel tile each
    (8, 192, 1152, 7, 37, torch.bfloat16, True, True, 4),  # 12 x 18 tiles of 64 x 16
    (8, 1152, 192, 7, 20, torch.bfloat16, True, True, 8),  # 36 x 3 tiles
    (8, 112, 672, 14, 9, torch.float16, True, True, 8),  # 4 pixel tiles, the last of 4 pixels
    (8, 112, 672, 14, 9, torch.bfloat16, True, True, 4),
    (3, 48, 80, 5, 11, torch.bfloat16, True, True, 8),  # E = 3, half-empty tiles (80 rows, 48
    # channels)
    (8, 32, 64, 56, 4, torch.bfloat16, True, True, 8),  # 49 pixel tiles an example
    (8, 192, 1152, 7, 256, torch.bfloat16, True, True, 8),  # the training batch: 8 x 32
    (8, 192, 1152, 7, 37, torch.bfloat16, True, False, 8),  # grad_routing alone
    (8, 192, 1152, 7, 37, torch.bfloat16, False, True, 8),  # grad_weight alone
    (1, 16, 16, 1, 3, torch.bfloat16, True, True, 8),  # one expert, one pixel, 16 channels
], ids=["7x7-192-1152", "7x7-192-1152-w4", "7x7-1152-192", "14x14-112-672-fp16",
        "14x14-112-672-w4", "5x5-E3-80-rows", "56x56-49-tiles", "7x7-batch-256",
        "routing-alone", "weight-alone", "1x1-E1"])
def test_gpu_pointwise_kernel_grad(experts, cin, cout, side, batch, dtype, need_r, need_w,
                                   warps):
    """The experimental dense 1x1 kernel gradient in the tensor cores' accumulator layout
    (triton/pointwise_grad.py), called directly at the plan of ``warps`` with its buffers
    poisoned with NaN (an unwritten partial sum fails): grad_routing (float32) and grad_weight
    (``dtype``) against float64 on the CPU, within 4x the error of the same sums in float32 on
    the device from the ``dtype`` inputs (grad_weight then rounded to ``dtype``); a half not
    asked for is None; and, at the default plan, the triton backend's backward with the
    switch's kernel_grad pass gives the same gradients, bitwise."""
    from unittest import mock
    from condconv_kernels import _env
    from condconv_kernels.triton import pointwise_grad
    x, r, w, go = _pointwise_inputs(18, batch, experts, cin, cout, side)
    G = torch.einsum("bohw,bchw->boc", go, x)
    truth_r = torch.einsum("boc,eoc->be", G, w[..., 0, 0])
    truth_w = torch.einsum("be,boc->eoc", r, G)[..., None, None]
    xd = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    god = go.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    rd, wd = r.to(DEVICE, torch.float32), w.to(DEVICE, dtype)
    Gd = torch.einsum("bohw,bchw->boc", god.float(), xd.float())
    same_r = torch.einsum("boc,eoc->be", Gd, wd.float()[..., 0, 0]).cpu()
    same_w = torch.einsum("be,boc->eoc", rd, Gd)[..., None, None].to(dtype).cpu()
    geometry = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert pointwise_grad.eligible(xd, god, wd, *geometry) is not None, (
        "the kernel should take this call")
    plan = pointwise_grad.plan(experts, cin, cout, side * side, warps)
    empty = torch.empty
    with mock.patch.object(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan"))):
        grad_r, grad_w = pointwise_grad.kernel_grads(god, xd, rd, wd, need_r, need_w, plan)
    if need_r:
        assert_close(grad_r.cpu(), truth_r.float(), same_r, "grad_routing", factor=4.0)
    else:
        assert grad_r is None
    if need_w:
        assert grad_w.dtype == dtype
        assert_close(grad_w.cpu(), truth_w.to(dtype), same_w, "grad_weight", factor=4.0)
    else:
        assert grad_w is None
    if plan != pointwise_grad.plan(experts, cin, cout, side * side):
        return  # the backend launches the default plan
    rg, wg = rd.clone().requires_grad_(need_r), wd.clone().requires_grad_(need_w)
    with mock.patch.object(_env, "TRITON_STATIONARY", frozenset({"kernel_grad"})):
        cc.condconv2d(xd, rg, wg, backend="triton").backward(god)
    if need_r:
        assert torch.equal(rg.grad, grad_r), "the backward with the switch on took another kernel"
    if need_w:
        assert torch.equal(wg.grad, grad_w), "the backward with the switch on took another kernel"


@pytest.mark.skipif(not _hopper(), reason="the stationary kernel needs an sm_90 GPU")
@pytest.mark.parametrize("experts,cin,cout,side,batch,dtype,scaled", [
    (8, 192, 1152, 7, 37, torch.bfloat16, False),  # slab W, two tiles of 32 pixels
    (8, 112, 672, 14, 9, torch.float16, False),  # slab W, four tiles of 64 pixels
    (9, 192, 128, 14, 3, torch.bfloat16, False),  # slab W, one buffer, 13 tiles of 16 pixels
    (8, 1152, 192, 7, 20, torch.bfloat16, False),  # W's slab too big: W^T
    (8, 672, 112, 14, 64, torch.bfloat16, False),  # W^T, several examples a program
    (3, 48, 96, 5, 3, torch.bfloat16, False),  # E = 3 (padded to 4), K = 48
    (2, 208, 96, 7, 5, torch.bfloat16, False),  # four K chunks of 64 (K padded to 256)
    (8, 80, 480, 14, 6, torch.bfloat16, False),  # K chunks of 32
    (8, 192, 1152, 7, 9, torch.bfloat16, True),  # slab W, with the scales
    (8, 672, 112, 14, 5, torch.bfloat16, True),  # W^T, with the scales
], ids=["7x7-192-1152", "14x14-112-672-fp16", "14x14-192-128-one-buffer",
        "7x7-1152-192-transposed", "14x14-672-112-transposed", "5x5-E3", "K208-4-chunks",
        "14x14-80-480", "7x7-192-1152-scales", "14x14-672-112-transposed-scales"])
def test_gpu_stationary_routing_grad(experts, cin, cout, side, batch, dtype, scaled):
    """The stationary kernel's routing-gradient form (no mix: <W_e, grad_out_b x_b^T> per
    example and expert; with ODConv's scales where ``scaled``: W_e scaled by out_scale, in_scale
    and tap_scale), through the backend's helper (slab W where it fits, else W^T; each case's
    comment names the plan it should get): against float64 on the CPU within 4x the error of the same sum in
    ``dtype`` on the device; and the triton backend's backward with the switch on gives the
    same grad_routing."""
    from unittest import mock
    import condconv_kernels.triton as backend
    from condconv_kernels import _env
    from condconv_kernels.triton import stationary
    x, r, w, go = _pointwise_inputs(13, batch, experts, cin, cout, side)
    in_s, out_s, tap_s = _pointwise_scales(17, batch, cin, cout, scaled)
    if scaled:
        truth = torch.einsum("bohw,bo,eoc,bc,bchw->be", go, out_s, w[..., 0, 0], in_s, x)
        truth = truth * tap_s.view(batch, 1)
    else:
        truth = torch.einsum("bohw,eoc,bchw->be", go, w[..., 0, 0], x)
    xd = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    god = go.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    wd = w.to(DEVICE, dtype)
    sd = _on_device((in_s, out_s, tap_s))
    xs = xd * sd[0][:, :, None, None].to(dtype) if scaled else xd
    per_expert = torch.einsum("eoc,bchw->ebohw", wd[..., 0, 0], xs)  # in dtype
    gos = god.float() * sd[1][:, :, None, None] if scaled else god.float()
    same = (per_expert.float() * gos).sum((2, 3, 4)).t()
    same = (same * sd[2].view(batch, 1) if scaled else same).cpu()
    ours = backend._stationary_routing_grad(god, xd, wd, 1, (1, 1), (0, 0, 0, 0), sd)
    assert ours is not None, "the kernel should take this call"
    assert_close(ours.cpu(), truth, same, "stationary grad_routing", factor=4.0)
    rd = r.to(DEVICE, torch.float32).requires_grad_()
    named = dict(zip(("in_scale", "out_scale", "tap_scale"), sd))
    with mock.patch.object(_env, "TRITON_STATIONARY", stationary.PASSES):
        cc.condconv2d(xd, rd, wd, backend="triton", **named).backward(god)
    assert torch.equal(rd.grad, ours), "the backward with the switch on took another kernel"


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b == "triton"])
@pytest.mark.parametrize("experts,cin,cout,side,batch,dtype,x_format,chunk_bytes,r_dtype", [
    (8, 192, 1152, 7, 37, torch.bfloat16, "channels_last", 32 << 20, None),  # one 16 MB chunk
    (8, 192, 1152, 7, 37, torch.bfloat16, "channels_last", 3 << 20, None),  # 7 examples each
    (8, 192, 1152, 7, 37, torch.bfloat16, "channels_last", 3 << 20, torch.float32),
    (8, 80, 480, 14, 9, torch.float16, "contiguous", 32 << 20, None),
    (3, 48, 96, 5, 3, torch.bfloat16, "channels_last", 32 << 20, None),  # |W| too short to slice
], ids=["7x7-192-1152", "7x7-192-1152-chunks", "7x7-float32-routing", "14x14-80-480-fp16-nchw",
        "5x5-E3"])
def test_gpu_batched_passes(experts, cin, cout, side, batch, dtype, x_format, chunk_bytes,
                            r_dtype, backend, monkeypatch):
    """The experimental batched 1x1 passes (triton/batched.py, CONDCONV_TRITON_BATCHED=1:
    cuBLAS batched products over chunks of mixed kernels or of per-example G) through the
    triton backend: the forward (with bias), grad_x, grad_routing and grad_weight against
    float64 on the CPU, within 4x the error of the reference backend's in ``dtype`` on the
    device, with a floor of 8 ulps of the scale; routing in ``dtype``, or in float32 beside it
    (``r_dtype``, as autocast leaves it)."""
    from condconv_kernels import _env
    from condconv_kernels.triton import batched
    monkeypatch.setattr(_env, "TRITON_BATCHED", _env.BATCHED_PASSES)
    monkeypatch.setattr(batched, "CHUNK_BYTES", chunk_bytes)
    x, r, w, go = _pointwise_inputs(19, batch, experts, cin, cout, side)
    b = torch.randn(experts, cout, generator=torch.Generator().manual_seed(23),
                    dtype=torch.float64)
    fmt = torch.channels_last if x_format == "channels_last" else torch.contiguous_format
    dev = [t.to(DEVICE, dtype).contiguous(memory_format=fmt) if t.dim() == 4 else
           t.to(DEVICE, dtype) for t in (x, go, r, w, b)]
    dev[2] = r.to(DEVICE, r_dtype or dtype)
    assert batched.eligible(dev[0], dev[3], (1, 1), (0, 0, 0, 0), 1, also=dev[1])
    geometry = ([1, 1], [0] * 4, [1, 1], 1)

    def passes(name, x_, go_, r_, w_, b_):
        out = torch.ops.condconv.condconv2d(x_, r_, w_, b_, *geometry, name, None, None, None)
        return (out,) + tuple(torch.ops.condconv.condconv2d_backward(
            go_, x_, r_, w_, None, *geometry, name, [True, True, True, False], None, None,
            None)[:3])
    truth = passes("reference", x, go, r, w, b)
    same = passes("reference", *dev)
    ours = passes(backend, *dev)
    for o, t, sp, name in zip(ours, truth, same, ("out", "grad_x", "grad_routing",
                                                   "grad_weight")):
        assert_close(o.cpu(), t.to(o.dtype), sp.cpu(), f"batched {name}", factor=4.0, ulps=8)
