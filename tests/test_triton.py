"""The triton backend on CPU tensors, in Triton's interpreter (TRITON_INTERPRET=1): a curated
part of the CPU test matrix (the interpreter is ~1000x slower than compiled code). Every
tl.dot dimension is >= 16, so these kernels also compile for the GPU, where test_gpu.py runs
the whole matrix in float32, float16 and bfloat16."""
import pytest
import torch

import condconv_kernels as cc
from condconv_kernels import reference
from conftest import CASES_BY_NAME, INTERPRETED, LAYOUTS, Case, make_inputs, run_op
import test_op
import test_registration

pytestmark = pytest.mark.skipif("triton" not in INTERPRETED,
                                reason="triton is not installed or runs compiled (GPU)")

MATRIX = ["k3", "k1", "k1_s2_e8", "k5_same", "k3_s2_asym", "k3_d2_e1", "g2_s2_e8_b1", "g2_k1",
          "dw3", "dw_mult2_d2_asym", "dw3_s2_b1_e1_nobias", "k1x3_rect", "k3_valid_b1_e8",
          "k5_d2_s2_asym"]


@pytest.mark.parametrize("name", MATRIX)
def test_float64(name):
    layout = LAYOUTS[MATRIX.index(name) % len(LAYOUTS)]
    test_op._check(CASES_BY_NAME[name], "triton", torch.float64, layout)


@pytest.mark.parametrize("name", ["k3_s2_asym", "g2_k1", "dw3", "k1"])
def test_float32(name):
    test_op._check(CASES_BY_NAME[name], "triton", torch.float32, "channels_last")


@pytest.mark.parametrize("name", ["k3_s2_asym", "dw3_s2_b1_e1_nobias"])
def test_float16(name):
    test_op._check(CASES_BY_NAME[name], "triton", torch.float16, "contiguous", factor=4.0)


def test_float16_with_float32_routing():
    test_op._check(CASES_BY_NAME["k1"], "triton", torch.float16, "sliced",
                   routing_dtype=torch.float32, factor=4.0)


@pytest.mark.parametrize("name", ["k3_s2_asym", "dw3_s2_b1_e1_nobias"])
def test_gradcheck(name):
    test_registration.test_gradcheck_float64(name, "triton")


def test_opcheck():
    test_registration.test_opcheck("g2_k1", "sliced", "triton")


def test_empty_batch_and_partial_gradients():
    test_op.test_empty_batch("k3", "triton")
    test_op.test_partial_gradients("triton")


def test_backward_is_deterministic():
    c = CASES_BY_NAME["k3_s2_asym"]
    inputs = make_inputs(c, torch.float32, seed=3)
    grad_out = torch.randn(run_op(c, inputs, "triton")[0].shape)
    first = run_op(c, inputs, "triton", grad_out)
    for _ in range(3):
        out, grads = run_op(c, inputs, "triton", grad_out)
        assert torch.equal(out, first[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, first[1]))


def test_fuzz():
    import test_fuzz
    test_fuzz._fuzz("triton")


def test_auto_does_not_pick_the_interpreter():
    assert cc.available_backends("cpu")[0] == "triton"
    case = CASES_BY_NAME["k1"]
    x, routing, weight, bias = make_inputs(case, torch.float32)
    # auto on CPU picks the compiled C++ kernels (or the reference), never the interpreter
    from condconv_kernels import backends
    assert backends.resolve("auto", "cpu") in ("cpu", "reference")


def test_autotune_switch(monkeypatch):
    """On the GPU the kernels autotune over the whole table; CONDCONV_TRITON_CONFIG forces
    one of its entries; with CONDCONV_TRITON_AUTOTUNE=0 they launch its first configuration,
    tiles and launch options both."""
    import triton
    from condconv_kernels.triton import _config

    @triton.jit
    def kernel(x_ptr, BLOCK_CO: triton.language.constexpr, BLOCK_K: triton.language.constexpr,
               BLOCK_P: triton.language.constexpr):
        pass

    shapes = _config.KGRAD_TILES  # a table is found by its tile names
    monkeypatch.setattr(_config, "INTERPRET", False)
    monkeypatch.setattr(_config, "AUTOTUNE", True)
    tuned = _config.autotune(["COUT_G"], shapes)(kernel)
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in tuned.configs] == [
        (dict(zip(shapes, row[:3])), row[3], row[4]) for row in _config._GPU_CONFIGS]
    assert _config.fixed_blocks(shapes) == {}
    at = 2  # forced: that entry launches
    row = _config._GPU_CONFIGS[at]
    monkeypatch.setattr(_config, "AUTOTUNE", False)
    monkeypatch.setattr(_config, "FORCED_CONFIG", at)
    assert _config.fixed_blocks(shapes, experts=4, itemsize=2) == {
        **dict(zip(shapes, row[:3])), "num_warps": row[3], "num_stages": row[4]}
    monkeypatch.setattr(_config, "FORCED_CONFIG", None)

    monkeypatch.setattr(_config, "AUTOTUNE", False)
    assert _config.autotune(["COUT_G"], shapes)(kernel) is kernel
    first = _config._GPU_DW_CONFIGS[0]
    assert _config.fixed_blocks(_config.DW_TILES, itemsize=2, channels_last=True) == {
        "BLOCK_C": first[0], "BLOCK_Q": first[1], "COLS": first[2], "EXAMPLES": first[3],
        "ROW_STAGES": first[4], "num_warps": first[5], "num_stages": first[6]}


