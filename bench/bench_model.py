"""Whole-model latency: an EfficientNet-CondConv on each fused backend against the same model on
the reference backend (unfused baseline) and the same architecture without experts (static).

    python bench/bench_model.py [--model tf_efficientnet_cc_b0_8e] [--batch 1,8] [--device cpu]
                                [--dtype float32] [--amp bfloat16] [--channels-last]
                                [--backward] [--input-size N] [--timm NAME,NAME]
                                [--variants NAME,NAME] [--cuda-graph]
                                [--out bench/results/NAME.md]

Prints median milliseconds per batch, images per second, and the ratios to the unfused model
and to the static one, all measured in this run (variants interleaved). ``--timm`` adds timm's
own models (e.g. tf_efficientnet_cc_b0_8e, tf_efficientnet_b0) as variants, where timm is
installed (skipped with a note otherwise); ``--variants`` may add ``fused:triton+batched``, the
triton backend with its experimental batched 1x1 passes on (``CONDCONV_TRITON_BATCHED``),
``fused:triton+batched-grad_x``, with its batched grad_x alone
(``CONDCONV_TRITON_BATCHED=grad_x``), ``fused:triton+kgrad``, with its experimental dense 1x1
kernel gradient in the accumulator's layout (``CONDCONV_TRITON_STATIONARY=kernel_grad``), and
``fused:triton+mix``, with its experimental 7x7 and 14x14 1x1 forward and grad_x mixing the
experts on the tensor cores (``CONDCONV_TRITON_STATIONARY=mix``), and ``fused:triton+cluster``,
with its 1x1 forward, grad_x and kernel gradient through the cuda backend's Hopper kernels
(``CONDCONV_TRITON_CLUSTER``; the clustered kernel ``CONDCONV_CUDA_CLUSTER`` names, the
kernel-gradient kernel switched on with the variant), each switched around
that variant's calls only (``--also`` times them beside the default variants). ``--cuda-graph``
captures each variant's call in a CUDA graph and times its replays: no host work per kernel,
so the numbers are the device's, as in a training loop under ``torch.cuda.graph`` (a variant
whose capture fails is left out, with a note).
"""
from __future__ import annotations

import sys

import torch

from condconv_kernels.cli import add_timing_arguments, parser
from condconv_kernels.profile.tables import header, machine_line, row, write_result
from condconv_kernels.profile.timing import (graphed_variants, reexec_with_stable_malloc,
                                             time_interleaved)
from condconv_kernels.profile.latency import SWITCHED_VARIANTS, model_variants


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default="tf_efficientnet_cc_b0_8e", help="The model to time.")
    p.add_argument("--batch", default="1,8", help="Comma-separated batch sizes.")
    add_timing_arguments(p, device="cpu", min_run_time=1.0,
                         backward="Time a training step's forward + backward instead.")
    p.add_argument("--amp", choices=["float16", "bfloat16"],
                   help="Run under torch.autocast with this dtype (parameters stay --dtype).")
    p.add_argument("--channels-last", action="store_true",
                   help="Make the model and the input channels_last.")
    p.add_argument("--timm", default="", help="Comma-separated timm model names to add.")
    p.add_argument("--variants", default="",
                   help="Comma-separated variants to time (static, unfused, fused:<backend>, "
                        f"timm:<name>, {', '.join(SWITCHED_VARIANTS)}: the triton backend with "
                        "an experimental path on, only when named); static is always timed. "
                        f"Default: all but {', '.join(SWITCHED_VARIANTS)}.")
    p.add_argument("--also", default="",
                   help=f"Comma-separated variants of {', '.join(SWITCHED_VARIANTS)} to time "
                        "beside the default ones (or beside --variants).")
    p.add_argument("--cuda-graph", action="store_true",
                   help="Time replays of each variant captured in a CUDA graph (CUDA only).")
    p.add_argument("--out", help="Write the table (markdown) and every number (JSON beside it).")
    args = p.parse_args(argv)
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        p.error("argument --cuda-graph: needs --device cuda")
    also = {v for v in args.also.split(",") if v}
    if also - set(SWITCHED_VARIANTS):
        p.error(f"argument --also: unknown {sorted(also - set(SWITCHED_VARIANTS))}; have "
                f"{sorted(SWITCHED_VARIANTS)}")
    mode = "forward+backward" if args.backward else "forward"
    if args.cuda_graph:
        mode += ", CUDA graph replays"
    precision = args.dtype + (f", autocast {args.amp}" if args.amp else "")
    layout = ", channels_last" if args.channels_last else ""
    timm_models = [t for t in args.timm.split(",") if t]
    notes = []
    if timm_models:
        try:
            import timm  # noqa: F401
        except ImportError as exc:
            notes.append(f"timm variants {timm_models} skipped: timm does not import ({exc})")
            timm_models = []
    lines = [f"{args.model}, {precision}{layout}, {mode}, median ms", "",
             *header(["batch", "variant", "ms", "images/s", "/ unfused", "/ static"])]
    for batch in [int(b) for b in args.batch.split(",")]:
        chosen = {v for v in args.variants.split(",") if v} | {"static"}
        fns = model_variants(args.model, batch, args.device, getattr(torch, args.dtype),
                             args.backward, amp=getattr(torch, args.amp) if args.amp else None,
                             channels_last=args.channels_last, input_size=args.input_size,
                             timm_models=timm_models,
                             switched=[v for v in SWITCHED_VARIANTS if v in chosen | also])
        if args.variants:
            unknown = chosen - set(fns)
            if unknown:
                p.error(f"argument --variants: unknown {sorted(unknown)}; have {sorted(fns)}")
            fns = {name: fn for name, fn in fns.items() if name in chosen | also}
        if args.cuda_graph:
            fns = graphed_variants(fns, notes)
        t = {name: m.median_ms for name, m in
             time_interleaved(fns, args.device, args.min_run_time).items()}
        for name, ms in t.items():
            lines.append(row([batch, name, f"{ms:.2f}", f"{batch / ms * 1e3:.0f}",
                              f"{ms / t['unfused']:.2f}" if "unfused" in t else "",
                              f"{ms / t['static']:.2f}"]))
    lines += [""] + notes + [machine_line()]
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_result(args.out, table,
                     f"python bench/bench_model.py {' '.join(argv or sys.argv[1:])}")


if __name__ == "__main__":
    reexec_with_stable_malloc()
    main()
