"""Property-based tests: random valid configurations, every available CPU backend against the
float64 ground truth (the per-example loop with PyTorch's autograd), forward and all gradients.

CONDCONV_FUZZ_EXAMPLES sets the number of examples per compiled backend (default 300; 50 for a
backend running in Triton's interpreter, CONDCONV_FUZZ_INTERPRETED_EXAMPLES), CONDCONV_FUZZ_SEED
the seed (fixed unless "random", as `make fuzz` sets it; printed, so a failure reproduces with
it).
"""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import (CPU_BACKENDS, INTERPRETED, Case, assert_close, fuzz_seed,  # noqa: E402
                      ground_truth, make_inputs, run_op)

EXAMPLES = int(os.environ.get("CONDCONV_FUZZ_EXAMPLES", "300"))
INTERPRETED_EXAMPLES = int(os.environ.get("CONDCONV_FUZZ_INTERPRETED_EXAMPLES", "50"))
SEED = fuzz_seed("CONDCONV_FUZZ_SEED")
print(f"condconv fuzz: seed {SEED} (CONDCONV_FUZZ_SEED={SEED} reproduces), {EXAMPLES} examples")


@st.composite
def cases(draw):
    groups_kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if groups_kind == "depthwise":
        cin = draw(st.integers(1, 6))
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        groups = 1 if groups_kind == "dense" else draw(st.integers(2, 3))
        cin = groups * draw(st.integers(1, 3))
        cout = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(st.integers(0, 3), st.tuples(*[st.integers(0, 3)] * 4),
                             st.sampled_from(["same", "valid"])))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    pad4 = ((padding,) * 4 if isinstance(padding, int) else padding
            if isinstance(padding, tuple) else (kernel[0] * dilation[0],) * 4
            if padding == "same" else (0,) * 4)
    hypothesis.assume((kernel[0] - 1) * dilation[0] + 1 <= H + pad4[0] + pad4[1])
    hypothesis.assume((kernel[1] - 1) * dilation[1] + 1 <= W + pad4[2] + pad4[3])
    return Case("fuzz", B=draw(st.integers(1, 3)), cin=cin, cout=cout, H=H, W=W, kernel=kernel,
                stride=stride, dilation=dilation, groups=groups, bias=draw(st.booleans()),
                E=draw(st.integers(1, 4)), padding=padding)


def _fuzz(backend):
    @seed(SEED)
    @settings(max_examples=INTERPRETED_EXAMPLES if backend in INTERPRETED else EXAMPLES,
              deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=cases(), dtype=st.sampled_from([torch.float64, torch.float32]),
           layout=st.sampled_from(["contiguous", "channels_last", "sliced"]),
           data_seed=st.integers(0, 2 ** 16))
    def check(case, dtype, layout, data_seed):
        inputs = make_inputs(case, dtype, layout, seed=data_seed)
        try:
            truth, _ = ground_truth(case, inputs)
        except RuntimeError:  # "same" can still leave a too-small input: the op must refuse too
            with pytest.raises(ValueError):
                run_op(case, inputs, backend)
            return
        grad_out = torch.randn(truth.shape, dtype=torch.float64).to(dtype)
        out, grads = run_op(case, inputs, backend, grad_out)
        truth, truth_grads = ground_truth(case, inputs, grad_out)
        same = (None, [None] * 4)
        if dtype != torch.float64:
            same = ground_truth(case, inputs, grad_out, dtype=dtype)
        assert_close(out, truth, same[0], f"{case} out")
        for i, (g, t) in enumerate(zip(grads, truth_grads)):
            assert_close(g, t, same[1][i], f"{case} grad {i}")
    check()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_against_ground_truth(backend):
    _fuzz(backend)