def test_depthwise_configurations_fit(monkeypatch):
    """The depthwise forward / grad_x table is pruned to the configurations whose accumulators
    fit a thread's registers (DW_ACC_VALUES float32 values): every one for the forward in
    float32 (its stride does not add accumulators); at stride 2 grad_x's groups hold twice the
    columns, in float64 every value two, and the 14-column configurations go; where none fits,
    the one with the fewest. Blocks of several examples only on 16-bit channels_last inputs
    with float32 accumulators and within the batch's bucket. Without autotuning the launcher
    gets the first that fits."""
    import triton
    import triton.language as tl
    from condconv_kernels.triton import _config
    table = _config._table(_config.DW_TILES)
    configs = [triton.Config(b, num_warps=w, num_stages=st) for b, w, st in table]

    def kept(names, stride, acc, dtype=torch.bfloat16, channel_stride=1, batch=256):
        named = dict.fromkeys(names)
        named[names[0]] = torch.empty(0, dtype=dtype)
        named.update(s_xc=channel_stride, s_gc=channel_stride, B_KEY=batch)
        return _config._prune_depthwise(configs, named, STRIDE_W=stride, ACC=acc)
    assert kept(("x_ptr", "out_ptr"), 2, tl.float32) == configs
    assert any(c.kwargs["EXAMPLES"] > 1 for c in configs)
    one = [c for c in configs if c.kwargs["EXAMPLES"] == 1]
    assert kept(("x_ptr", "out_ptr"), 1, tl.float32, torch.float32) == one
    assert kept(("x_ptr", "out_ptr"), 1, tl.float32, channel_stride=49) == one  # NCHW
    assert kept(("g_ptr", "dx_ptr"), 1, tl.float32, batch=2) == one
    for names, stride, acc in ((("g_ptr", "dx_ptr"), 2, tl.float32),
                               (("x_ptr", "out_ptr"), 1, tl.float64)):
        fit = kept(names, stride, acc)
        assert 0 < len(fit) < len(configs) and all(c.kwargs["COLS"] < 14 for c in fit)
        wide = 8 if acc == tl.float64 else 4
        assert all(_config.dw_accumulators(c.kwargs, c.num_warps, stride if "dx_ptr" in names
                                           else 1, wide) <= _config.DW_ACC_VALUES for c in fit)
    fewest = kept(("g_ptr", "dx_ptr"), 2, tl.float64)
    assert len(fewest) == 1 and _config.dw_accumulators(fewest[0].kwargs, fewest[0].num_warps, 2,
                                                        8) > _config.DW_ACC_VALUES
    monkeypatch.setattr(_config, "INTERPRET", False)
    monkeypatch.setattr(_config, "AUTOTUNE", False)
    monkeypatch.setattr(_config, "FORCED_CONFIG", 2)  # 14 columns: grad_x at stride 2 moves on
    assert _config.fixed_blocks(_config.DW_TILES)["COLS"] == table[2][0]["COLS"] == 14
    assert _config.fixed_blocks(_config.DW_TILES, acc_bytes=4, stride=2)["COLS"] == 7
    monkeypatch.setattr(_config, "FORCED_CONFIG", None)  # the first: 4 examples where they fit
    assert _config.fixed_blocks(_config.DW_TILES, itemsize=2, channels_last=True)[
        "EXAMPLES"] == table[0][0]["EXAMPLES"] == 4
    assert _config.fixed_blocks(_config.DW_TILES, itemsize=2) == {
        **table[1][0], "num_warps": table[1][1], "num_stages": table[1][2]}


def test_tuned_kernel_launches_a_tuned_key_without_triton_run(monkeypatch):
    """TunedKernel's launch key is Triton's (the tuned configuration is found in the cache
    Triton's run filled, and no other key is stored); a key seen before launches the best
    configuration without going through Triton's run or timing anything again; a new dtype or
    key argument is tuned anew, and so is a key on another device (a process may hold two kinds
    of GPU), whose configuration then stays that device's."""
    from types import SimpleNamespace
    import triton
    from triton.runtime.autotuner import Autotuner
    from condconv_kernels.triton import _config

    @triton.jit
    def kernel(x_ptr, w_ptr, n, B_KEY, KEY_L, E: triton.language.constexpr,
               KH: triton.language.constexpr, BLOCK: triton.language.constexpr):
        pass

    configs = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2) for b in (16, 32, 64)]
    tuned = _config.TunedKernel(kernel, configs, ["B_KEY", "KEY_L", "E", "KH"])
    launched, timed, through_triton = [], [], []
    device = [0]
    monkeypatch.setattr(_config, "driver", SimpleNamespace(
        active=SimpleNamespace(get_current_device=lambda: device[0])))
    monkeypatch.setattr(tuned.fn, "run", lambda *a, **kw: launched.append(kw["BLOCK"]))
    speed = {16: 3.0, 32: 1.0, 64: 2.0}  # the middle configuration is the fastest

    def bench(*args, config, **meta):
        timed.append(config.kwargs["BLOCK"])
        return [speed[config.kwargs["BLOCK"]]] * 3
    monkeypatch.setattr(tuned, "_bench", bench)
    base_run = Autotuner.run

    def triton_run(self, *a, **kw):  # (a thread tuning holds the kernel's lock)
        assert self._lock._is_owned()
        through_triton.append(1)
        return base_run(self, *a, **kw)
    monkeypatch.setattr(Autotuner, "run", triton_run)
    x, w = torch.randn(4), torch.randn(4, dtype=torch.float16)

    def launch(x, b_key, key_l=64):
        args, kwargs = (x, w, 7, b_key, key_l), dict(E=8, KH=3)
        tuned.run(*args, grid=(1,), warmup=False, **kwargs)
        return tuned.tuning_key(args, kwargs)

    key = launch(x, 256)
    assert key == (256, 64, 8, 3, "torch.float32", "torch.float16")
    assert list(tuned.cache) == [key] and tuned.cache[key].kwargs["BLOCK"] == 32
    assert (sorted(timed), launched, len(through_triton)) == ([16, 32, 64], [32], 1)
    for _ in range(3):
        assert launch(x, 256) == key
    assert (len(timed), launched, len(through_triton)) == (3, [32] * 4, 1)
    assert tuned.best_config.kwargs["BLOCK"] == 32
    speed[32], speed[64] = 9.0, 0.5
    launch(x.to(torch.float64), 256)
    launch(x, 8)
    launch(x, 8, key_l=16)
    assert len(tuned.cache) == 4 and len(timed) == 12 and len(through_triton) == 4
    assert launched[-3:] == [64, 64, 64]
    device[0] = 1  # another GPU, where 16 is the fastest: tuned there, kept there
    speed[16] = 0.1
    for _ in range(2):
        assert launch(x, 256) == key
    assert list(tuned.cache) == [key] and tuned.cache[key].kwargs["BLOCK"] == 16
    assert (len(timed), len(through_triton), launched[-2:]) == (15, 5, [16, 16])
    device[0] = 0  # back: the first device's configurations, nothing timed
    launch(x, 256)
    assert len(tuned.cache) == 4 and tuned.cache[key].kwargs["BLOCK"] == 32
    assert (len(timed), len(through_triton), launched[-1]) == (15, 5, 32)


