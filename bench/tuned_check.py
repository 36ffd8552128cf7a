"""The autotuned launches checked on the model's layers, as a benchmark runs them (the GPU tests
run with autotuning off, one configuration each).

    python bench/tuned_check.py [--device cuda] [--batch 256] [--dtype bfloat16]
                                [--backend triton] [--layers s6.b1.expand,...] [--bias]
                                [--out FILE.md]

Each layer's forward and backward (grad_x, grad_routing, grad_weight; grad_bias with
``--bias``: the model's layers have none) run three times on the same inputs (x in
channels_last) with the backend as it ships: on the triton backend the first call tunes (or
reads the tuned configuration from Triton's cache), the second launches the tuned kernels
through Triton (directly where Triton has compiled for those arguments:
``_config.TunedKernel``) and keeps the call's plan, the third replays it
(``triton/_replay.py``).
A fourth call on new inputs (replayed too). Per call, the largest
difference of any result from the reference backend in float32 (PyTorch's grouped convolution
on the same values), against that result's scale; then whether the third call is bitwise the
second (the same kernels and configurations on the same inputs: a difference is a launch that
got other arguments). A difference above the dtype's tolerance (2**-6 of the scale in
float16/bfloat16, 1e-4 in float32), or a third call unlike the second, prints FAIL and the
script exits 1.
"""
from __future__ import annotations

import sys

import torch

from condconv_kernels.cli import parser
from gpu_profile import add_device_arguments, layer_inputs, pick_layers, print_table

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2 ** -6, torch.bfloat16: 2 ** -6}
DEFAULT_LAYERS = "s6.b1.expand,s6.b1.project,s5.b1.project,s5.b1.dw,s6.b0.dw"


def forward_backward(layer, backend, inputs, grad_out):
    """(out, grad_x, grad_routing, grad_weight[, grad_bias]) of one call of ``backend`` on
    ``inputs`` (x, routing, weight, bias or None)."""
    import condconv_kernels as cc
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    out = cc.condconv2d(*leaves, layer.stride, layer.padding, 1, layer.groups, backend=backend)
    return (out.detach(),) + torch.autograd.grad(out, [t for t in leaves if t is not None],
                                                 grad_out)


def worst(results, truth) -> float:
    """The largest |result - truth| over the results, each against its truth's largest value."""
    return max(((r.double() - t.double()).abs().max() / t.double().abs().max().clamp_min(1e-30))
               .item() for r, t in zip(results, truth))


def main(argv=None) -> bool:
    p = parser(__doc__)
    add_device_arguments(p, "The backend to check (triton on the GPU).")
    p.add_argument("--layers", default=DEFAULT_LAYERS, help="Comma-separated layer names.")
    p.add_argument("--bias", action="store_true", help="Give the layers a bias.")
    p.add_argument("--out", help="Write the table (markdown) and the numbers (JSON beside it).")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tolerance = TOLERANCE[dtype]
    g = torch.Generator().manual_seed(0)
    rows, record, failed = [], [], False
    def draw(layer):
        """Fresh inputs and grad_out of one layer, and the reference's results on them."""
        inputs = layer_inputs(layer, args.batch, args.device, dtype, g)
        if not args.bias:
            inputs = inputs[:3] + (None,)
        grad_out = torch.randn(args.batch, layer.cout, *layer.out_hw, generator=g).contiguous(
            memory_format=torch.channels_last).to(args.device, dtype)
        truth = forward_backward(layer, "reference",
                                 [None if t is None else t.float() for t in inputs],
                                 grad_out.float())
        return inputs, grad_out, truth
    for layer in pick_layers(p, args.layers):
        inputs, grad_out, truth = draw(layer)
        calls = [forward_backward(layer, args.backend, inputs, grad_out) for _ in range(3)]
        errors = [worst(c, truth) for c in calls]
        # A fourth call, replayed too, on new values (new buffers, new inputs' addresses)
        inputs, grad_out, truth = draw(layer)
        errors.append(worst(forward_backward(layer, args.backend, inputs, grad_out), truth))
        same = all(torch.equal(a, b) for a, b in zip(calls[1], calls[2]))
        ok = max(errors) <= tolerance and same
        failed |= not ok
        rows.append([layer.name, layer.describe()] + [f"{e:.1e}" for e in errors]
                    + ["yes" if same else "NO", "ok" if ok else "FAIL"])
        record.append({"layer": layer.name, "errors": errors, "third_is_second": same})
        print(f"{layer.name}: {'ok' if ok else 'FAIL'}", file=sys.stderr)
    print_table(f"Tuned launches against the reference, batch {args.batch}, {args.dtype}, "
                f"channels_last, {'with' if args.bias else 'without'} a bias, backend "
                f"{args.backend}, {args.device}: the largest difference of out and the "
                f"gradients, against each one's scale (tolerance {tolerance:.1e})",
                ["layer", "shape", "call 1 (tunes)", "call 2 (Triton's launch)",
                 "call 3 (replayed)", "call 4 (new inputs)", "call 3 bitwise call 2",
                 "verdict"],
                rows, record, args.out, "tuned_check.py", argv)
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
