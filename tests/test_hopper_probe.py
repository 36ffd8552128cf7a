"""bench/hopper_probe.py, the GPU kit's guard before its benchmarks time the cuda backend's
Hopper kernels: a probe's process that hangs, dies or raises counts against its kernel, and
only those turn the kernel off for the later steps (the cluster switch, bench_pointwise's
columns); one probe run for real, on the CPU stand-in."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("hopper_probe", ROOT / "bench" / "hopper_probe.py")
hopper_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hopper_probe)

CHILDREN = {  # what each fake probe's process does
    "cluster": "import time; time.sleep(30)",
    "wgmma": "import os; os.abort()",
    "kgrad": "import sys; sys.stderr.write('x' * 200000); print('a line'); "
             "print('{\"status\": \"wrong\", \"detail\": \"off\"}')",
}


def test_a_hang_a_crash_and_a_wrong_result(monkeypatch, tmp_path):
    """Each process judged on its own: the hang does not make the others hang, nor does a
    child's large output."""
    monkeypatch.setattr(hopper_probe, "command",
                        lambda name: [sys.executable, "-c", CHILDREN[name]])
    results = hopper_probe.run_all(hopper_probe.PROBES, timeout=3)
    assert results["cluster"]["status"] == "hung"
    assert 3 <= results["cluster"]["seconds"] < 20
    assert results["wgmma"]["status"] == "crashed"
    assert "exit status -6" in results["wgmma"]["detail"]  # SIGABRT
    # (200 KB on stderr: more than a pipe holds; its result still read, and its own time)
    assert results["kgrad"]["status"] == "wrong" and results["kgrad"]["detail"] == "off"
    assert results["kgrad"]["seconds"] < results["cluster"]["seconds"]
    lines = hopper_probe.env_lines(results)
    assert "export CONDCONV_CUDA_CLUSTER=0" in lines
    assert "export HOPPER_SKIP='cluster,wgmma'" in lines  # the wrong one is still timed
    table = hopper_probe.table(results)
    assert "| kgrad | pointwise_kgrad_kernel | wrong |" in table


def test_a_raise_counts_as_a_crash_and_nothing_else_turns_anything_off(monkeypatch):
    monkeypatch.setattr(hopper_probe, "command",
                        lambda name: [sys.executable, "-c", "raise RuntimeError('trap')"])
    r = hopper_probe.run("kgrad", timeout=20)
    assert r["status"] == "crashed" and "RuntimeError: trap" in r["detail"]
    lines = hopper_probe.env_lines({"cluster": {"status": "ok"}, "kgrad": r,
                                    "wgmma": {"status": "not taken"}})
    assert "export CONDCONV_CUDA_CLUSTER=0" not in lines
    assert "export HOPPER_SKIP='cuda kgrad'" in lines


@pytest.mark.skipif(not list((ROOT / "condconv_kernels").glob("_C*.so")),
                    reason="the probe runs the extension's ops")
def test_one_probe_for_real_on_the_cpu(tmp_path):
    """On the CPU the cpu backend stands in for the kernel: the results match the float64
    reference, and the kernel, never launched, did not take the call."""
    r = hopper_probe.run("kgrad", timeout=120)
    assert r["status"] == "not taken", r
    assert "pointwise_kgrad_kernel launched 0 times, 1 expected" in r["detail"]
    offs = [float(v.split()[0]) for v in r["detail"].split("off by ")[1:]]
    assert len(offs) == 2 and all(v < hopper_probe.TOLERANCE for v in offs), r
    hopper_probe.main(["--probes", "cluster", "--env", str(tmp_path / "h.env"),
                       "--out", str(tmp_path / "p.md")])
    assert (tmp_path / "h.env").read_text().splitlines()[1:] == ["export HOPPER_SKIP=''"]
    assert "| cluster | pointwise_cluster_kernel | not taken |" in (tmp_path / "p.md").read_text()
    with pytest.raises(SystemExit):
        hopper_probe.main(["--probes", "cluster,tma"])


def test_a_probe_step_killed_half_way_leaves_every_kernel_off(monkeypatch, tmp_path):
    """The env file is written before the probes start, every kernel off: a kill while they run
    leaves it so."""
    def run_all(names, timeout):
        raise KeyboardInterrupt  # stands in for the step's cap killing the process
    monkeypatch.setattr(hopper_probe, "run_all", run_all)
    env = tmp_path / "h.env"
    with pytest.raises(KeyboardInterrupt):
        hopper_probe.main(["--env", str(env)])
    lines = env.read_text().splitlines()
    assert "export CONDCONV_CUDA_CLUSTER=0" in lines
    assert "export HOPPER_SKIP='cluster,wgmma,cuda kgrad'" in lines


def test_the_probes_run_at_once(monkeypatch):
    """The probes' processes overlap: each started before any of the others ended (each
    prints its start and end), and each result is its own."""
    monkeypatch.setattr(hopper_probe, "command", lambda name: [
        sys.executable, "-c",
        "import json, time; t0 = time.time(); time.sleep(1); "
        f"print(json.dumps({{'status': 'ok', 'detail': '{name}', 'span': [t0, time.time()]}}))"])
    results = hopper_probe.run_all(hopper_probe.PROBES, timeout=20)
    assert all(r["status"] == "ok" for r in results.values())
    assert {n: r["detail"] for n, r in results.items()} == {n: n for n in hopper_probe.PROBES}
    starts, ends = zip(*(r["span"] for r in results.values()))
    assert max(starts) < min(ends)


@pytest.mark.skipif(not list((ROOT / "condconv_kernels").glob("_C*.so")),
                    reason="the probe runs the extension's ops")
@pytest.mark.parametrize("name", hopper_probe.PROBES)
def test_each_probe_counts_its_kernels_launches(monkeypatch, name):
    """A probe is ``ok`` where the profile shows its kernel launched as often as its calls
    launch it (forward and grad_x: 2; both kernel gradients: 1) and its results match, ``not
    taken`` at any other count (the CPU backend standing in for the kernel, as the counts are
    stood in for)."""
    seen = {"count": hopper_probe.LAUNCHES[name]}
    monkeypatch.setattr(hopper_probe, "_launches", lambda prof, kernel: seen["count"])
    if name == "wgmma":  # (the switch's mode 3 stood in: a CPU build may refuse it)
        import torch
        monkeypatch.setattr(torch.ops.condconv, "cuda_pointwise_cluster",
                            lambda mode=None: 3, raising=False)
    assert hopper_probe.probe(name)["status"] == "ok"
    seen["count"] += 1
    r = hopper_probe.probe(name)
    assert r["status"] == "not taken" and f"{hopper_probe.LAUNCHES[name]} expected" in r["detail"]


def test_unprobed_turns_every_kernel_off(tmp_path):
    env = tmp_path / "h.env"
    hopper_probe.main(["--unprobed", "--env", str(env)])
    lines = env.read_text().splitlines()
    assert "export CONDCONV_CUDA_CLUSTER=0" in lines
    assert "export HOPPER_SKIP='cluster,wgmma,cuda kgrad'" in lines
    with pytest.raises(SystemExit):
        hopper_probe.main(["--unprobed"])