def test_launch_key_holds_no_tensor(monkeypatch):
    """TunedKernel's launch key holds every tensor, of any type, positional or by name, as its
    dtype and 16-byte alignment (as Triton specializes it), never the tensor itself (a key would
    keep it alive); ints by value, other values with their type."""
    from types import SimpleNamespace
    from condconv_kernels.triton import _config
    monkeypatch.setattr(_config, "driver", SimpleNamespace(
        active=SimpleNamespace(get_current_device=lambda: 0)))

    class Sub(torch.Tensor):
        pass
    base = torch.randn(8)
    sub, param = base.as_subclass(Sub), torch.nn.Parameter(torch.randn(8))
    odd = torch.randn(9)[1:]  # 4 bytes past an aligned address
    keys = [_config.TunedKernel.launch_key((t, 3, True, 2.5), dict(grid=None, G=t, E=8))
            for t in (base, sub, param, odd)]
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert keys[0][:4] == ((torch.float32, True), 3, (bool, True), (float, 2.5))
    assert keys[3][0] == (torch.float32, False) and ("G", (torch.float32, False)) in keys[3]

    def tensors(part):
        return isinstance(part, torch.Tensor) or (
            isinstance(part, tuple) and any(tensors(p) for p in part))
    assert not any(tensors(part) for key in keys for part in key)


def test_dense_configurations_follow_the_batch_and_fit(monkeypatch):
    """The dense forward / grad_x tables: blocks of examples larger than the batch's bucket are
    pruned (batch 1 keeps single-example programs), as are blocks whose mixed tiles and routing
    weights would not fit in registers (by the element size and the experts), and pipeline
    stages are lowered until the tiles fit in shared memory, for the tuner and for the fixed
    launch alike (float64 tiles are four times bfloat16's); the kernel gradient keeps the tiles
    whose experts fit in registers, and its pixel tiles past 64 only where an example has more
    pixels."""
    import triton
    from condconv_kernels.triton import _config
    table = [triton.Config(b, num_warps=w, num_stages=s)
             for b, w, s in _config._table(_config.DENSE_TILES)]
    bf16, f64 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float64)
    one = _config._prune_examples(table, {"B_KEY": 1, "x_ptr": bf16}, E=8)
    assert one and {c.kwargs["BLOCK_B"] for c in one} == {1}
    two = _config._prune_examples(table, {"B_KEY": 2, "g_ptr": bf16}, E=8)
    assert {c.kwargs["BLOCK_B"] for c in two} == {1, 2}
    assert len(_config._prune_examples(table, {"B_KEY": 256, "x_ptr": bf16}, E=8)) == len(table)
    # Blocks of examples whose mixed tiles and routing weights fit a thread's registers: a
    # thread's float32 values, counted by hand, against 72 for 16-bit elements and 48 for
    # wider ones, two thirds of that past 8 experts (the 3-example block in 4 warps holds 72
    # at 8 experts: 16-bit only; two examples of 64 x 64 in 4 warps: not at 16 experts)
    f32 = torch.empty(1, dtype=torch.float32)

    def values(c, experts):
        b = c.kwargs["BLOCK_B"]
        return b * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] / (32 * c.num_warps) + min(
            b * experts, 32)
    for x, experts, budget in ((bf16, 8, 72), (f32, 8, 48), (bf16, 16, 48), (f32, 16, 32)):
        kept = _config._prune_examples(table, {"B_KEY": 256, "x_ptr": x}, E=experts)
        assert [tuple(c.kwargs.values()) for c in kept] == [
            tuple(c.kwargs.values()) for c in table
            if c.kwargs["BLOCK_B"] == 1 or values(c, experts) <= budget], (x.dtype, experts)
    named = {(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps): c
             for c in table}
    assert values(named[3, 64, 64, 4], 8) == 72 and values(named[2, 64, 64, 4], 16) == 64
    assert len(_config._prune_examples(table, {"B_KEY": 256, "x_ptr": f32}, E=8)) < len(table)
    for c in _config._prune_examples(table, {"B_KEY": 256, "x_ptr": f64}, E=8):
        fits = _config.dense_shared_bytes(c.kwargs, c.num_stages, 8, 8) <= _config.SHARED_LIMIT
        assert fits or c.num_stages == 1
    stages = {tuple(c.kwargs.values()): c.num_stages for c in table}
    assert any(c.num_stages < stages[tuple(c.kwargs.values())] for c in
               _config._prune_examples(table, {"B_KEY": 256, "x_ptr": f64}, E=8))
    # The kernel gradient: every expert's tile of gradients and of W must fit in registers.
    import triton.language as tl
    kgrad = [triton.Config(b, num_warps=w, num_stages=s)
             for b, w, s in _config._table(_config.KGRAD_TILES)]
    f32 = torch.empty(1, dtype=torch.float32)
    kept32 = _config._prune_kernel_grad(kgrad, {"x_ptr": f32}, E_POW2=8, ACC=tl.float32)
    assert kept32 and all(_config.kgrad_bytes(c.kwargs, 8, 4, 4) / c.num_warps <=
                          _config.KGRAD_WARP_BYTES for c in kept32)
    assert len(_config._prune_kernel_grad(kgrad, {"x_ptr": bf16}, E_POW2=8,
                                          ACC=tl.float32)) > len(kept32)
    # Pixel tiles past 64 only where an example has more pixels (KEY_L, a bucket).
    widest = max(c.kwargs["BLOCK_P"] for c in kgrad)
    assert widest > 64
    for pixels, kept in ((64, False), (256, True)):
        tiles = {c.kwargs["BLOCK_P"] for c in _config._prune_kernel_grad(
            kgrad, {"x_ptr": bf16, "KEY_L": pixels}, E_POW2=8, ACC=tl.float32)}
        assert (widest in tiles) == kept and 64 in tiles, (pixels, tiles)
    monkeypatch.setattr(_config, "INTERPRET", False)
    monkeypatch.setattr(_config, "AUTOTUNE", False)
    fixed = _config.fixed_blocks(_config.KGRAD_TILES, 8, 8, 8)  # float64: nothing fits, the
    lightest = min(_config.kgrad_bytes(b, 8, 8, 8) / w  # lightest configuration is taken
                   for b, w, _ in _config._table(_config.KGRAD_TILES))
    assert _config.kgrad_bytes(fixed, 8, 8, 8) / fixed["num_warps"] == lightest
    dw = _config._table(_config.DW_KGRAD_TILES)[0]  # no expert tiles in registers: the first
    assert _config.fixed_blocks(_config.DW_KGRAD_TILES) == {
        **dw[0], "num_warps": dw[1], "num_stages": dw[2]}
    assert _config.fixed_blocks(_config.KGRAD_TILES, 8, 2, 4)["BLOCK_CO"] == \
        _config._table(_config.KGRAD_TILES)[0][0]["BLOCK_CO"]
    first = _config._table(_config.DENSE_TILES)[0]
    assert _config.fixed_blocks(_config.DENSE_TILES, 8, 2)["num_stages"] == first[2]
    staged = _config.fixed_blocks(_config.DENSE_TILES, 8, 8)
    assert staged["num_stages"] < first[2]
    assert _config.dense_shared_bytes(staged, staged["num_stages"], 8, 8) <= \
        _config.SHARED_LIMIT or staged["num_stages"] == 1


