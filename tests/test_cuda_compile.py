"""The cuda backend's Hopper kernels as nvcc compiles them for sm_90a (where nvcc is installed;
nothing runs): the bfloat16 launchers (csrc/cuda/instantiate_bfloat16.cu) built as the GPU kit
builds them (TORCH_CUDA_ARCH_LIST=9.0a: CONDCONV_SM90A), and ptxas's report and the machine
code read for what the kernels' designs rely on:

- no spills and at most 255 registers in the clustered kernels (pointwise_cluster.cuh,
  pointwise_wgmma.cuh) and the 1x1 kernel gradient's (pointwise_kgrad.cuh): one block of 256
  threads an SM;
- no wgmma serialized by ptxas (its advice C7518: a wgmma the compiler could not keep in flight
  waits for each one before the next, which would halve the kernel's tensor-core overlap);
- the wgmma kernel's products as HGMMA 64x64x16 and its copies as multicast tensor copies
  (UTMALDG.3D.MULTICAST), the other clustered kernel's as HMMA and the same copies, the kernel
  gradient's as HMMA and tensor copies (UTMALDG.3D).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # triton ships one
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(ptxas's report, the SASS) of the bfloat16 launchers built for sm_90a."""
    tmp = tmp_path_factory.mktemp("sm90a")
    # torch's CPU wheel has no c10/cuda/impl/cuda_cmake_macros.h: an empty one stands in.
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cubin = tmp / "bf16.cubin"
    cmd = [NVCC, "-arch=sm_90a", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
           "-DCONDCONV_SM90A", "-Xptxas", "-v", "-cubin", "-o", str(cubin),
           f"-I{tmp / 'stub'}", f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd.append(str(ROOT / "csrc" / "cuda" / "instantiate_bfloat16.cu"))
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    tool = _cuobjdump()
    sass = (subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True,
                           check=True).stdout if tool else None)
    return built.stdout + built.stderr, sass


def _entries(report: str, name: str):
    """{mangled entry: (registers, spill bytes)} of ptxas's report for kernels named `name`."""
    found = {}
    entry = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry = m.group(1) if name in m.group(1) else None
            continue
        if entry is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            found.setdefault(entry, [0, 0])[1] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            found.setdefault(entry, [0, 0])[0] = int(m.group(1))
    return found


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_hopper_kernels_compile_for_sm90a_without_spills_or_serialized_wgmma(compiled):
    report, sass = compiled
    for name, instances in (("pointwise_wgmma_kernel", 4), ("pointwise_cluster_kernel", 8),
                            ("pointwise_kgrad_kernel", 2)):
        entries = _entries(report, name)
        assert len(entries) == instances, (name, sorted(entries))
        for entry, (registers, spills) in entries.items():
            assert 0 < registers <= 255 and spills == 0, (entry, registers, spills)
    serialized = [line for line in report.splitlines() if "C7518" in line]
    assert not serialized, serialized
    if sass is None:
        pytest.skip("no cuobjdump to read the machine code with")
    functions = re.split(r"\n\s*Function : ", sass)
    wgmma = [f for f in functions if f.startswith("_ZN8condconv4cuda9pointwise5wgmma22")]
    cluster = [f for f in functions if "pointwise_cluster_kernel" in f.split("\n", 1)[0]]
    kgrad = [f for f in functions if "pointwise_kgrad_kernel" in f.split("\n", 1)[0]]
    assert len(wgmma) == 4 and len(cluster) == 8 and len(kgrad) == 2
    for f in wgmma:
        assert "HGMMA.64x64x16.F32.BF16" in f and "UTMALDG.3D.MULTICAST" in f, f[:200]
    for f in cluster:
        assert "HMMA.16816.F32.BF16" in f and "UTMALDG.3D.MULTICAST" in f, f[:200]
    for f in kgrad:
        assert "HMMA.16816.F32.BF16" in f and "UTMALDG.3D" in f, f[:200]
