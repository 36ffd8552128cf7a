"""bench/gpu_checks.sh, the GPU kit, walked on the CPU (GPU_CHECKS_DRY_RUN=1: every step with a
small CPU stand-in): both calls exit 0, every step is in the summary with its status, time and
cap, the summary is written as steps end (a run killed half-way keeps the finished steps) and
printed last, at most 8 files land in OUT, and the second call reuses the first call's kit."""
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_checks.sh"
FIRST = ["versions", "build", "warm-triton", "triton-tests", "install", "cuda-tests", "probe",
         "tuned-check", "pointwise", "model-fwd-graph", "layers-fwd", "model-fwd", "pack"]
BACKGROUND = {"build", "warm-triton"}  # recorded when they end, among the others
SECOND = ["versions", "restore", "install", "model-train-graph", "layers-fwdbwd",
          "profile-model", "ncu", "memcheck", "model-train"]
STEP_LINE = re.compile(r"^### ([\w-]+): (.+?), (\d+) s \(cap (\d+) s\)$", re.M)
MAX_FILES = 8  # what comes back from a GPU machine's output folder

pytestmark = pytest.mark.skipif(not list((ROOT / "condconv_kernels").glob("_C*.so")),
                                reason="the dry run stands the built extension in for the build")


def _env(tmp_path, out):
    return dict(os.environ, GPU_CHECKS_DRY_RUN="1", PYTHON=sys.executable, OUT=str(out),
                GPU_KIT_DIR=str(tmp_path / "kit"), TRITON_CACHE_DIR=str(tmp_path / "cache"))


def _run(tmp_path, mode, out):
    return subprocess.run(["bash", str(SCRIPT), mode], env=_env(tmp_path, out), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _steps(summary: str):
    return {m.group(1): (m.group(2), int(m.group(3)), int(m.group(4)))
            for m in STEP_LINE.finditer(summary)}


def _files(out: Path):
    return [p for p in out.rglob("*") if p.is_file()]


def test_both_calls_walk_every_step(tmp_path):
    out1 = tmp_path / "out1"
    # An autotuner's timings in Triton's cache, as the GPU's tuning leaves them there.
    tuned = tmp_path / "cache" / "KEYHASH" / "dense_fwd_kernel.autotune.json"
    tuned.parent.mkdir(parents=True)
    tuned.write_text('{"key": [256], "configs_timings": []}')
    run = _run(tmp_path, "first", out1)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out1 / "summary.md").read_text()
    steps = _steps(summary)
    assert set(steps) == set(FIRST), summary
    assert [s for s in steps if s not in BACKGROUND] == [s for s in FIRST if s not in BACKGROUND]
    for name, (status, secs, cap) in steps.items():
        assert status == "ok", f"{name}: {status}\n{summary}"
        assert 0 <= secs <= cap
    assert "| layer | shape | static | unfused |" in summary  # the headline table
    assert "triton modeled |" in summary  # with the static model's times beside it
    assert "| batch | variant | ms | images/s |" in summary
    assert ("| layer | shape | pass | static | dense | stationary | batched | mix | acc layout |"
            in summary)
    # the stationary and mix kernels' models
    assert "| modeled: stationary | mix | measured / modeled: stationary | mix |" in summary
    assert "| call 3 bitwise call 2 | verdict |" in summary  # the tuned launches' check
    assert "| probe | kernel | status | seconds | detail |" in summary  # the Hopper kernels'
    assert "| cluster | pointwise_cluster_kernel | not taken |" in summary  # (on the CPU)
    assert "| vs float64: dense | stationary | batched | mix | acc layout |" in summary
    assert run.stdout.rstrip().endswith(summary.rstrip())  # the summary is printed last
    assert len(_files(out1)) <= MAX_FILES
    assert {p.name for p in _files(out1)} == {"summary.md", "log.txt", "results.tgz", "kit.tgz"}
    log = (out1 / "log.txt").read_text()
    for name in FIRST:
        assert f"===== {name} (" in log, name
    with tarfile.open(out1 / "results.tgz") as tar:  # the timings come back in results.tgz
        member = tar.extractfile("results/autotune/KEYHASH/dense_fwd_kernel.autotune.json")
        assert member.read() == tuned.read_bytes()

    # The second call with the first's kit put back where the script looks for it.
    (tmp_path / "kit").mkdir(exist_ok=True)
    (tmp_path / "kit" / "kit.tgz").write_bytes((out1 / "kit.tgz").read_bytes())
    out2 = tmp_path / "out2"
    run = _run(tmp_path, "second", out2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out2 / "summary.md").read_text()
    steps = _steps(summary)
    assert list(steps) == SECOND, summary
    assert all(status == "ok" for status, _, _ in steps.values()), summary
    assert "extension reused from the kit" in summary
    assert "the first call's probe: # bench/hopper_probe.py: nothing crashed" in summary
    assert "## Whole model" in summary  # the one-layer profile's model section
    assert summary.count("before it: load ") == len(SECOND)  # each step's machine state
    assert run.stdout.rstrip().endswith(summary.rstrip())
    assert len(_files(out2)) <= MAX_FILES