def test_forced_configuration(monkeypatch):
    """CONDCONV_TRITON_CONFIG=i launches the i-th configuration of each table (modulo its
    length) without autotuning, as bench/warm_triton.py needs; other values are refused."""
    import importlib
    from condconv_kernels import _env
    from condconv_kernels.triton import _config

    def reload():
        importlib.reload(_env)
        importlib.reload(_config)
    try:
        monkeypatch.setenv("CONDCONV_TRITON_CONFIG", "3")
        reload()
        assert not _config.AUTOTUNE and _config.FORCED_CONFIG == 3
        monkeypatch.setattr(_config, "INTERPRET", False)
        dw = _config._table(_config.DW_TILES)[3]
        assert _config.fixed_blocks(_config.DW_TILES) == {
            **dw[0], "num_warps": dw[1], "num_stages": dw[2]}
        monkeypatch.setenv("CONDCONV_TRITON_CONFIG", "9")
        reload()
        monkeypatch.setattr(_config, "INTERPRET", False)
        dense = _config._table(_config.DENSE_TILES)
        forced = _config.fixed_blocks(_config.DENSE_TILES, 8, 2)
        blocks, warps, _ = dense[9 % len(dense)]
        assert dense[0][0] != blocks  # (a different entry from the first)
        assert {k: forced[k] for k in blocks} == blocks and forced["num_warps"] == warps
        monkeypatch.setenv("CONDCONV_TRITON_CONFIG", "first")
        with pytest.raises(ValueError, match="CONDCONV_TRITON_CONFIG"):
            reload()
    finally:
        monkeypatch.undo()
        reload()


@pytest.mark.parametrize("examples", [2, 4, 6, 8])
def test_a_block_of_examples_past_the_batch(examples, monkeypatch):
    """Blocks of 2 (the interpreter's), 4, 6 and 8 examples a program (the tuples of tiles and
    accumulators of the dense forward and grad_x), in batches that do not fill the last block
    (5 = 2 + 2 + 1, 7 = 4 + 3, 9 = 6 + 3, 11 = 8 + 3), on the 1x1 fast path (8 experts: past 4
    examples the further ones' routing weights are reloaded in every K block, HELD_ROUTING)
    and the general one, forward and all gradients."""
    from condconv_kernels.triton import _config, dense
    monkeypatch.setattr(_config, "INTERPRET_EXAMPLES", examples)
    for name, layout, more in [("k1", "channels_last", {"E": 8, "cin": 20}),  # 2 K blocks
                               ("k3_s2_asym", "contiguous", {})]:
        case = CASES_BY_NAME[name]
        case = type(case)(**{**case.__dict__, "B": examples + 3, **more})
        assert (examples * case.E > dense.HELD_ROUTING.value) == (examples > 4 and name == "k1")
        test_op._check(case, "triton", torch.float64, layout)


