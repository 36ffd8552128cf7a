"""Every CUDA backend against the float64 ground truth (computed on the CPU): forward and all
gradients, float32 / float16 / bfloat16, contiguous / channels_last / sliced, batch up to 256.
Runs where CUDA is available (skipped on CPU-only machines)."""
import pytest
import torch

import condconv_kernels as cc
from conftest import CASES, CASES_BY_NAME, LAYOUTS, assert_close, ground_truth, make_inputs

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
CUDA_BACKENDS = cc.available_backends("cuda") if CUDA else []


def _run(case, inputs, backend, grad_out):
    leaves = [t.detach().cuda().requires_grad_(True) if t is not None else None for t in inputs]
    out = cc.condconv2d(*leaves, stride=case.stride, padding=case.padding,
                        dilation=case.dilation, groups=case.groups, backend=backend)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.cuda())
    return out.cpu(), [g.cpu() for g in grads]


def _check(case, backend, dtype, layout, factor):
    inputs = make_inputs(case, dtype, layout, seed=1)
    truth, _ = ground_truth(case, inputs)
    grad_out = torch.randn(truth.shape, dtype=torch.float64).to(dtype)
    out, grads = _run(case, inputs, backend, grad_out)
    truth, truth_grads = ground_truth(case, inputs, grad_out)
    # PyTorch's own computation in this precision, on the GPU (cuDNN, TF32 as configured).
    same, same_grads = ground_truth(case, [t.cuda() if t is not None else None for t in inputs],
                                    grad_out.cuda(), dtype=dtype)
    assert_close(out, truth, same.cpu(), f"{backend} out", factor)
    for g, t, s in zip(grads, truth_grads, same_grads):
        assert_close(g, t, s.cpu(), f"{backend} grad", factor)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_matrix(case, layout, dtype, backend):
    _check(case, backend, dtype, layout, factor=3.0 if dtype == torch.float32 else 4.0)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", ["k1", "dw5_s2_same_e8", "k3_s2_asym"])
def test_cuda_batch_256(name, backend):
    case = CASES_BY_NAME[name]
    case = type(case)(**{**case.__dict__, "B": 256})
    _check(case, backend, torch.float16, "channels_last", factor=4.0)
