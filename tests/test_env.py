"""The switches that choose among the backends' kernels (condconv_kernels/_env.py):
CONDCONV_TRITON_STATIONARY and CONDCONV_TRITON_BATCHED each turn on a set of passes, off by
default; a value that names no pass is an error naming the variable. CONDCONV_CUDA_CLUSTER=0
turns the cuda backend's clustered Hopper kernel off, in the extension, when the package loads."""
import os
import subprocess
import sys

import pytest
import torch

import condconv_kernels  # noqa: F401  (loads the extension and its ops)

from condconv_kernels import _env

SWITCHES = [("CONDCONV_TRITON_STATIONARY", _env.stationary_passes,
             {"forward", "grad_x", "routing", "kernel_grad", "mix"}),
            ("CONDCONV_TRITON_BATCHED", _env.batched_passes,
             {"forward", "grad_x", "kernel_grad"}),
            ("CONDCONV_TRITON_CLUSTER", _env.cluster_passes,
             {"forward", "grad_x", "kernel_grad"})]


@pytest.mark.parametrize("name,parse,allowed", SWITCHES, ids=[s[0] for s in SWITCHES])
def test_off_all_or_the_passes_named(name, parse, allowed):
    assert parse("") == parse("0") == set()
    assert parse("1") == parse("all") == parse(" ALL ") == allowed
    for one in allowed:
        assert parse(one) == parse(f" {one.title()}, ") == {one}
    assert parse(",".join(sorted(allowed))) == allowed


@pytest.mark.parametrize("name,parse,allowed", SWITCHES, ids=[s[0] for s in SWITCHES])
@pytest.mark.parametrize("value", ["2", "yes", "forward,backward", ","])
def test_a_bad_value_names_the_variable_and_the_passes(name, parse, allowed, value):
    with pytest.raises(ValueError, match=f"{name} must be 0, 1, all or a comma-separated "
                                         f"subset of {', '.join(sorted(allowed))}"):
        parse(value)


def test_all_off_by_default():
    """Unless the environment set them (the test runs do not)."""
    assert _env.TRITON_STATIONARY == _env.TRITON_BATCHED == _env.TRITON_CLUSTER == frozenset()


@pytest.mark.skipif(not hasattr(torch.ops.condconv, "cuda_pointwise_cluster"),
                    reason="the C++ extension did not load")
def test_cuda_cluster_switch():
    """1 (ldmatrix and mma.sync) by default; the op sets 0, 1, 2 or 3 and returns the setting
    (3, wgmma, only where the extension has it: a build without CUDA, or one for sm_90a; else an
    error naming the build it needs), and refuses another value naming the modes;
    CONDCONV_CUDA_CLUSTER=0, wmma or wgmma in the environment sets 0, 2 or 3 as the package
    loads; a value it does not know is an error naming the variable."""
    op = torch.ops.condconv.cuda_pointwise_cluster
    assert _env.CUDA_CLUSTER == 1 and op() == 1
    try:
        for mode in (0, 2, 1):
            assert op(mode) == mode and op() == mode
        with pytest.raises(RuntimeError, match="mode must be 0 .off., 1 .ldmatrix and mma.sync., "
                                               "2 .wmma. or 3 .wgmma., got 4"):
            op(4)
        assert op() == 1
        # Without CUDA kernels the switch has nothing to refuse; with them, mode 3 is there only
        # in a build for sm_90a, and the refusal names it.
        has_wgmma = True
        try:
            assert op(3) == 3 and op() == 3
        except RuntimeError as exc:
            assert torch._C._dispatch_has_kernel_for_dispatch_key("condconv::native_forward",
                                                                  "CUDA")
            assert "mode 3 (wgmma) needs the extension built for sm_90a" in str(exc)
            assert op() == 1
            has_wgmma = False
    finally:
        op(1)
    assert [_env.cluster_mode(v) for v in ("0", "1", " WMMA ", "wgmma", "")] == [0, 1, 2, 3, 1]
    with pytest.raises(ValueError, match="CONDCONV_CUDA_CLUSTER must be one of 0, 1, wmma, wgmma"):
        _env.cluster_mode("yes")
    read = "import torch, condconv_kernels; print(torch.ops.condconv.cuda_pointwise_cluster())"
    values = (("0", "0"), ("wmma", "2"), ("1", "1"), ("", "1")) + ((("wgmma", "3"),) if has_wgmma else ())
    for value, want in values:
        env = {**os.environ, "CONDCONV_CUDA_CLUSTER": value}
        got = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert got == want, (value, got)


@pytest.mark.skipif(not hasattr(torch.ops.condconv, "cuda_pointwise_kgrad"),
                    reason="the C++ extension did not load")
def test_cuda_kgrad_switch():
    """Off by default; the op sets 0 or 1 and returns the setting, and refuses another value;
    CONDCONV_CUDA_KGRAD=1 in the environment turns it on as the package loads; a value it does
    not know is an error naming the variable."""
    op = torch.ops.condconv.cuda_pointwise_kgrad
    assert _env.CUDA_KGRAD == 0 and op() == 0
    try:
        assert op(1) == 1 and op() == 1
        with pytest.raises(RuntimeError, match="mode must be 0 .off. or 1 .on., got 2"):
            op(2)
        assert op() == 1
    finally:
        op(0)
    assert [_env.kgrad_mode(v) for v in ("0", " 1 ", "")] == [0, 1, 0]
    with pytest.raises(ValueError, match="CONDCONV_CUDA_KGRAD must be 0 or 1"):
        _env.kgrad_mode("on")
    read = "import torch, condconv_kernels; print(torch.ops.condconv.cuda_pointwise_kgrad())"
    for value, want in (("1", "1"), ("0", "0")):
        env = {**os.environ, "CONDCONV_CUDA_KGRAD": value}
        got = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert got == want, (value, got)