def test_autotuned_kernel_gradients_start_from_zero(monkeypatch):
    """The dense kernel gradient writes only as many rows of the scales' partial sums (qc and
    qk) as its tile size gives, and they are summed whole: the autotuner must zero them before
    each trial and before the real launch, or the trials' sums leak into the first gradient of
    every new shape. grad_routing's partial sums (part) are summed over the rows the launched
    configuration wrote only (test_kernel_gradient_sums), and the other outputs are stored
    whole (gw: every program its tile for its batch slice; the depthwise kernel gradient every
    element of its G): no reset."""
    import importlib
    from condconv_kernels.triton import _config, dense, depthwise
    monkeypatch.setattr(_config, "INTERPRET", False)
    monkeypatch.setattr(_config, "AUTOTUNE", True)
    try:
        importlib.reload(dense)
        importlib.reload(depthwise)
        assert sorted(dense.dense_bwd_w_kernel.reset_to_zero) == ["qc_ptr", "qk_ptr"]
        for kernel in (dense.dense_fwd_kernel, dense.dense_bwd_x_kernel, depthwise.dw_fwd_kernel,
                       depthwise.dw_bwd_x_kernel, depthwise.dw_bwd_w_kernel):
            assert kernel.reset_to_zero == []
        # The flags that change a launch's registers are in its tuning key: a configuration
        # tuned without the scales (or the kernel gradient's halves) is not reused with them.
        for kernel in (dense.dense_fwd_kernel, dense.dense_bwd_x_kernel, dense.dense_bwd_w_kernel,
                       depthwise.dw_fwd_kernel, depthwise.dw_bwd_x_kernel):
            assert set(_config.SCALE_FLAGS) <= set(kernel.keys), kernel.keys
        assert {"NEED_W", "NEED_R", "SCALE_GRADS", "POINTWISE"} <= set(
            dense.dense_bwd_w_kernel.keys)
        for kernel in (dense.dense_fwd_kernel, dense.dense_bwd_x_kernel,
                       dense.dense_bwd_w_kernel):
            assert "TAP_MAJOR" in kernel.keys  # the reduction order ranks the tiles anew
        # depthwise grad_x's strides are compile-time constants: a stride-2 layer's code differs
        assert {"STRIDE_H", "STRIDE_W"} <= set(depthwise.dw_bwd_x_kernel.keys)
        # the depthwise tables are pruned by layout (blocks of examples where channels_last):
        # the channel stride it reads is in the key
        assert "s_xc" in depthwise.dw_fwd_kernel.keys and "s_gc" in depthwise.dw_bwd_x_kernel.keys
    finally:
        monkeypatch.undo()
        importlib.reload(dense)
        importlib.reload(depthwise)


def test_kernel_gradient_partials_fit_the_smallest_tiles(monkeypatch):
    """The dense kernel gradient's partial sums of grad_routing have a row per tile of W at the
    smallest tiles of its table (16 x 16): 24 output channels in 16-channel tiles take 2 rows
    a group, and a tile smaller than any in the table is refused before it writes past them."""
    import condconv_kernels.triton as backend
    from condconv_kernels.triton import _config
    fixed = backend.fixed_blocks

    def tiles_of(channels):
        def blocks(shapes, *args, **kwargs):
            out = fixed(shapes, *args, **kwargs)
            return {**out, "BLOCK_CO": channels} if tuple(shapes) == _config.KGRAD_TILES else out
        return blocks
    case = CASES_BY_NAME["k3"]
    case = type(case)(**{**case.__dict__, "cout": 24, "B": 2})
    inputs = make_inputs(case, torch.float64)
    monkeypatch.setattr(backend, "fixed_blocks", tiles_of(16))
    test_op._check(case, "triton", torch.float64, "contiguous")
    monkeypatch.setattr(backend, "fixed_blocks", tiles_of(8))
    out, _ = run_op(case, inputs, "triton")
    with pytest.raises(RuntimeError, match="rows of partial sums"):
        run_op(case, inputs, "triton", torch.randn(out.shape, dtype=torch.float64))


@pytest.mark.parametrize("name,autocast", [("k3_s2_asym", False), ("dw3", False),
                                           ("k1", True)])
