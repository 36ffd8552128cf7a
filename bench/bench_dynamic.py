"""DynamicConv2d and ODConv2d layers, fused against the grouped-convolution implementation every
public version of them uses, at ResNet-18 3x3 and MobileNetV2 shapes.

    python bench/bench_dynamic.py [--batch 8] [--experts 4] [--backward] [--device cpu]
                                  [--amp bfloat16] [--channels-last] [--first N]
                                  [--out bench/results/NAME.md]

Both variants run the same layer object (the same attention module and parameters); they differ
in the convolution only:

- ``fused``: the layer as it is (condconv2d with the attentions as routing and per-example
  scales, on the device's fused backend);
- ``grouped``: the papers' reference formulation: the K mixed kernels (ODConv: times the spatial
  attention) materialised, x times the channel attention, one grouped convolution with B x
  groups groups over the batch viewed as one image, the output times the filter attention.

and a third column bounds what any implementation can reach: ``static``, one ordinary
convolution of the same shape (the layer's first kernel, no attention), whose time is the
floor of the layer's convolution; ``grouped / static`` near 1 means the grouped form already
runs at convolution speed there, and no fused kernel can be much faster than it.

Prints a markdown table of median milliseconds and the speedup fused / grouped per layer and
kind, geomean last, all measured in this run; with ``--out``, also the numbers (JSON) and a
plot (PNG) beside it: per layer, the fused layer's speedup over the grouped form for each kind
against the most any implementation could reach (the grouped form over the static
convolution). ``--amp``: both under autocast (the fused layers
then run in that dtype with their attentions, the scales, in float32), as a GPU trains.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F

from condconv_kernels.cli import parser
from condconv_kernels.nn import DynamicConv2d, ODConv2d
from condconv_kernels.profile import machine_info, time_callable
from condconv_kernels.profile.tables import geomean, header, machine_line, row, write_result
from condconv_kernels.profile.timing import reexec_with_stable_malloc

# (name, in, out, kernel, stride, groups, input side): ResNet-18's 3x3 convolutions and
# MobileNetV2's depthwise 3x3 and pointwise 1x1 layers at 224x224, then ResNet-18's strided 3x3
# (its grad_x runs phase by phase).
SHAPES = [
    ("resnet.layer1.3x3", 64, 64, 3, 1, 1, 56),
    ("resnet.layer2.3x3", 128, 128, 3, 1, 1, 28),
    ("resnet.layer3.3x3", 256, 256, 3, 1, 1, 14),
    ("resnet.layer4.3x3", 512, 512, 3, 1, 1, 7),
    ("mbv2.b2.dw3", 96, 96, 3, 2, 96, 112),
    ("mbv2.b4.dw3", 192, 192, 3, 1, 192, 28),
    ("mbv2.b11.dw3", 576, 576, 3, 1, 576, 14),
    ("mbv2.b4.project", 192, 32, 1, 1, 1, 28),
    ("mbv2.b11.expand", 96, 576, 1, 1, 1, 14),
    ("mbv2.b16.project", 960, 160, 1, 1, 1, 7),
    ("resnet.layer2.0.3x3s2", 64, 128, 3, 2, 1, 56),  # last: the rows before keep their order
]


def grouped_forward(layer, x):
    """The layer's output through the materialised-kernel grouped convolution."""
    B, C, H, W = x.shape
    k = layer.kernel_size
    if isinstance(layer, DynamicConv2d):
        pi = layer.attention(x)
        kernels = (pi @ layer.weight.flatten(1)).view(-1, C // layer.groups, *k)
        bias = (pi @ layer.bias).flatten() if layer.bias is not None else None
        out = F.conv2d(x.reshape(1, B * C, H, W), kernels, bias, layer.stride, layer.padding,
                       layer.dilation, layer.groups * B)
        return out.view(B, -1, out.shape[-2], out.shape[-1])
    kernel_att, channel, filt, spatial = layer.attention(x)
    weight = layer.weight.unsqueeze(0)
    if spatial is not None:
        weight = weight * spatial.view(B, 1, 1, 1, *k)
    kernels = (weight * kernel_att.view(B, -1, 1, 1, 1, 1)).sum(1)
    kernels = kernels.reshape(-1, C // layer.groups, *k)
    xs = (x * channel.view(B, C, 1, 1)).reshape(1, B * C, H, W)
    out = F.conv2d(xs, kernels, None, layer.stride, layer.padding, layer.dilation,
                   layer.groups * B)
    out = out.view(B, -1, out.shape[-2], out.shape[-1])
    return out if filt is None else out * filt.view(B, -1, 1, 1)


def plot(record, path: str, title: str) -> bool:
    """The speedups of ``record`` (main's JSON record) as a bar chart in ``path``; False where
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = record["layers"]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(layers)), 4.6))
    xs = range(len(layers))
    for i, (kind, label, color) in enumerate((("dynamic", "DynamicConv2d", "tab:blue"),
                                              ("odconv", "ODConv2d", "tab:orange"))):
        speedup = [r["ms"][kind + ":grouped"] / r["ms"][kind + ":fused"] for r in layers]
        bound = [r["ms"][kind + ":grouped"] / r["ms"]["static"] for r in layers]
        at = [x + (i - 0.5) * 0.38 for x in xs]
        ax.bar(at, speedup, 0.38, color=color, label=f"{label}: fused over grouped")
        ax.scatter(at, bound, marker="_", s=220, color="black", zorder=3,
                   label="grouped over one static convolution (the most reachable)"
                   if i == 0 else None)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [r["layer"] for r in layers], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("speedup (x, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _autocast(forward, x, amp):
    with amp:
        return forward(x)


def _step(forward, x, params, backward):
    if not backward:
        def run():
            with torch.no_grad():
                forward(x)
        return run

    def run_backward():
        out = forward(x)
        torch.autograd.grad(out, [x] + params, torch.ones_like(out))
    return run_backward


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=8, help="The batch size.")
    p.add_argument("--experts", type=int, default=4, help="Kernels per layer (K, kernel_num).")
    p.add_argument("--device", default="cpu", help="Where to run: cpu or cuda.")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="The dtype of the layers and their input.")
    p.add_argument("--backward", action="store_true", help="Time forward + backward.")
    p.add_argument("--amp", choices=["bfloat16", "float16"],
                   help="Run under autocast to this dtype (layers and input stay --dtype).")
    p.add_argument("--channels-last", action="store_true", help="Use channels_last inputs.")
    p.add_argument("--first", type=int, help="Only the first N shapes (quick checks).")
    p.add_argument("--min-run-time", type=float, default=0.3,
                   help="Seconds of timed calls per measurement.")
    p.add_argument("--out", help="Write the table (markdown) and every number (JSON beside it).")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows, record = [], []
    amp = (torch.autocast(torch.device(args.device).type, getattr(torch, args.amp))
           if args.amp else contextlib.nullcontext())
    for name, cin, cout, k, stride, groups, side in SHAPES[:args.first]:
        x = torch.randn(args.batch, cin, side, side, device=args.device, dtype=dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(args.backward)
        cells = [name, f"{cin}->{cout} k{k} s{stride} g{groups} {side}x{side}"]
        times = {}
        for kind, make in (("dynamic", lambda: DynamicConv2d(cin, cout, k, stride=stride,
                                                             padding=k // 2, groups=groups,
                                                             K=args.experts)),
                           ("odconv", lambda: ODConv2d(cin, cout, k, stride=stride,
                                                       padding=k // 2, groups=groups,
                                                       kernel_num=args.experts))):
            layer = make().to(args.device, dtype).eval()
            params = list(layer.parameters())
            with torch.no_grad(), amp:
                tol = 1e-4 if args.amp is None else 5e-2
                torch.testing.assert_close(layer(x).float(), grouped_forward(layer, x).float(),
                                           rtol=tol, atol=tol)
            grouped = (lambda t, m=layer: grouped_forward(m, t))
            for variant, forward in (("fused", layer), ("grouped", grouped)):
                if args.amp:
                    forward = (lambda t, f=forward: _autocast(f, t, amp))
                fn = _step(forward, x, params, args.backward)
                times[f"{kind}:{variant}"] = time_callable(fn, args.device,
                                                           args.min_run_time).median_ms
            cells += [f"{times[kind + ':fused']:.3f}", f"{times[kind + ':grouped']:.3f}",
                      f"{times[kind + ':grouped'] / times[kind + ':fused']:.2f}x"]
        static = torch.nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups).to(args.device,
                                                                                  dtype)
        if args.amp:
            static_forward = (lambda t, f=static: _autocast(f, t, amp))
        else:
            static_forward = static
        times["static"] = time_callable(_step(static_forward, x, list(static.parameters()),
                                              args.backward),
                                        args.device, args.min_run_time).median_ms
        cells += [f"{times['static']:.3f}",
                  f"{times['dynamic:grouped'] / times['static']:.2f}x",
                  f"{times['odconv:grouped'] / times['static']:.2f}x"]
        rows.append(cells)
        record.append({"layer": name, "shape": cells[1], "ms": times})
        print(f"{name}: done", file=sys.stderr)
    geo = ["geomean", ""]
    for kind in ("dynamic", "odconv"):
        fused = [r["ms"][kind + ":fused"] for r in record]
        grouped = [r["ms"][kind + ":grouped"] for r in record]
        geo += [f"{geomean(fused):.3f}", f"{geomean(grouped):.3f}",
                f"{geomean([g / f for f, g in zip(fused, grouped)]):.2f}x"]
    static = [r["ms"]["static"] for r in record]
    geo += [f"{geomean(static):.3f}"] + [
        f"{geomean([r['ms'][kind + ':grouped'] / r['ms']['static'] for r in record]):.2f}x"
        for kind in ("dynamic", "odconv")]
    mode = "forward+backward" if args.backward else "forward"
    precision = args.dtype + (f", autocast {args.amp}" if args.amp else "")
    layout = ", channels_last" if args.channels_last else ""
    lines = [f"DynamicConv2d and ODConv2d layers, batch {args.batch}, K={args.experts}, "
             f"{precision}{layout}, {args.device}, {mode}, median ms", ""]
    lines += header(["layer", "shape", "DynamicConv fused", "DynamicConv grouped",
                     "DynamicConv speedup", "ODConv fused", "ODConv grouped", "ODConv speedup",
                     "static", "DynamicConv grouped / static", "ODConv grouped / static"])
    lines += [row(r) for r in rows] + [row(geo), "", machine_line(machine_info())]
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = "python bench/bench_dynamic.py " + " ".join(argv if argv else sys.argv[1:])
        result = {"machine": machine_info(), "batch": args.batch, "experts": args.experts,
                  "mode": mode, "layers": record}
        write_result(args.out, table, command, result)
        png = os.path.splitext(args.out)[0] + ".png"
        if not plot(result, png, lines[0]):
            print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    reexec_with_stable_malloc()
    main()
