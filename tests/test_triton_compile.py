"""The Triton kernels compile for sm_90 (H100 / H200) and fit its shared memory. Compiled ahead
of time, which needs no GPU, by condconv_kernels.triton.compile_check in its own process (the
interpreter that the other tests use patches the compiler)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "condconv_kernels.triton.compile_check", "--arch", "90", "--quick"],
        env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "all variants compiled and fit" in result.stdout
    assert "FAILED" not in result.stdout


def test_static_report_of_a_pointwise_layer(tmp_path):
    """condconv_kernels.triton.report on the first two layers of tf_efficientnet_cc_b0_8e
    (1x1, 80 -> 480 at 14x14, and the 5x5 depthwise after it; batch 256, bfloat16,
    channels_last): one record per kernel with the documented keys; the dense forward and
    grad_x run on wgmma, pipeline their loads with asynchronous copies and do not spill; the
    model's numbers are consistent, the depthwise kernels' issue time and latency term among
    them (the latency term by its formula, rows of taps waited for or pipelined)."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "condconv_kernels.triton.report", "--first", "2", "--json",
         str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = {r["kernel"]: r for r in json.loads(path.read_text())}
    assert set(records) == {"dense_fwd", "dense_bwd_x", "dense_bwd_w", "dense_kgrad_sum",
                            "dw_fwd", "dw_bwd_x", "dw_bwd_w"}
    # The kernel gradient's sum kernel: its 8 batch slices of float32 gradients (8 experts of
    # 480 x 80) and the partial sums at the smallest tiles' rows (30 x 5 tiles of 16 x 16, of
    # 256 x 8) read once, the bfloat16 gradient and grad_routing written once: bandwidth-bound
    experts = 8 * 480 * 80
    sums = records.pop("dense_kgrad_sum")
    assert sums["hbm_bytes"] == 8 * experts * 4 + 150 * 256 * 8 * 4 + experts * 2 + 256 * 8 * 4
    assert sums["modeled_us"] == pytest.approx(sums["floor_us"]) and sums["spill_bytes"] == 0
    assert sums["tensor_core"] == "none" and sums["grid"] == experts // 1024 + 2048 // 128
    dw = {name: records.pop(name) for name in ("dw_fwd", "dw_bwd_x", "dw_bwd_w")}
    for r in dw.values():  # the issue time is one of the modeled time's terms
        assert r["spill_bytes"] == 0 and r["modeled_us"] >= r["issue_us"] > 0, r
        assert r["modeled_us"] >= r["floor_us"], r
    from condconv_kernels.triton import report
    for name, r in dw.items():
        # The modeled time: the largest of the traffic and issue terms and the latency term
        rest = report.modeled_us(r["hbm_bytes"], r["l2_bytes"], r["tc_flops"], r["cc_flops"],
                                 r["grid"], r["tensor_core"], False, r["issue_us"])
        assert r["modeled_us"] == pytest.approx(max(rest, r["latency_us"])), r
        blocks = [int(v) for v in r["config"].split()[0].split("x")]
        if name == "dw_bwd_w":  # (BLOCK_C, BLOCK_L, COLS): blocks of the 14 x 14 pixels
            cycles = -(-14 * -(-14 // blocks[2]) // blocks[1]) * report.DW_KGRAD_BLOCK_CYCLES
        else:  # (BLOCK_C, BLOCK_Q, COLS, EXAMPLES, ROW_STAGES): 5 rows of taps an example,
            # each waited for, or copied rows ahead
            examples = 256 / -(-256 // blocks[3])
            row = report.DW_ROW_CYCLES if blocks[4] == 1 else report.DW_PIPELINED_ROW_CYCLES
            cycles = report.DW_PROGRAM_CYCLES + examples * 5 * row
        waves = -(-r["grid"] // (132 * report.resident(r["registers"], int(
            r["config"].split()[1][1:]), r["shared_bytes"])))
        assert r["latency_us"] == pytest.approx(1e6 * waves * cycles / report.CLOCK), r
    keys = {"layer", "kernel", "registers", "spill_bytes", "shared_bytes", "tensor_core",
            "async_copy", "hbm_bytes", "l2_bytes", "floor_us", "modeled_us"}
    for r in records.values():
        assert keys <= set(r), r
        assert r["modeled_us"] >= r["floor_us"] > 0 and r["l2_bytes"] > 0
    for name in ("dense_fwd", "dense_bwd_x"):
        r = records[name]
        assert r["tensor_core"] == "wgmma" and r["async_copy"] != "none", r
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255, r
    for r in records.values():  # the main loop read from the machine code: its products and
        # copies are in it; the issue floor is its instructions over 4 schedulers
        assert r["loop_mma"] >= 1 and r["loop_async_copies"] >= 1, r
        assert r["loop_full_waits"] == 0, r  # pipelined: no wait for the copies just issued
        assert r["loop_instructions"] > r["loop_barriers"] + r["loop_mma"], r
        assert r["loop_issue_cycles"] >= r["loop_instructions"], r  # (4 or 8 warps)
        assert r["modeled_us"] >= r["issue_us"] > 0, r  # the issue floor, one of its terms
    # The dense kernels' latency term, another: each program's examples one after another
    for r in records.values():
        assert r["modeled_us"] >= r["latency_us"] > 0, r
    fwd = records["dense_fwd"]
    steps = -(-80 // int(fwd["config"].split()[0].split("x")[3]))  # K = 80 in BLOCK_K blocks
    waves = -(-fwd["grid"] // (132 * report.resident(fwd["registers"], int(
        fwd["config"].split()[1][1:]), fwd["shared_bytes"])))
    assert fwd["latency_us"] == pytest.approx(
        1e6 * waves * steps * fwd["examples_per_program"] * report.DOT_CYCLES / report.CLOCK)

    def waves_of(r):
        return -(-r["grid"] // (132 * report.resident(r["registers"], int(
            r["config"].split()[1][1:]), r["shared_bytes"])))
    bwd_x = records["dense_bwd_x"]  # grad_x reduces over the 480 output channels
    blocks = [int(v) for v in bwd_x["config"].split()[0].split("x")]
    assert bwd_x["latency_us"] == pytest.approx(1e6 * waves_of(bwd_x) * -(-480 // blocks[3])
                                                * blocks[0] * report.DOT_CYCLES / report.CLOCK)
    kgrad = records["dense_bwd_w"]  # 256 examples in 8 slices, 196 pixels in tiles of BLOCK_P
    pixels = int(kgrad["config"].split()[0].split("x")[2])
    per_example = (-(-196 // pixels) * (report.KGRAD_TILE_CYCLES + report.KGRAD_PIXEL_CYCLES
                                        * pixels) + report.KGRAD_FOLD_CYCLES)
    assert kgrad["latency_us"] == pytest.approx(
        1e6 * waves_of(kgrad) * 32 * per_example / report.CLOCK)
    # The kernel gradient's fold of an example, after its last tile of 64 of the 196 pixels:
    # a conditional part of the loop, counted once an example
    assert 0 < records["dense_bwd_w"]["loop_skipped"] < records["dense_bwd_w"]["loop_instructions"]
    assert "| s5.b0.expand |" in result.stdout


def test_static_report_with_the_stationary_kernel(tmp_path):
    """--stationary with the experts-stationary kernel's passes on the same layer: the forward
    and the routing gradient from that kernel (compiled at its plan: wgmma, cp.async, no
    spills, its shared memory within sm_90's), grad_x and the weight half still the dense
    kernels; the stationary records' L2 traffic (each slab once a program) at most 4x their
    HBM bytes, and their modeled time at least their serial sum and their floor."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "condconv_kernels.triton.report", "--first", "1", "--stationary",
         "forward,grad_x,routing", "--json", str(path)], env=env, capture_output=True,
        text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = {r["kernel"]: r for r in json.loads(path.read_text())}
    assert set(records) == {"stationary_fwd", "dense_bwd_x", "stationary_routing",
                            "dense_bwd_w", "dense_kgrad_sum"}
    for name in ("stationary_fwd", "stationary_routing"):
        r = records[name]
        assert r["tensor_core"] == "wgmma" and r["async_copy"] == "cp.async", r
        assert r["spill_bytes"] == 0 and 0 < r["shared_bytes"] <= 227 * 1024, r
        assert r["l2_bytes"] <= 4 * r["hbm_bytes"] and r["smem_bytes"] > r["l2_bytes"], r
        assert r["modeled_us"] >= max(r["serial_us"], r["floor_us"]) > 0, r
        assert r["grid"] <= 132 and r["examples_per_program"] * r["grid"] >= 256 * 8, r
    assert "(CONDCONV_TRITON_STATIONARY=forward,grad_x,routing)" in result.stdout
    # Without its routing half the kernel gradient folds each example converting G's layout
    # through shared memory once (2-4 barriers an iteration; the routing half's conversions
    # and cross-warp sums cost it 11-14).
    assert records["dense_bwd_w"]["loop_barriers"] <= 4, records["dense_bwd_w"]


def test_static_report_with_the_kernel_gradient_in_the_accumulator_layout(tmp_path):
    """--stationary kernel_grad on the first layer (14x14): the kernel gradient from
    pointwise_grad.py (compiled at its plan: wgmma, cp.async, no spills, its planned shared
    memory), the forward and grad_x the dense kernels. Its fold stays in each thread's
    registers: an iteration's barriers are its copies' (at most 3), grad_routing's sums take 5
    rounds of shuffles an expert within each warp and no barrier of their own; tiles of 64 x 32
    in 8 warps; 8 batch slices of 32 examples; the modeled time at least the issue floor and
    the layer's floor. With every pass on (bare --stationary), the
    experts-stationary kernel computes grad_routing and this one the weight alone."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for passes in ("kernel_grad", None):
        path = tmp_path / "report.json"
        result = subprocess.run(
            [sys.executable, "-m", "condconv_kernels.triton.report", "--first", "1",
             "--stationary", *([passes] if passes else []), "--json", str(path)], env=env,
            capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        records = [r for r in json.loads(path.read_text()) if r["kernel"] == "pointwise_grad"]
        if passes is None:
            (r,) = records
            assert r["config"].endswith("(weight)") and r["loop_shuffles"] == 0, r
            assert "(experts-stationary kernel on)" in result.stdout
            continue
        assert "(CONDCONV_TRITON_STATIONARY=kernel_grad)" in result.stdout
        assert [r["layer"] for r in records] == ["s5.b0.expand"]
        for r in records:
            assert r["tensor_core"] == "wgmma" and r["async_copy"] == "cp.async", r
            assert r["spill_bytes"] == 0 and r["shared_bytes"] == 24576, r  # as planned
            assert r["config"] == "64x32x64 buf2 w8" and r["loop_barriers"] <= 3, r
            assert r["loop_shuffles"] == 5 * 8, r
            assert r["examples_per_program"] == 32 and r["grid"] % 8 == 0, r
            assert r["modeled_us"] >= max(r["issue_us"], r["floor_us"]) > 0, r


def test_static_report_with_the_mix_on_the_tensor_cores(tmp_path):
    """--stationary mix on a 7x7 expand layer (192 -> 1152): the forward from
    stationary_mix.py (compiled at its plan: wgmma, cp.async, no spills, its planned shared
    memory: the slab, three stages of x tiles, the mixed tiles), grad_x, whose K = 1152 is too
    wide for the slab, the dense kernel; the main loop (a block of 4 examples, the loop over
    its chunks of 16 channels inside) with no CUDA-core mix: 12 products a chunk, its copies
    issued ahead (no wait for a copy it issued); the modeled time at least its serial sum, issue time and floor,
    below the stationary kernel's CUDA-core mix on the same layer; L2 at most 4x HBM. An
    unknown layer name is an error naming it."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "report.json"
    records = {}
    for passes in ("mix", "forward"):
        result = subprocess.run(
            [sys.executable, "-m", "condconv_kernels.triton.report", "--layers", "s6.b1.expand",
             "--stationary", passes, "--json", str(path)], env=env, capture_output=True,
            text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        records.update({r["kernel"]: r for r in json.loads(path.read_text())})
    r = records["mix_fwd"]
    assert "dense_bwd_x" in records and "mix_bwd_x" not in records
    assert r["tensor_core"] == "wgmma" and r["async_copy"] == "cp.async", r
    assert r["spill_bytes"] == 0 and r["shared_bytes"] == 229632, r  # as planned
    assert r["config"] == "16x12x64 nb4 w4" and r["examples_per_program"] == 37, r
    assert r["loop_inner_instructions"] > 0, r  # the chunk loop inside the block loop
    assert r["loop_mma"] == 12 and r["loop_full_waits"] == 0, r
    assert r["l2_bytes"] <= 4 * r["hbm_bytes"], r
    assert r["modeled_us"] >= max(r["serial_us"], r["issue_us"], r["floor_us"]) > 0, r
    assert r["modeled_us"] < records["stationary_fwd"]["modeled_us"], records
    bad = subprocess.run(
        [sys.executable, "-m", "condconv_kernels.triton.report", "--layers", "s9.nothing"],
        env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown layer(s) s9.nothing" in bad.stderr


_DRY_RUN = """
import torch
from triton.runtime.autotuner import Autotuner
from condconv_kernels import triton as backend
from condconv_kernels.triton import _config, dense, dry_run

dry_run.install()
x = torch.randn(4, 16, 7, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
routing, weight = torch.rand(4, 8), torch.randn(8, 32, 16, 1, 1, dtype=torch.bfloat16)
conv = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
for _ in range(2):
    out = backend.forward(x, routing, weight, None, *conv)
through_triton = []
base_run = Autotuner.run
Autotuner.run = lambda self, *a, **k: through_triton.append(1) or base_run(self, *a, **k)
backend.forward(x, routing, weight, None, *conv)
kernel = dense.dense_fwd_kernel
print(isinstance(kernel, _config.TunedKernel), tuple(out.shape), dict(dry_run.LAUNCHES),
      len(kernel.cache), len(through_triton))
"""


_DRY_LAUNCHES = """
import os
import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction
from condconv_kernels import triton as backend
from condconv_kernels.triton import _config, _replay, dense, dry_run

dry_run.install()
launched = []
tuned_runs = []
base_tuned_run = _config.TunedKernel.run
_config.TunedKernel.run = lambda self, *a, **k: tuned_runs.append(1) or base_tuned_run(
    self, *a, **k)
def launcher(src, metadata):
    def launch(*args):
        launched.append((metadata.name, args))
    return launch
driver.active.launcher_cls = launcher
jit_runs = []
base_run = JITFunction.run
JITFunction.run = lambda self, *a, **k: jit_runs.append(1) or base_run(self, *a, **k)

def described(args):  # the launch metadata (index 6) is a fresh object a launch: its type
    return [(a.dtype, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor)
            else type(a) if i == 6 else a for i, a in enumerate(args)]

def layers(parameter):  # (kernel size, Cin, x, routing, weight, conv arguments, grad_out) of
    # a dense 1x1 and 3x3 and a depthwise 5x5 layer, bfloat16 channels_last; parameter: the
    # weight a Parameter, as a layer holds it (a tensor subclass)
    torch.manual_seed(0)
    for k, groups, cin, cout in ((1, 1, 16, 32), (3, 1, 16, 16), (5, 16, 16, 16)):
        x = torch.randn(5, cin, 7, 7, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        routing = torch.rand(5, 8)
        weight = torch.randn(8, cout, cin // groups, k, k, dtype=torch.bfloat16)
        if parameter:
            weight = torch.nn.Parameter(weight, requires_grad=False)
        conv = ([1, 1], [k // 2] * 4, [1, 1], groups)
        grad = torch.randn(5, cout, 7, 7, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        yield k, cin, x, routing, weight, conv, grad

"""


_DIRECT_LAUNCH = _DRY_LAUNCHES + """
for k, cin, x, routing, weight, conv, grad in layers(parameter=True):
    seen = []
    for _ in range(3):  # tunes; Triton's launch (the compiled kernel kept, the plans made); the
        # direct one, or the plans' replays
        launched.clear(), jit_runs.clear(), tuned_runs.clear()
        backend.forward(x, routing, weight, None, *conv)
        backend.backward(grad, x, routing, weight, None, *conv, (True, True, True, False))
        seen.append(([(name, described(args)) for name, args in launched], len(jit_runs),
                     len(tuned_runs)))
    (through_triton, runs, _), (direct, direct_runs, direct_tuned) = seen[1], seen[2]
    switched_off = os.environ.get("CONDCONV_TRITON_DIRECT_LAUNCH") == "0"
    assert runs > 0 and (direct_runs > 0 if switched_off else direct_runs == 0), (runs, direct_runs)
    assert direct == through_triton, (direct, through_triton)
    # the inputs themselves reach the launcher (not copies)
    assert any(a is x for _, args in launched for a in args)
    # x 2 bytes off 16-byte alignment: another specialization, through Triton again
    shifted = torch.empty(x.numel() + 8, dtype=x.dtype)[1:1 + x.numel()]
    shifted = shifted.view(5, 7, 7, cin).permute(0, 3, 1, 2).copy_(x)
    assert shifted.data_ptr() % 16 and shifted.stride() == x.stride()
    jit_runs.clear()
    backend.forward(shifted, routing, weight, None, *conv)
    assert jit_runs, "a launch key that ignores alignment"
    if k == 1:  # a replay sets the configuration it launched, as the tuned kernel's launch
        dense.dense_fwd_kernel.best_config = None
        backend.forward(x, routing, weight, None, *conv)
        assert dense.dense_fwd_kernel.best_config is not None
    if k == 1:  # Triton's debug switch (part of its options): Triton's launch again
        from triton import knobs
        knobs.runtime.debug = True
        jit_runs.clear()
        backend.forward(x, routing, weight, None, *conv)
        knobs.runtime.debug = False
        assert jit_runs, "a launch key that ignores Triton's debug switch"
    # Replayed (no TunedKernel.run): the forwards, the dense 1x1 layer's backward and the
    # depthwise one's (its products on the host after the replay); the 3x3 kernel gradient
    # reads the experts in tap-major order (a copy made in the call): its launchers run.
    replayed = len(direct) - direct_tuned
    print(k, len(direct), [name for name, _ in direct], replayed)
for plan in _replay.PLANS.values():  # a plan holds no tensor but the stand-ins
    for step in plan.steps:
        held = [a for a in step[4] if isinstance(a, torch.Tensor)]
        assert all(any(a is t for t in backend._STAND_INS.values()) for a in held), held
# One tensor in two roles (in_scale and out_scale here) keeps no plan: a later call of the
# same signature with two tensors would get the first one in both places
x = torch.randn(5, 16, 7, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
weight = torch.randn(8, 16, 16, 1, 1, dtype=torch.bfloat16)
scale = torch.rand(5, 16)
conv = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
for _ in range(3):
    backend.forward(x, routing, weight, None, *conv, scale, scale)
aliased = _replay.key("forward", (x, routing, weight, None, scale, scale, None), (1, 1),
                      (0, 0, 0, 0), (1, 1), 1)
assert aliased not in _replay.PLANS
# A plain kernel's launch (as the Gluon mix kernel's) kept from the compiled kernel it returned:
# the replay hands the launcher what Triton's launch did
raw = dense.dense_kgrad_sum_kernel.fn
gw, part = torch.randn(2, 8, 64), torch.randn(4, 5, 8)
dw, dr = torch.empty(8, 4, 16, 1, 1), torch.empty(5, 8)
args = (gw, part, dw, dr, 2, 512, 1, 4, 40, 16, 1)
kwargs = dict(NEED_W=True, NEED_R=True, TAP_MAJOR=False)
launched.clear()
compiled = raw[(3,)](*args, **kwargs)
first = [(name, described(a)) for name, a in launched]
_replay.keep(("plain",), [(raw, (3,), args, kwargs, compiled)], (gw, part), (dw, dr), (dw, dr))
if _config.DIRECT_LAUNCH:  # (else no plans)
    launched.clear()
    made = _replay.PLANS[("plain",)].run((gw, part))
    assert [(name, described(a)) for name, a in launched] == first and len(first) == 1
    assert [tuple(t.shape) for t in made] == [(8, 4, 16, 1, 1), (5, 8)]
else:
    assert ("plain",) not in _replay.PLANS
# The signature follows the switches a launch reads at run time
args = ((x, routing, weight), (1, 1))
before = _replay.key("forward", *args)
torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32
assert _replay.key("forward", *args) != before
torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32
assert _replay.key("forward", *args) == before
# ... set through PyTorch's newer precision API too (after which reading the legacy flag
# raises): the key reads the setting in force, as the launch does
if hasattr(torch.backends.cudnn, "conv"):  # (PyTorch 2.9 and later)
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert _replay.key("forward", *args) != before
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert _replay.key("forward", *args) == before
_config.FORCED_CONFIG, forced = 2, _config.FORCED_CONFIG  # (read by the launchers per call)
assert _replay.key("forward", *args) != before
_config.FORCED_CONFIG = forced
from condconv_kernels import _env
_env.TRITON_STATIONARY = frozenset({"mix"})
assert _replay.key("forward", *args) != before
"""


_PLAIN_REPLAY = _DRY_LAUNCHES + """
for k, cin, x, routing, weight, conv, grad in layers(parameter=False):
    seen = []
    for _ in range(2):  # Triton's launches (the plans kept); the plans' replays
        launched.clear(), jit_runs.clear()
        backend.forward(x, routing, weight, None, *conv)
        backend.backward(grad, x, routing, weight, None, *conv, (True, True, True, False))
        seen.append(([(name, described(args)) for name, args in launched], len(jit_runs)))
    assert seen[1][0] == seen[0][0], (seen[1][0], seen[0][0])
    print(k, len(seen[0][0]), seen[0][1], seen[1][1])
"""


_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   DEPBAR.LE SB0, 0x0 ;
        /*0028*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0030*/                   LDGDEPBAR ;
        /*0038*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8].tnspA, RZ ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   DEPBAR.LE SB0, 0x0 ;
        /*0058*/                   SHFL.BFLY PT, R5, R6, 0x1, 0x1f ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
        /*0070*/               @P2 BRA `(.L_x_3) ;
        /*0080*/                   STS [R3], R5 ;
        /*0090*/                   FADD R5, R5, R6 ;
.L_x_3:
        /*00a0*/                @P1 BRA `(.L_x_0) ;
        /*00b0*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2) ;
"""


def test_loops_read_from_machine_code():
    """condconv_kernels.triton.sass on a hand-written listing: two nested loops (their
    backward branches predicated), a forward branch inside the outer one (a conditional part
    of its body) and one after it that is no loop, a one-instruction trap; the hot loop is the
    outer one, its inner body counted once; of the inner loop's two waits for every copy, the
    one after its own commit counts (the first waits for the previous iteration's copies)."""
    from condconv_kernels.triton import sass
    found = sass.loops(_SASS)
    assert [(l["start"], l["end"], l["instructions"], l["skipped"]) for l in found] == [
        (0x20, 0x60, 8, 0), (0x10, 0xa0, 13, 2), (0xc0, 0xc0, 1, 0)]
    inner = found[0]
    assert (inner["barriers"], inner["async_copies"], inner["mma"], inner["shuffles"],
            inner["sync_loads"], inner["full_waits"]) == (1, 1, 1, 1, 0, 1)
    hot = sass.hot_loop(_SASS, warps=8)
    assert hot["loop_instructions"] == 13 and hot["loop_sync_loads"] == 1
    assert hot["loop_shared"] == 1 and hot["loop_issue_cycles"] == 26
    assert hot["loop_inner_instructions"] == 8 and hot["loop_skipped"] == 2
    assert hot["loop_innermost"] == [8]  # (the one-instruction loop is not counted as one)
    assert sass.hot_loop(None, 4)["loop_instructions"] is None


def test_dry_run_of_the_autotuned_forward(tmp_path):
    """The triton backend's forward launched dry (dry_run: compiled for sm_90, nothing run) on
    CPU tensors, autotuned: one launch of the dense kernel per call, one tuned key, and once
    tuned the launch skips Triton's Autotuner.run (TunedKernel finds the key Triton stored
    for the real kernel's 50 arguments)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CONDCONV_TRITON_AUTOTUNE="1", CONDCONV_TRITON_STATIONARY="0")
    result = subprocess.run([sys.executable, "-c", _DRY_RUN], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.split("\n")[-2] == (
        "True (4, 32, 7, 7) {'dense_fwd_kernel': 3} 1 0"), result.stdout


def test_direct_launch_matches_tritons(tmp_path):
    """Launched dry, a tuned kernel's launch once Triton has compiled for its arguments skips
    Triton's JITFunction.run (TunedKernel's direct launch) and hands the launcher what
    Triton's own launch of the same call handed it: the grid, stream, function, metadata and
    every argument in order (tensors by dtype, shape and strides, the rest by value), on a
    dense 1x1 and 3x3 and a depthwise 5x5 layer (the weight a Parameter), forward and
    backward; a tensor 2 bytes off 16-byte alignment, or Triton's debug switch on, goes
    through Triton again; with CONDCONV_TRITON_DIRECT_LAUNCH=0 every launch does."""
    for switch in ("1", "0"):  # CONDCONV_TRITON_DIRECT_LAUNCH=0: Triton's launch every time
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(CONDCONV_TRITON_AUTOTUNE="1", CONDCONV_TRITON_STATIONARY="0",
                   CONDCONV_TRITON_DIRECT_LAUNCH=switch)
        result = subprocess.run([sys.executable, "-c", _DIRECT_LAUNCH], env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        lines = result.stdout.strip().split("\n")[-3:]
        # (the dense layers' backward: grad_x, the kernel gradient and its sum kernel, an
        # untuned kernel of one configuration, launched directly too); launches replayed
        replayed = "0 0 0" if switch == "0" else "4 1 3"
        assert [line.split(" ")[:2] + line.split(" ")[-1:] for line in lines] == [
            ["1", "4", replayed[0]], ["3", "4", replayed[2]], ["5", "3", replayed[4]]], lines


def test_replay_with_autotuning_off_matches_tritons():
    """With autotuning off (as the GPU tests run) the launchers keep the compiled kernel a
    plain kernel's launch returns, so a call's second time replays it too, handing the launcher
    what Triton's own launch of the first time did: every launch of a dense 1x1 and 3x3 and a
    depthwise 5x5 layer's forward and backward, launched dry."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CONDCONV_TRITON_AUTOTUNE="0", CONDCONV_TRITON_STATIONARY="0",
               CONDCONV_TRITON_DIRECT_LAUNCH="1")
    result = subprocess.run([sys.executable, "-c", _PLAIN_REPLAY], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # (layer, launches, Triton's runs the first time, the second): the 3x3 kernel gradient
    # reads the experts in tap-major order (a copy made in the call), so that backward's
    # launchers run every time (grad_x and the kernel gradient through Triton, the sum kernel
    # launched directly)
    rows = [line.split() for line in result.stdout.strip().split("\n")[-3:]]
    assert rows == [["1", "4", "4", "0"], ["3", "4", "4", "2"], ["5", "3", "3", "0"]], rows


_SHORT_SHARED_MEMORY = """
import sys
import torch
import triton
from triton.runtime.jit import JITFunction
from triton.runtime import driver
from condconv_kernels import triton as backend
from condconv_kernels.triton import _config, dry_run
from launch_log import record_stages

dry_run.install()
driver.active.utils.shared_bytes = int(sys.argv[1])  # a GPU with this much a block
launched = record_stages()
x, grad = (torch.randn(5, c, 7, 7, dtype=torch.bfloat16).contiguous(
    memory_format=torch.channels_last) for c in (16, 32))
routing, weight = torch.rand(5, 8), torch.randn(8, 32, 16, 1, 1, dtype=torch.bfloat16)
conv = ([1, 1], [0] * 4, [1, 1], 1)
asked = []  # the kernel gradient's launches through Triton, by their stages
run = JITFunction.run
def counted(self, *args, **kwargs):
    if self.__name__ == "dense_bwd_w_kernel":
        asked.append(kwargs["num_stages"])
    return run(self, *args, **kwargs)
JITFunction.run = counted
try:
    backend.forward(x, routing, weight, None, *conv)
    for _ in range(2):  # (not replayed: CONDCONV_TRITON_DIRECT_LAUNCH=0)
        backend.backward(grad, x, routing, weight, None, *conv, (True, True, True, False))
except RuntimeError as error:
    print(error)
for row in launched:
    print(*row)
print("asked", *asked)
# the autotuner's pruning of the dense table at batch 256 on this GPU and on one with 60000
# bytes a block: each configuration's stages
configs = [triton.Config(b, num_warps=w, num_stages=st)
           for b, w, st in _config._table(_config.DENSE_TILES)]
for limit in (int(sys.argv[1]), 60000):
    driver.active.utils.shared_bytes = limit
    kept = _config._prune_examples(configs, {"x_ptr": x, "B_KEY": 256}, E=8)
    print("pruned", limit,
          *[f"{'x'.join(map(str, c.kwargs.values()))}:{c.num_stages}" for c in kept])
"""


def test_launch_on_a_gpu_with_less_shared_memory():
    """The tables are H100's; on a GPU whose blocks have less shared memory (launched dry, its
    size given), autotuning off: the dense forward and grad_x take the stages that fit
    (_config.fitting_stages at the device's shared memory: device_shared), the dense kernel
    gradient, which has no such count, is launched again with a stage fewer (the backend's
    _launch); where one stage does not fit either, the error names the kernel and both
    sizes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CONDCONV_TRITON_AUTOTUNE="0", CONDCONV_TRITON_STATIONARY="0",
               CONDCONV_TRITON_DIRECT_LAUNCH="0",
               PYTHONPATH=os.pathsep.join(filter(None, (os.path.dirname(os.path.abspath(
                   __file__)), env.get("PYTHONPATH")))))  # (launch_log)
    rows, pruned, asked_stages = {}, {}, {}
    for limit in (232448, 36000, 4000):
        result = subprocess.run([sys.executable, "-c", _SHORT_SHARED_MEMORY, str(limit)],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        *rows[limit], asked, first, second = result.stdout.strip().split("\n")
        asked_stages[limit] = asked.split()[1:]
        for line in (first, second):
            pruned[int(line.split()[1])] = line.split()[2:]
    # the autotuner's pruning: every configuration of the table (at batch 256, bfloat16) with
    # the most stages, at most its table's, that fit the device's shared memory
    from condconv_kernels.triton import _config
    table = _config._table(_config.DENSE_TILES)
    for limit in pruned:
        expected = [f"{'x'.join(map(str, b.values()))}:"
                    f"{_config.fitting_stages(b, st, 8, 2, limit)}" for b, w, st in table
                    if _config.examples_fit(b, w, 2, 8)]
        assert pruned[limit] == expected, (limit, pruned[limit], expected)
    stages = {limit: {c.split(":")[1] for c in pruned[limit]} for limit in pruned}
    assert stages[232448] == {"2", "3", "4"} and stages[60000] == {"1", "2"}, stages
    # kernel, stages asked for, stages launched, shared bytes: an H100's 227 KB as the table
    # says (the dense forward's and grad_x's 94208 bytes are dense_shared_bytes at 3 stages)
    # (the forward, then the backward twice, not replayed)
    full = [r.split() for r in rows[232448]]
    assert [r[:3] for r in full] == [["dense_fwd_kernel", "3", "3"]] + 2 * [
        ["dense_bwd_x_kernel", "3", "3"], ["dense_bwd_w_kernel", "3", "3"]], full
    assert int(full[0][3]) == _dense_bytes(3) and int(full[1][3]) == _dense_bytes(3), full
    short = [r.split() for r in rows[36000]]
    assert [r[:3] for r in short] == [["dense_fwd_kernel", "1", "1"]] + 2 * [
        ["dense_bwd_x_kernel", "1", "1"], ["dense_bwd_w_kernel", "3", "2"]], short
    assert all(int(r[3]) <= 36000 for r in short) and int(full[2][3]) > 36000, (full, short)
    # Triton asked for 3 stages once: the second backward launches 2 straight away
    assert asked_stages[232448] == ["3", "3"] and asked_stages[36000] == ["3", "2", "2"], \
        asked_stages
    assert rows[4000] == [
        f"condconv triton backend: dense_fwd_kernel needs {short[0][3]} bytes of shared memory "
        "with one pipeline stage, more than this GPU's 4000; CONDCONV_TRITON_CONFIG=i launches "
        "another configuration of its table"], rows[4000]


def _dense_bytes(stages: int) -> int:
    from condconv_kernels.triton import _config
    blocks = dict(zip(_config.DENSE_TILES, _config._GPU_DENSE_CONFIGS[0][:4]))
    return _config.dense_shared_bytes(blocks, stages, 8, 2)


def test_static_report_of_a_dense_3x3_layer(tmp_path):
    """report --model resnet on a ResNet's first two 3x3 layers (64 -> 64 at 56x56, and 64 ->
    128 at stride 2; batch 256, bfloat16, channels_last): their forward and grad_x reduce over
    (tap, channel) and copy every tile asynchronously (grad_x copied none before), on wgmma,
    without spills; the experts' copy into that order is in their modeled time. The strided
    layer's grad_x runs phase by phase: about its forward's work (over every tap it was 3.5x
    its forward's modeled time)."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "condconv_kernels.triton.report", "--model", "resnet", "--first",
         "2", "--json", str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = {(r["layer"], r["kernel"]): r for r in json.loads(path.read_text())}
    assert set(records) == {(layer, kernel) for layer in ("r2.conv", "r3.down")
                            for kernel in ("dense_fwd", "dense_bwd_x", "dense_bwd_w",
                                           "dense_kgrad_sum")}
    for layer in ("r2.conv", "r3.down"):  # (a bandwidth-bound sum: no products, no copies)
        assert records.pop((layer, "dense_kgrad_sum"))["spill_bytes"] == 0
    for r in records.values():
        assert r["async_copy"] == "cp.async" and r["tensor_core"] == "wgmma", r
        assert r["spill_bytes"] == 0 and r["modeled_us"] >= r["floor_us"] > 0, r
        # the main loop's copies pipelined (the kernel gradient walks 49 tiles an example)
        assert r["loop_async_copies"] >= 1 and r["loop_full_waits"] == 0, r
    strided = records["r3.down", "dense_bwd_x"]
    assert strided["modeled_us"] <= 1.5 * records["r3.down", "dense_fwd"]["modeled_us"], strided
    assert "| r2.conv | conv 3x3/s1 64->64 @56x56 |" in result.stdout
    assert "| r3.down | conv 3x3/s2 64->128 @56x56 |" in result.stdout


_REDUCTIONS_SCRIPT = r"""
import re, sys, types, torch
from condconv_kernels.triton import _config, report
for dtype in (torch.bfloat16, torch.float32):
    for experts in (2, 3, 8):
        layer = types.SimpleNamespace(cin=48, cout=72, height=7, width=7, kernel=1, stride=1,
                                      padding=(0, 0, 0, 0), groups=1, experts=experts)
        launch = [l for l in report.layer_launches(layer, 37, dtype, True)
                  if l.name == "dense_bwd_w_kernel"][0]
        for blocks, warps, stages in _config._table(_config.KGRAD_TILES):
            compiled, _ = report.compile_launch(launch, (blocks, warps, stages))
            ttgir = compiled.asm["ttgir"]
            linear = re.findall(r'"tt\.reduce".*?\}\) : \(tensor<[^>]*#linear\d*>\)', ttgir,
                                re.S)
            print(str(dtype)[6:], experts, tuple(blocks.values()), warps,
                  ttgir.count('"tt.reduce"'), len(linear))
"""


def test_the_kernel_gradient_reduces_over_no_linear_layout():
    """The dense kernel gradient's reductions (grad_routing's sum over a tile of W, every
    expert) take blocked layouts in every configuration of its table, at 2, 3 and 8 experts,
    in bfloat16 and float32, as a 7x7 1x1 layer of 48 -> 72 channels launches them (strides
    divisible by 16: 16-byte vectors). Triton 3.6 lowers a reduction over a linear layout
    whose summed lanes are not the lowest (one over the tile reshaped to (experts, columns))
    to shuffles over the wrong lanes: on the GPU the kernel's grad_routing added each expert's
    sum into its neighbour's (configuration 64 x 16 x 64 at 8 experts; by the compiled code,
    most configurations at 2 to 4 experts)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _REDUCTIONS_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    from condconv_kernels.triton import _config
    assert len(rows) == 2 * 3 * len(_config._table(_config.KGRAD_TILES))
    for row in rows:
        assert int(row[-2]) >= 2, row  # grad_routing's sums are there
        assert row[-1] == "0", row


def test_programs_an_sm_holds():
    """The latency term's programs resident on an SM: the least of what its registers (in
    eights a thread), shared memory (1 KB reserved a program) and warp slots allow."""
    from condconv_kernels.triton.report import resident
    assert resident(255, 4, 61440) == 2  # 256 x 128 registers: two programs of 32K
    assert resident(167, 4, 94208) == 2  # 168 x 128 x 3 fits, shared memory holds two
    assert resident(255, 8, 117244) == 1
    assert resident(78, 4, 40000) == 5  # shared memory: 228 KB / 40 KB
    assert resident(32, 1, 0) == 64  # warp slots
    assert resident(169, 4, 0) == 2  # 176 registers a thread, not 169: three would not fit
    assert resident(32, 4, 46694) == 4  # with the 1 KB reserved, not 5


def test_tuner_timings_against_the_model(tmp_path):
    """bench/tuner_timings.py on a Triton cache holding the autotuner's timings of two keys:
    one of tf_efficientnet_cc_b0_8e's layers (its dense forward at batch 256, named by the
    layers that launch it) and one of no layer (listed by its key); beside the first, the
    static model's time for each configuration measured (that configuration's record from the
    report's own code), the configuration the model ranks first and how far it is from the
    fastest, and the summary row from them."""
    import json
    script = f"""
import json, os, sys
sys.path.insert(0, "bench")
import torch
from condconv_kernels.profile import efficientnet_cc_b0_layers
from condconv_kernels.triton import report
layer = efficientnet_cc_b0_layers(8)[0]
fwd = [l for l in report.layer_launches(layer, 256, torch.bfloat16, True)
       if l.name == "dense_fwd_kernel"][0]
key = list(fwd.kernel.tuning_key(fwd.args, fwd.kwargs))
configs = [({{"BLOCK_B": b, "BLOCK_M": m, "BLOCK_N": 64, "BLOCK_K": 32}}, w, 3)
           for b, m, w in ((2, 64, 4), (1, 64, 4), (4, 64, 8))]
times = (0.1, 0.2, 0.15)
for name, k in (("A", key), ("B", [7] + key[1:])):
    os.makedirs(os.path.join({str(tmp_path)!r}, "cache", name))
    with open(os.path.join({str(tmp_path)!r}, "cache", name, "dense_fwd_kernel.autotune.json"),
              "w") as f:
        json.dump({{"key": k, "configs_timings": [
            [{{"kwargs": c[0], "num_warps": c[1], "num_stages": c[2]}}, [t, t, t]]
            for c, t in zip(configs, times)]}}, f)
modeled = [report.config_record(layer, 256, 2, fwd, c)["modeled_us"] for c in configs]
json.dump(modeled, open(os.path.join({str(tmp_path)!r}, "modeled.json"), "w"))
import tuner_timings
sys.exit(tuner_timings.main([os.path.join({str(tmp_path)!r}, "cache"), "--model", "--fit",
                             "--out", os.path.join({str(tmp_path)!r}, "t.md")]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    modeled = json.loads((tmp_path / "modeled.json").read_text())
    names = ["2x64x64x32 w4 s3", "1x64x64x32 w4 s3", "4x64x64x32 w8 s3"]
    measured = [100.0, 200.0, 150.0]
    pick = min(range(3), key=modeled.__getitem__)
    assert (f"### dense_fwd, batch bucket 256, s5.b0.expand: the model picks {names[pick]}, "
            f"{measured[pick] / 100:.2f}x the fastest") in out
    for name, us, m in zip(names, measured, modeled):
        assert f"| {name} | {us:.1f} | {us / 100:.2f} | {m:.1f} | {us / m:.2f} |" in out
    ranks = tuner_timings_spearman(measured, modeled)
    assert (f"| dense_fwd | 1 | {measured[pick] / 100:.2f} | {ranks:.2f} | "
            f"{100 / modeled[0]:.2f} |") in out
    assert "### dense_fwd, batch bucket 7, key 7, " in out  # of no layer: no model beside it
    assert "| 2x64x64x32 w4 s3 | 100.0 | 1.00 | - | - |" in out
    records = json.loads((tmp_path / "t.json").read_text())
    assert len(records) == 6
    assert sorted(r["to_fastest"] for r in records) == pytest.approx([1, 1, 1.5, 1.5, 2, 2])
    for r in records:  # the terms --fit scales add up to the model's time
        if r["modeled_us"]:
            assert r["latency_us"] > 0 and r["rest_us"] > 0, r
            assert r["scale"] * max(r["rest_us"], r["latency_us"]) + r["copy_us"] == \
                pytest.approx(r["modeled_us"]), r
    assert "| dense_fwd | 3 | " in out  # the fit's row: the three modeled points


def tuner_timings_spearman(a, b):
    """Spearman's rank correlation, computed here independently of the tool's."""
    ra = {v: i for i, v in enumerate(sorted(a))}
    rb = {v: i for i, v in enumerate(sorted(b))}
    n = len(a)
    return 1 - 6 * sum((ra[x] - rb[y]) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


def test_tuner_timings_fit_finds_the_factor():
    """bench/tuner_timings.py's fit: on times made from the model's terms with the latency term
    1.5x the report's (where it binds), it finds 1.50, with no error left, the configurations
    ranked as measured and the model's pick the fastest."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import tuner_timings
    records = []
    for key, (rest, latencies) in enumerate([(50.0, [20.0, 60.0, 90.0]),
                                             (80.0, [70.0, 120.0, 40.0])]):
        for i, latency in enumerate(latencies):
            modeled = max(rest, 1.5 * latency)
            records.append(dict(kernel="dense_fwd", key=[key], config=str(i),
                                measured_us=modeled, modeled_us=max(rest, latency),
                                latency_us=latency, rest_us=rest, scale=1.0, copy_us=0.0))
    table = tuner_timings.fit(records)
    assert "| dense_fwd | 6 | 1.50 | " in table and " -> 0.00 | 1.00 | 1.00 |" in table, table


def test_tuner_timings_ties_and_failures():
    """bench/tuner_timings.py's tables: a configuration the GPU could not run (timed as
    infinite) is shown as failed and left out of the comparisons; configurations the model ties
    first count as the geomean of their measured times, and ties take their mean rank in the
    rank correlation (here 0: the measured order is unrelated to the model's)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import tuner_timings
    inf = float("inf")
    timings = [("dense_fwd_kernel", [256, 1], {"a": 0.1, "b": 0.2, "c": 0.12, "d": inf}, {})]
    model = [{"a": {"modeled_us": 50.0}, "b": {"modeled_us": 50.0}, "c": {"modeled_us": 80.0},
              "d": {"modeled_us": 40.0}}]
    text, records = tuner_timings.tables(timings, {}, model)
    assert "the model ties 2 first (a, b), 1.00-2.00x the fastest" in text, text
    assert "| d | failed | - | 40.0 | - |" in text, text
    assert f"| dense_fwd | 1 | {2 ** 0.5:.2f} | 0.00 | {100 / 50:.2f} |" in text, text
    assert tuner_timings.spearman([1, 2, 3, 4], [5, 5, 5, 5]) != \
        tuner_timings.spearman([1, 2, 3, 4], [5, 5, 5, 6]) == pytest.approx(0.7746, abs=1e-4)
    assert len(records) == 4