def test_eager_path_matches_the_op(name, autocast):
    """Plain eager calls skip the custom-op layer (an autograd.Function around the same
    computation): output and every gradient bitwise equal to the registered op's, autocast
    applied by the same rule (x and weight in float16, routing float32), and a running profiler
    still sees a ``condconv::condconv2d`` range."""
    case = CASES_BY_NAME[name]
    inputs = make_inputs(case, torch.float32, "channels_last", seed=11)
    grad_out = None

    def run(call):
        nonlocal grad_out
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
        x, routing, weight, bias = leaves
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = call(x, routing, weight, bias)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(
                out.dtype)
        wanted = [t for t in leaves if t is not None]
        return out, torch.autograd.grad(out, wanted, grad_out)

    pad = cc._args.resolve_padding(case.padding, inputs[0].shape[-2:], inputs[2].shape[-2:],
                                   cc._args.pair(case.stride, "stride", 1),
                                   cc._args.pair(case.dilation, "dilation", 1))
    conv = (list(cc._args.pair(case.stride, "stride", 1)), list(pad),
            list(cc._args.pair(case.dilation, "dilation", 1)), case.groups)
    with torch.profiler.profile() as prof:
        fast, fast_grads = run(lambda *t: cc.condconv2d(*t, case.stride, case.padding,
                                                        case.dilation, case.groups,
                                                        backend="triton"))
    assert "condconv::condconv2d" in {e.name for e in prof.events()}
    assert type(fast.grad_fn).__name__ == "_EagerCondConv2dBackward"
    slow, slow_grads = run(lambda *t: torch.ops.condconv.condconv2d(*t, *conv, "triton"))
    assert fast.dtype == slow.dtype == (torch.float16 if autocast else torch.float32)
    assert torch.equal(fast, slow)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert len(fast_grads) == len(slow_grads)
    for a, b in zip(fast_grads, slow_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("case,layout", [
    (Case("dw3_nchw", cin=6, cout=6, groups=6), "contiguous"),
    # dilation 2, a channel multiplier of 2, the rows shifted unevenly (3 left, 1 right: the
    # output as wide as x) and the columns cut (0 top, 1 bottom: fewer output rows than x's)
    (Case("dw3_d2_mult2", cin=4, cout=8, groups=4, dilation=(2, 2), padding=(0, 1, 3, 1),
          H=9, W=11), "contiguous"),
    (Case("dw5_b1", B=1, cin=5, cout=5, groups=5, kernel=(5, 5), padding=2, E=8),
     "contiguous"),
    (Case("dw3_s2", cin=6, cout=6, groups=6, stride=(2, 2)), "contiguous"),
    (Case("dw3_cl", cin=6, cout=6, groups=6), "channels_last"),
    (Case("dw5_s2_cl", cin=6, cout=6, groups=6, kernel=(5, 5), padding=2, stride=(2, 2), H=9,
          W=11), "channels_last"),
], ids=lambda v: str(v))
def test_depthwise_kernels_across_layouts(case, layout):
    """The depthwise kernels (groups of output or input columns, each input or grad_out column
    loaded once a row of taps) through dilation, a channel multiplier, uneven padding, stride
    2, a batch of one and 5x5 taps, in NCHW and channels_last: every gradient against the
    reference in float64."""
    test_op._check(case, "triton", torch.float64, layout)


@pytest.mark.parametrize("examples", [1, 3])
def test_depthwise_kernels_at_other_example_blocks(monkeypatch, examples):
    """The depthwise forward and grad_x with one example a program (their code without the
    examples' loop) and with the 3 examples of the batch in one program (the other tests: 2, a
    block and a part-filled one), at a channel multiplier of 2 and dilation 2: every gradient
    against the reference in float64."""
    from condconv_kernels.triton import _config
    monkeypatch.setattr(_config, "INTERPRET_EXAMPLES", examples)
    assert _config.fixed_blocks(_config.DW_TILES)["EXAMPLES"] == examples
    test_op._check(Case("dw3_d2_mult2", cin=4, cout=8, groups=4, dilation=(2, 2),
                        padding=(0, 1, 3, 1), H=9, W=11), "triton", torch.float64, "contiguous")


@pytest.mark.parametrize("stride,width,column", [(2, 10, 9), (1, 8, 7)])
def test_depthwise_kernel_gradient_with_non_finite_input(stride, width, column):
    """The depthwise kernel gradient's groups of output columns (3 under the interpreter) run
    past a row's end (4 and 6 output columns, 3x3 taps, no padding): the part past it has
    grad_out zeros, and x's columns only it would read are not loaded. A NaN in a column the
    convolution never reads (stride 2: column 9 of 10) leaves every gradient finite and equal
    to the reference's; an infinity in a column it reads (stride 1: the last) makes grad_weight
    non-finite in that channel only, where the reference is non-finite too (the part past the
    row's end may add 0 x inf to its other taps), and every other channel equal."""
    import condconv_kernels.triton as backend
    g = torch.Generator().manual_seed(7)
    B, C, E = 2, 3, 4
    x = torch.randn(B, C, 5, width, generator=g, dtype=torch.float64)
    x[1, 1, :, column] = float("nan") if stride == 2 else float("inf")
    routing = torch.rand(B, E, generator=g, dtype=torch.float64)
    weight = torch.randn(E, C, 1, 3, 3, generator=g, dtype=torch.float64)
    conv = ((stride, stride), (0, 0, 0, 0), (1, 1), C)
    leaves = [t.clone().requires_grad_(True) for t in (x, routing, weight)]
    out = reference.condconv2d_loop(*leaves, None, *conv)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad_out)
    _, _, gw, *_ = backend.backward(grad_out, x, routing, weight, None, *conv,
                                    (False, False, True, False))
    want = leaves[2].grad
    if stride == 2:
        assert want.isfinite().all() and gw.isfinite().all()
        torch.testing.assert_close(gw, want)
    else:
        bad = ~want.isfinite()
        assert bad[:, 1].any() and not bad[:, [0, 2]].any()
        assert (~gw.isfinite())[:, [0, 2]].sum() == 0 and (bad <= ~gw.isfinite()).all()
        torch.testing.assert_close(gw[:, [0, 2]], want[:, [0, 2]])


def test_kernel_gradient_over_several_chunks():
    """The dense kernel gradient sums its pixels in chunks of 64 blocks (the interpreter's 16
    pixels: 1024), added on CUDA cores: 40 x 40 = 1600 pixels take two, the second partial."""
    case = CASES_BY_NAME["k1"]
    case = type(case)(**{**case.__dict__, "H": 40, "W": 40, "B": 1})
    test_op._check(case, "triton", torch.float64, "channels_last")


@pytest.mark.parametrize("name", ["k3_s2_asym", "g2_k1"])
def test_kernel_gradient_of_one_tile_examples(name):
    """The dense kernel gradient where an example's output pixels fit one tile (the
    interpreter's 16: a 4 x 4 output here; 7 x 7 layers on the GPU): its loop over the
    examples is the innermost, without the chunked loops over pixels. With scales too."""
    from condconv_kernels.triton._config import INTERPRET_BLOCK, bucket
    case = CASES_BY_NAME[name]
    case = type(case)(**{**case.__dict__, "H": 8 if case.stride[0] == 2 else 4, "W": 4 if
                         case.stride[0] == 1 else 7, "B": 5})
    x, _, weight, _ = make_inputs(case, torch.float64)
    padding = cc._args.resolve_padding(case.padding, x.shape[2:], weight.shape[3:], case.stride,
                                       case.dilation)
    ho, wo = cc._args.out_shape(x.shape, weight.shape, case.stride, padding, case.dilation)[2:]
    assert bucket(ho * wo) <= INTERPRET_BLOCK
    test_op._check(case, "triton", torch.float64, "channels_last")
    test_op._check(case, "triton", torch.float64, "contiguous")