def _short_second_call(tmp_path, out, deadline):
    """The second call under a short deadline (its first steps only): its steps, after
    checking it exited 0."""
    env = dict(_env(tmp_path, out), SECOND_DEADLINE=str(deadline))
    run = subprocess.run(["bash", str(SCRIPT), "second"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0
    return _steps((out / "summary.md").read_text())


def test_second_call_with_a_stale_kit_builds_and_probes_again(tmp_path):
    """A kit whose extension was built from other sources: rebuilt, and its Hopper kernels
    probed again rather than the kit's verdict (hopper.env) taken for them."""
    staged = tmp_path / "staged"
    (staged / "triton-cache").mkdir(parents=True)
    (staged / "stamp").write_text("stale\n")
    (staged / "_C.so").write_bytes(b"")
    (staged / "hopper.env").write_text("# stale verdict\nexport HOPPER_SKIP='cluster'\n")
    (tmp_path / "kit").mkdir()
    with tarfile.open(tmp_path / "kit" / "kit.tgz", "w:gz") as tar:
        tar.add(staged, arcname=".")
    out = tmp_path / "out"
    steps = _short_second_call(tmp_path, out, deadline=35)  # 25 s of steps: probe's end at ~12
    assert list(steps)[:5] == ["versions", "restore", "build", "install", "probe"], steps
    log = (out / "log.txt").read_text()
    assert "built from other sources" in log and "stale verdict" not in log
    assert "hopper.env: CONDCONV_CUDA_CLUSTER=default HOPPER_SKIP=" in log


def test_profile_call_walks_every_step(tmp_path):
    """The profile call (here without a kit: the restore step says so, and it builds and probes
    the Hopper kernels, as the second call does with the same steps): host against device time
    per layer and for the whole model in the summary, Nsight Compute's run (here the layers
    alone), the DynamicConv2d / ODConv2d tables (forward, forward+backward), the
    kernel-gradient ablation, then the >2^31-element tests."""
    out = tmp_path / "out"
    run = _run(tmp_path, "profile", out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    steps = _steps(summary)
    assert list(steps) == ["versions", "restore", "build", "install", "probe", "profile", "ncu",
                           "dynamic-fwd", "dynamic-fwdbwd", "kgrad", "huge-tests"]
    assert all(status == "ok" for status, _, _ in steps.values()), summary
    assert "no kit at" in (out / "log.txt").read_text()
    assert "| layer | variant | host us | device us | kernels per call |" in summary
    assert "| variant | wall ms | device ms | host ms (no sync) |" in summary
    assert summary.count("| layer | shape | DynamicConv fused | DynamicConv grouped |") == 2
    assert "| layer | shape | x | w | r | wr |" in summary  # the kernel-gradient ablation
    assert len(_files(out)) <= MAX_FILES


def test_summary_survives_a_kill_half_way(tmp_path):
    """The run killed (SIGKILL, the whole process group) once three steps have ended: the
    summary holds those steps, the log their output."""
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), "first"], env=_env(tmp_path, out), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    summary = out / "summary.md"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if summary.exists() and len(_steps(summary.read_text())) >= 3:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    steps = _steps(summary.read_text())
    assert len(steps) >= 3 and "versions" in steps, summary.read_text()
    assert "pack" not in steps  # killed before the end
    assert "===== versions (" in (out / "log.txt").read_text()


def test_usage_error_names_the_calls():
    run = subprocess.run(["bash", str(SCRIPT), "both"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "first|second|profile" in run.stderr


def test_layer_table_names_the_configurations_launched():
    """bench_layers.py's configuration column: the autotuned kernels a call launched, each with
    the configuration its last launch ran (best_config), and none that the call did not
    launch, though an earlier call did."""
    import importlib.util
    triton = pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("bench_layers",
                                                  ROOT / "bench" / "bench_layers.py")
    bench_layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_layers)

    class Kernel:
        configs = ()
        best_config = triton.Config({"BLOCK_B": 4}, num_warps=8, num_stages=3)  # an earlier call

    fwd, kgrad = Kernel(), Kernel()
    chosen = triton.Config({"BLOCK_B": 8, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16},
                           num_warps=8, num_stages=4)

    def call():
        fwd.best_config = chosen

    text = bench_layers.launched_configs(call, [("dense_fwd_kernel", fwd),
                                                ("dense_bwd_w_kernel", kgrad)])
    assert text == "dense_fwd 8x64x64x16 w8 s4", text
    assert bench_layers.launched_configs(lambda: None, [("dense_fwd_kernel", fwd)]) == ""


def test_cluster_model_counts_a_layer_by_hand():
    """bench/cluster_model.py against an independent count on s6.b1.expand's forward (192 ->
    1152 at 7x7, batch 256, 8 experts): 18 tiles of output channels x 1 of pixels x 64 blocks
    of examples; 6 steps; L2 traffic the experts once a cluster of 16 examples, x once a tile of
    output channels, the outputs once; the same for the wgmma kernel's 128-row blocks, and the
    1x1 kernel gradient kernel's plan and time; and a report of the committed H200 tables, in
    each form, has a row for each of their dense 1x1 layers."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import cluster_model
    finally:
        sys.path.pop(0)
    m = cluster_model.model(batch=256, rows=1152, depth=192, pixels=49, experts=8)
    assert (m["blocks"], m["waves"], m["steps"]) == (18 * 64, 9, 6)
    experts = 18 * 16 * 6 * 8 * (64 * 32 * 2)
    x = 18 * 256 * 49 * 192 * 2
    out = 256 * 49 * 1152 * 2
    assert m["L2"] == pytest.approx((experts + x + out) / 5.5e12 * 1e6)
    hbm = (256 * 49 * (192 + 1152) + 8 * 1152 * 192) * 2
    assert m["HBM"] == pytest.approx(hbm / 4.2e12 * 1e6)
    assert m["us"] == max(m["compute"], m["L2"], m["HBM"])
    # The wgmma kernel: 9 tiles of 128 output channels; a step of 4 examples x 128 rows is at
    # least its shared memory: 8 expert tiles of 8 KB copied and read by the mix, 4 input tiles
    # of 4 KB copied and read by both warpgroups.
    w = cluster_model.model(batch=256, rows=1152, depth=192, pixels=49, experts=8, form="wgmma")
    assert (w["blocks"], w["waves"], w["steps"]) == (9 * 64, 5, 6)
    assert w["step_cycles"] == (2 * 8 * 8192 + 3 * 4 * 4096) / 128
    experts = 9 * 16 * 6 * 8 * (128 * 32 * 2)
    assert w["L2"] == pytest.approx((experts + x / 2 + out) / 5.5e12 * 1e6)
    with pytest.raises(ValueError, match="form must be one of fragments, wmma, wgmma"):
        cluster_model.model(256, 1152, 192, 49, 8, form="tma")
    # The kernel gradient: 18 x 6 tiles of 64 x 32, one slice (two would need 2 waves for the
    # same examples a block times waves); an example a tile: one step of 64 pixels, bound by
    # shared memory (the copies' 12 KB and the fragment loads' 32 KB at 128 bytes a cycle), then
    # the fold's 8 x 8 x 2 multiply-adds a thread (256 threads, 128 a cycle).
    k = cluster_model.kgrad_model(batch=256, cin=192, cout=1152, pixels=49, experts=8)
    assert (k["tiles"], k["slices"], k["waves"]) == (108, 1, 1)
    assert k["example_cycles"] == (12 + 32) * 1024 / 128 + 8 * 8 * 2 * 256 / 128
    partials = 2 * 4 * (8 * 1152 * 192 + 108 * 256 * 8)
    assert k["us"] == pytest.approx((256 * 608 + 2500) / 1.78e9 * 1e6 + partials / 4.2e12 * 1e6)
    assert cluster_model.kgrad_plan(256, 24)[:2] == (11, 24)  # 264 blocks: 2 waves of 24
    # The fold on the CUDA cores, at best: 2 x 8 x 192 x 1152 multiply-adds an example, 256
    # examples, 128 a cycle on each of 132 SMs at 1.78 GHz (~30 us, above the static layer's
    # weight gradient); the tensor-core fold's design: a step's 12 KB of copies written and
    # read once by wgmma, then G_b's 4 KB written and read twice (96 cycles; its products 32).
    floors = cluster_model.kgrad_floors(256, 192, 1152, 49, 8)
    assert floors["cuda_fold"] == pytest.approx(
        2 * 8 * 192 * 1152 * 256 / (128 * 132 * 1.78e9) * 1e6)
    t = cluster_model.kgrad_model(256, 192, 1152, 49, 8, form="tc-fold")
    assert t["example_cycles"] == 2 * 12288 / 128 + 3 * 4096 / 128
    with pytest.raises(ValueError, match="form must be one of cuda-fold, tc-fold"):
        cluster_model.kgrad_model(256, 192, 1152, 49, 8, form="wgmma")
    rows = [line for line in cluster_model.kgrad_report(__import__("json").loads(
        cluster_model.KGRAD_DEFAULT.read_text())).splitlines() if line.startswith("| s")]
    assert len(rows) == 4 and rows[1].startswith("| s6.b1.expand | 192 -> 1152 @ 49 | 108 x 1 (1)")
    table = __import__("json").loads(cluster_model.DEFAULT.read_text())
    for form in cluster_model.FORMS:
        rows = [line for line in cluster_model.report(table, form=form).splitlines()
                if line.startswith("| s")]
        assert len(rows) == 16 and rows[8].startswith("| s6.b1.expand | 192 -> 1152 @ 49 |")


def test_ncu_layers_kernel_gradient_call_matches_the_reference():
    """bench/ncu_layers.py's kernel-gradient call (what it profiles of the 1x1 kernel gradient's
    kernel on a GPU), run here through the cpu backend on s6.b1.expand's shape at a batch of 2:
    grad_routing and grad_weight against the float64 reference for its grad_out of ones."""
    import importlib.util
    import torch
    from condconv_kernels import reference
    from condconv_kernels.profile import efficientnet_cc_b0_layers
    spec = importlib.util.spec_from_file_location("ncu_layers", ROOT / "bench" / "ncu_layers.py")
    ncu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ncu)
    layer = next(l for l in efficientnet_cc_b0_layers(8) if l.name == "s6.b1.expand")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, layer.cin, layer.height, layer.width, generator=g).contiguous(
        memory_format=torch.channels_last)
    routing = torch.rand(2, layer.experts, generator=g)
    weight = torch.randn(layer.experts, layer.cout, layer.cin, 1, 1, generator=g) * 0.05
    gr, gw = ncu.kernel_grads(layer, x, routing, weight, "cpu")
    ones = torch.ones(2, layer.cout, *layer.out_hw, dtype=torch.float64)
    want = reference.backward(ones, x.double(), routing.double(), weight.double(), None,
                              [1, 1], [0] * 4, [1, 1], 1, [False, True, True, False])
    torch.testing.assert_close(gr.double(), want[1], rtol=1e-4, atol=1e-4 * want[1].abs().max())
    torch.testing.assert_close(gw.double(), want[2], rtol=1e-4, atol=1e-4 * want[2].abs().max())
