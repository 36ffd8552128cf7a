"""Swap the CondConv layers of a timm model for the fused ones and compare speed and outputs.

    python python/timm_swap.py [--model tf_efficientnet_cc_b0_8e] [--batch 8] [--device auto]

Needs timm. The swapped layers share the timm layers' parameters, so the timm model keeps its
state dict, optimizer and checkpoints; only the forward/backward computation changes.
"""
import copy

import torch

from condconv_kernels.cli import parser
from condconv_kernels.profile.timing import time_callable
from condconv_kernels.timm_compat import convert


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default="tf_efficientnet_cc_b0_8e",
                   help="A timm model with CondConv layers.")
    p.add_argument("--batch", type=int, default=8, help="The batch size of the comparison.")
    p.add_argument("--device", default="auto", help="Where to run: cpu, cuda, or auto (the GPU if any).")
    args = p.parse_args(argv)
    try:
        import timm
    except ImportError as err:
        raise SystemExit("timm_swap needs timm: pip install timm") from err
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    model = timm.create_model(args.model).eval().to(device)
    fused = convert(copy.deepcopy(model))
    side = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(args.batch, 3, side, side, device=device)
    with torch.no_grad():
        want, got = model(x), fused(x)
        err = ((got - want).norm() / want.norm()).item()
        t_timm = time_callable(lambda: model(x), device=device)
        t_fused = time_callable(lambda: fused(x), device=device)
    print(f"{args.model} batch {args.batch} on {device}: relative difference {err:.2e}")
    print(f"median latency: timm {t_timm.median_ms:.2f} ms, fused {t_fused.median_ms:.2f} ms, "
          f"speed-up {t_timm.median_ms / t_fused.median_ms:.2f}x")


if __name__ == "__main__":
    main()