def test_eager_path_parameters_and_no_double_backward():
    """Parameters take the eager path too, and its backward refuses to be differentiated (as
    the op's backward has no formula) instead of returning partly attached gradients."""
    case = CASES_BY_NAME["dw3"]
    x, routing, weight, bias = make_inputs(case, torch.float64, seed=2)
    weight = torch.nn.Parameter(weight)
    x.requires_grad_(True)
    routing.requires_grad_(True)
    out = cc.condconv2d(x, routing, weight, bias, case.stride, case.padding, case.dilation,
                        case.groups, backend="triton")
    assert type(out.grad_fn).__name__ == "_EagerCondConv2dBackward"
    (gw,) = torch.autograd.grad(out.sum(), [weight], create_graph=True)
    assert not gw.requires_grad  # no graph to differentiate (it would reach routing only)
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad((gw ** 2).sum(), [x, routing])


def test_eager_path_checks_a_signature_once(monkeypatch):
    """The eager path checks a call's tensors once per signature (shapes, strides, dtypes,
    devices, alignment, and the other arguments): the same call again skips the check and
    gives the same result; a call that differs in any of them is checked (a bad one raises as
    before), and the memo holds no tensor."""
    from condconv_kernels import _args, ops
    case = CASES_BY_NAME["k3"]
    x, routing, weight, bias = make_inputs(case, torch.float64, seed=3)
    monkeypatch.setattr(ops, "_CHECKED", {})
    checks = []
    check = _args.check_tensors
    monkeypatch.setattr(_args, "check_tensors", lambda *a: checks.append(1) or check(*a))

    def call(x=x, routing=routing, weight=weight, bias=bias, stride=case.stride):
        with torch.no_grad():
            return cc.condconv2d(x, routing, weight, bias, stride, case.padding, case.dilation,
                                 case.groups, backend="triton")
    first = call()
    second = call()
    assert len(checks) == 1 and torch.equal(first, second)
    leaf = weight.clone().requires_grad_(True)  # the differentiable route memoizes too
    call(weight=leaf)
    assert len(checks) == 1
    call(x=x.contiguous(memory_format=torch.channels_last))  # strides
    call(x=x.float(), routing=routing.float(), weight=weight.float(), bias=bias.float())
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x)
    call(x=shifted)  # 8 bytes off 16-byte alignment
    call(stride=(1, 2))
    assert len(checks) == 5
    with pytest.raises(TypeError, match="'weight'"):
        call(weight=weight.float())
    for key, value in ops._CHECKED.items():
        assert not any(isinstance(v, torch.Tensor) for part in (key, value) for v in part)


def test_grids_are_flat_and_bounded():
    """Every launch is a 1-D grid (CUDA's y and z axes hold at most 65535 programs, fewer than a
    large batch needs); past 2**31 - 1 programs a call raises naming x."""
    from condconv_kernels.triton._grid import flat_grid
    assert flat_grid(3, 70000, 2) == (420000,)
    with pytest.raises(ValueError, match="'x'"):
        flat_grid(2 ** 16, 2 ** 16)


def test_kernel_gradient_slices_keep_32_bit_loops(monkeypatch):
    """The dense kernel gradient's batch slices (8 on the GPU, at most one per example) give
    each program fewer than 2**31 iterations over (example, tile of pixels), an example's
    tiles being at most CHAIN (longer examples are walked in nested loops, one iteration
    each)."""
    import condconv_kernels.triton as backend
    from condconv_kernels.triton._grid import cdiv
    monkeypatch.setattr(backend, "INTERPRET", False)
    smallest_p, chain = backend._KGRAD_SMALLEST[2], backend.CHAIN.value
    assert (backend._splits(256, 49), backend._splits(5, 49), backend._splits(1, 10 ** 6)) == (
        8, 5, 1)
    for B, pixels in ((2 ** 30, 196), (2 ** 30, 1024), (2 ** 31 - 1, 3136), (3, 2 ** 31)):
        S = backend._splits(B, pixels)
        assert 8 <= S <= B or S == B
        assert cdiv(B, S) * min(cdiv(pixels, smallest_p), chain) < 2 ** 31, (B, pixels, S)
    assert backend._splits(2 ** 30, 1024) > 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tap_major", [False, True])
def test_kernel_gradient_sums(dtype, tap_major):
    """The kernel gradient's sum kernel (one launch): grad_weight, the sum of S slices of gw,
    in weight's dtype and order (gw's K in (tap, channel) order where tap_major), and
    grad_routing, the sum of part's first `tiles` rows only (the rows past them hold NaN here,
    as the unwritten rows of an unfilled buffer may); against torch's sums, each half alone
    too."""
    import condconv_kernels.triton as backend
    E, cout, cin_g, kh, kw, B, S, tiles = 3, 5, 6, 2, 3, 7, 4, 9
    weight = torch.randn(E, cout, cin_g, kh, kw).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gw = torch.randn(S, E, weight[0].numel(), dtype=acc)
    part = torch.randn(tiles + 5, B, E, dtype=acc)
    part[tiles:] = float("nan")
    g = gw.sum(0)
    if tap_major:
        g = g.view(E, cout, kh, kw, cin_g).permute(0, 1, 4, 2, 3)
    want_w = g.reshape(weight.shape).to(dtype)
    want_r = part[:tiles].sum(0)
    for need_w, need_r in ((True, True), (True, False), (False, True)):
        grad_w, grad_r = backend._sum_kernel_grads(gw, part, tiles, weight, B, tap_major,
                                                   need_w, need_r)
        assert (grad_w is None) != need_w and (grad_r is None) != need_r
        if need_w:
            assert grad_w.dtype == dtype and grad_w.shape == weight.shape
            assert grad_w.is_contiguous()
            tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else {}
            torch.testing.assert_close(grad_w, want_w, **tol)
        if need_r:
            assert grad_r.dtype == acc
            torch.testing.assert_close(grad_r, want_r)


