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
