"""The three reference forms agree with each other and with independent computations."""
import pytest
import torch
import torch.nn.functional as F

from condconv_kernels import reference
from conftest import CASES, LAYOUTS, conv_args, make_inputs, max_err

FORMS = [reference.condconv2d_grouped, reference.condconv2d_unfold]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forms_agree(case, layout):
    x, routing, weight, bias = make_inputs(case, torch.float64, layout, seed=1)
    args = conv_args(case, x)
    loop = reference.condconv2d_loop(x, routing, weight, bias, *args)
    for form in FORMS:
        out = form(x, routing, weight, bias, *args)
        err = max_err(out, loop)
        print(f"{form.__name__}: {err:.2e}")
        assert out.shape == loop.shape and err < 1e-12


@pytest.mark.parametrize("case", CASES, ids=str)
def test_loop_matches_explicit_mixture(case):
    """conv2d is linear in the kernel: out = sum_e r[b, e] conv(x, W[e]) + mixed bias."""
    x, routing, weight, bias = make_inputs(case, torch.float64, seed=2)
    stride, pad, dilation, groups = conv_args(case, x)
    xp = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    per_expert = torch.stack([F.conv2d(xp, weight[e], None, stride, 0, dilation, groups)
                              for e in range(case.E)], 1)       # (B, E, Cout, Ho, Wo)
    expected = torch.einsum("be,bechw->bchw", routing, per_expert)
    if bias is not None:
        expected = expected + (routing @ bias)[:, :, None, None]
    out = reference.condconv2d_loop(x, routing, weight, bias, stride, pad, dilation, groups)
    assert max_err(out, expected) < 1e-12


def test_same_padding_matches_tensorflow_rule():
    """TF SAME: output ceil(n / s), total padding split with the extra pixel at the end."""
    from condconv_kernels._args import same_padding
    assert same_padding(224, 3, 2, 1) == (0, 1)
    assert same_padding(7, 5, 1, 1) == (2, 2)
    assert same_padding(13, 5, 2, 1) == (2, 2)
    assert same_padding(14, 5, 2, 1) == (1, 2)
    for n in range(5, 20):
        for k in (1, 3, 5):
            for s in (1, 2):
                before, after = same_padding(n, k, s, 1)
                out = (n + before + after - k) // s + 1
                assert out == -(-n // s) and after - before in (0, 1)


def test_backward_matches_autograd_of_baseline():
    """reference.backward (explicit) equals autograd through the grouped form."""
    case = CASES[5]
    x, routing, weight, bias = make_inputs(case, torch.float64, seed=3)
    args = conv_args(case, x)
    leaves = [t.clone().requires_grad_(True) for t in (x, routing, weight, bias)]
    out = reference.condconv2d_grouped(*leaves, *args)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, grad_out)
    got = reference.backward(grad_out, x, routing, weight, bias, *args, [True] * 4)
    for name, a, b in zip("x routing weight bias".split(), got, expected):
        assert max_err(a, b) < 1e-12, name