def test_stand_in_is_an_ordinary_tensor(monkeypatch):
    """The kernel gradient's shared stand-in for unused outputs, first made under inference
    mode, is still an ordinary tensor: the autotuner zeroes it (reset_to_zero) in later calls
    outside that mode, which an inference tensor refuses."""
    import condconv_kernels.triton as backend
    monkeypatch.setattr(backend, "_STAND_INS", {})
    with torch.inference_mode():
        t = backend._stand_in(torch.float32, torch.device("cpu"))
    assert not t.is_inference() and t.shape == (1,)
    t.zero_()
    assert backend._stand_in(torch.float32, torch.device("cpu")) is t


@pytest.mark.parametrize("name", ["k3_s2_asym", "g2_s2_e8_b1", "k5_d2_s2_asym", "k1x3_rect"])
def test_dense_tap_major_reduction(name, monkeypatch):
    """The dense forward and grad_x over (tap, channel), with the experts reordered: taken for
    channels_last inputs of kernels with several taps (from TAP_MAJOR_MIN_BATCH examples, 1
    here), never for NCHW; likewise the kernel gradient's tiles (whatever the batch: it reads
    W and writes its gradients in their own order); every output and gradient against the
    reference in float64, each launch's flag recorded. One case with the three per-example
    scales (their in and tap indices, and the kernel gradient's partial sums for their
    gradients, come from the reordered reduction index)."""
    import condconv_kernels.triton as backend
    monkeypatch.setattr(backend, "TAP_MAJOR_MIN_BATCH", 1)
    seen = []
    kernels = ("dense_bwd_w_kernel", "dense_bwd_x_kernel", "dense_fwd_kernel")
    for kernel_name in kernels:
        def spy(kernel=getattr(backend, kernel_name), kernel_name=kernel_name):
            class Spy:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        seen.append((kernel_name, kwargs["TAP_MAJOR"]))
                        return kernel[grid](*args, **kwargs)
                    return launch
            return Spy()
        monkeypatch.setattr(backend, kernel_name, spy())
    case = CASES_BY_NAME[name]
    for layout, want in (("channels_last", True), ("contiguous", False)):
        seen.clear()
        test_op._check(case, "triton", torch.float64, layout)
        assert sorted(seen) == [(k, want) for k in kernels], seen
    if name == "k3_s2_asym":
        import test_scales
        seen.clear()
        test_scales._check(case, "triton", torch.float64, "channels_last",
                           test_scales.SUBSETS["all"], grad_layout="channels_last")
        assert set(seen) == {(k, True) for k in kernels}, seen


@pytest.mark.parametrize("case", [
    # stride 3, dilation 2 (taps 3 apart in a phase: 1 or 2 of the 5 rows), sizes that the
    # strides do not divide, asymmetric padding, a rectangular kernel
    Case("k5x3_s3x2_d2x1", B=2, cin=4, cout=5, H=11, W=9, kernel=(5, 3), stride=(3, 2),
         dilation=(2, 1), padding=(3, 1, 1, 2), E=3),
    # stride 2 with dilation 2: half the phases reached by no tap (their gradient is 0)
    Case("k3_s2_d2_g2", B=2, cin=4, cout=6, H=9, W=8, kernel=(3, 3), stride=(2, 2),
         dilation=(2, 2), padding=(2, 2, 1, 2), groups=2, E=2),
    # 1x1 at stride 2: three phases of four untouched
    Case("k1_s2_pad", B=2, cin=3, cout=5, H=7, W=6, kernel=(1, 1), stride=(2, 2),
         padding=(1, 0, 0, 1), E=2, bias=False),
    # strides past the plane (padding keeps them useful): phases only for its rows and columns
    Case("k3_s6x5_wide_pad", B=2, cin=4, cout=3, H=3, W=2, kernel=(3, 3), stride=(6, 5),
         padding=(4, 4, 3, 3), E=2),
], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dense_grad_x_by_phase(case, layout, monkeypatch):
    """The dense grad_x at a stride above 1 runs phase by phase (dense_bwd_x_kernel's PHASES:
    each program's input pixels of one phase, its reduction over the taps that reach that
    phase only), in both reduction orders; every gradient against the reference in float64."""
    import condconv_kernels.triton as backend
    monkeypatch.setattr(backend, "TAP_MAJOR_MIN_BATCH", 1)
    seen = []
    kernel = backend.dense_bwd_x_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["PHASES"])
                # at most a program a pixel, example and channel for the smallest tiles
                smallest = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_B=1)
                assert grid(smallest)[0] <= case.B * case.H * case.W * case.cin, grid(smallest)
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(backend, "dense_bwd_x_kernel", Spy())
    test_op._check(case, "triton", torch.float64, layout)
    assert seen == [True]


def test_tf32_follows_either_of_pytorchs_precision_settings():
    """Whether float32 products may use TF32 (the triton backend's tl.dot precision and its
    replay key): PyTorch's convolution precision, set through the legacy flag or the newer
    ``fp32_precision`` API, after which reading the legacy flag raises; neither raises here."""
    from condconv_kernels._epilogue import conv_tf32
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None:
        pytest.skip("this PyTorch has no per-operator fp32_precision setting (before 2.9)")
    was = conv.fp32_precision
    try:
        torch.backends.cudnn.allow_tf32 = False
        assert conv_tf32() is False
        torch.backends.cudnn.allow_tf32 = True
        assert conv_tf32() is True
        conv.fp32_precision = "ieee"
        with pytest.raises(RuntimeError):
            torch.backends.cudnn.allow_tf32  # (mixing the two APIs) noqa: B018
        assert conv_tf32() is False
        conv.fp32_precision = "tf32"
        assert conv_tf32() is True
    finally:
        conv.fp32_precision = was
