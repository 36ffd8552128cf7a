"""Where the fused layers' time goes: host (Python and launches) against device (each kernel),
for a few CondConv layers of tf_efficientnet_cc_b0_8e and for the whole model.

    python bench/gpu_profile.py [--device cuda] [--batch 256] [--layers s5.b0.expand,...]
                                [--backend triton] [--out FILE.md]

Per layer, forward and forward+backward, fused against the static convolution of the same
shape: host microseconds per call (back-to-back calls timed on the host clock without
synchronising, the time the host needs to issue one call), device microseconds per call (the
sum of the kernels' times under torch.profiler), and the kernels each call launches with their
time. Then the host-side functions that take the most time per fused call (cProfile), the
configurations the autotuner chose, and, for the whole model, device time per image against
wall time, with the kernels that take the most. A call whose host time exceeds its device
time is bound by the host: the device waits between kernels.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
import traceback

import torch

from condconv_kernels.cli import parser
from condconv_kernels.profile import efficientnet_cc_b0_layers
from condconv_kernels.profile.tables import machine_line
from condconv_kernels.profile.latency import layer_variants, model_variants
from condconv_kernels.profile.timing import reexec_with_stable_malloc

DEFAULT_LAYERS = "s5.b0.expand,s5.b1.dw,s6.b0.dw,s6.b1.expand,s7.b0.project"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def host_us(fn, device: str, calls: int = 50) -> float:
    """Microseconds of host time per call over back-to-back calls, not waiting for the device
    (the queue of a few hundred launches does not fill at these counts)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    _sync(device)
    return (t1 - t0) / calls * 1e6


def device_kernels(fn, device: str, calls: int = 10):
    """(total device microseconds per call, [(kernel name, launches per call, us per call)])
    from torch.profiler, the kernels alone (no annotated ranges); on the CPU (dry run) the
    operators' own CPU time stands in."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    rows = []
    averages = prof.key_averages()
    # record_function ranges (the op's "condconv::condconv2d") come back on the device too, as
    # annotations spanning the kernels they launch: counting them counted those kernels twice.
    ranges = {avg.key for avg in averages if getattr(avg, "is_user_annotation", False)}
    for avg in averages:
        if cuda:
            if avg.device_type != DeviceType.CUDA or avg.key in ranges:
                continue
            us = getattr(avg, "self_device_time_total", None)
            if us is None:
                us = avg.self_cuda_time_total
        else:
            us = avg.self_cpu_time_total
        if us > 0:
            rows.append((avg.key, avg.count / calls, us / calls))
    rows.sort(key=lambda r: -r[2])
    if not cuda:
        rows = rows[:8]
    return sum(r[2] for r in rows), rows


def host_functions(fn, calls: int = 100, top: int = 14) -> str:
    """The functions with the most host time per call (cProfile, tottime)."""
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append((tt / calls * 1e6, ct / calls * 1e6, nc / calls,
                     f"{os.path.basename(file)}:{line}({name})"))
    rows.sort(key=lambda r: -r[0])
    lines = ["| function | calls per call | own us per call | with callees us |",
             "|---|---|---|---|"]
    lines += [f"| {r[3]} | {r[2]:.1f} | {r[0]:.1f} | {r[1]:.1f} |" for r in rows[:top]]
    return "\n".join(lines)


def short(name: str, width: int = 70) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[:width - 3] + "..."


def tuned_configs() -> str:
    """The autotuner's choice per kernel and key (the triton backend, where it autotunes)."""
    try:
        from condconv_kernels.triton import dense, depthwise
    except Exception as exc:  # noqa: BLE001
        return f"(triton not importable: {exc})"
    lines = []
    for module in (dense, depthwise):
        for name in dir(module):
            kernel = getattr(module, name)
            cache = getattr(kernel, "cache", None)
            if name.endswith("_kernel") and isinstance(cache, dict):
                for key, config in cache.items():
                    lines.append(f"- {name} {tuple(key)[:8]}: {config}")
    return "\n".join(lines) or "(no autotuned launches)"


def section(title: str, body) -> None:
    print(f"\n## {title}\n", flush=True)
    try:
        body()
    except Exception:  # noqa: BLE001  (one failed section must not lose the others)
        print("```\n" + traceback.format_exc()[-2000:] + "```")


def pick_layers(p, names: str, kernel=None):
    """The layers of tf_efficientnet_cc_b0_8e named in ``names`` (comma-separated), in that
    order; a parser error for a name the model lacks (or, with ``kernel``, whose kernel is of
    another size)."""
    layers = {layer.name: layer for layer in efficientnet_cc_b0_layers(8)}
    wanted = [name for name in names.split(",") if name]
    bad = [n for n in wanted if n not in layers or kernel not in (None, layers[n].kernel)]
    if bad:
        size = f" {kernel}x{kernel}" if kernel else ""
        p.error(f"not{size} layers of the model: {bad}; choose from {sorted(layers)}")
    return [layers[n] for n in wanted]


def layer_inputs(layer, batch: int, device: str, dtype, generator):
    """x (channels_last), routing (float32), weight (scaled by 1/sqrt(fan-in)) and bias of one
    layer, random from ``generator``."""
    x = torch.randn(batch, layer.cin, layer.height, layer.width, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last).to(device, dtype)
    routing = torch.rand(batch, layer.experts, generator=generator).to(device)
    fan_in = layer.cin // layer.groups * layer.kernel ** 2
    weight = (torch.randn(layer.experts, layer.cout, layer.cin // layer.groups, layer.kernel,
                          layer.kernel, generator=generator) / fan_in ** 0.5).to(device, dtype)
    bias = (torch.randn(layer.experts, layer.cout, generator=generator) * 0.1).to(device, dtype)
    return x, routing, weight, bias


def print_table(title: str, columns, rows, record, out, script: str, argv,
                echo: bool = True) -> None:
    """Prints a per-layer table (a title line, the columns, the rows, the machine) and, with
    ``out``, writes it and ``record`` (JSON beside it) with the command that made them;
    ``echo=False`` only writes (a partial table, kept if a time limit cuts the run)."""
    from condconv_kernels.profile import machine_info
    from condconv_kernels.profile.tables import header, row, write_result
    lines = [title, ""] + header(columns) + [row(r) for r in rows]
    table = "\n".join(lines + ["", machine_line(machine_info())])
    if echo:
        print(table)
    if out:
        command = f"python bench/{script} " + " ".join(argv if argv else sys.argv[1:])
        write_result(out, table, command, {"machine": machine_info(), "layers": record})


def add_device_arguments(p, backend_help: str) -> None:
    """--device, --batch, --dtype and --backend, as the GPU kit's profiling scripts take them."""
    p.add_argument("--device", default="cuda", help="Where to run: cuda, or cpu for a dry run.")
    p.add_argument("--batch", type=int, default=256, help="The batch size.")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="The dtype of inputs and weights.")
    p.add_argument("--backend", default="triton", help=backend_help)


def main(argv=None):
    p = parser(__doc__)
    add_device_arguments(p, "The fused backend to profile.")
    p.add_argument("--layers", default=DEFAULT_LAYERS, help="Comma-separated layer names.")
    p.add_argument("--model-batch", type=int, default=256,
                   help="The batch of the whole-model profile (0 leaves it out).")
    p.add_argument("--input-size", type=int, help="The model's image side (default its own).")
    p.add_argument("--out", help="Also write the report (markdown) to this file.")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    fused = f"fused:{args.backend}"
    wanted = args.layers.split(",")
    layers = [l for l in efficientnet_cc_b0_layers(8) if l.name in wanted]
    buffer = io.StringIO()

    class Tee:
        def write(self, s):
            sys.__stdout__.write(s)
            buffer.write(s)

        def flush(self):
            sys.__stdout__.flush()

    sys.stdout = Tee()
    print(f"# Host and device time, batch {args.batch}, {args.dtype}, channels_last, "
          f"backend {args.backend}\n")
    print(machine_line())
    for backward in (False, True):
        mode = "forward+backward" if backward else "forward"
        summary = ["| layer | variant | host us | device us | kernels per call |",
                   "|---|---|---|---|---|"]
        details = []
        for layer in layers:
            def one(layer=layer):
                fns = layer_variants(layer, args.batch, args.device, dtype, backward,
                                     channels_last=True)
                for name in ("static", fused):
                    fn = fns[name]
                    for _ in range(3):
                        fn()
                    host = host_us(fn, args.device)
                    total, rows = device_kernels(fn, args.device)
                    summary.append(f"| {layer.name} | {name} | {host:.1f} | {total:.1f} | "
                                   f"{sum(r[1] for r in rows):.1f} |")
                    details.append(f"\n{layer.name} {layer.describe()}, {name}, {mode}:\n\n"
                                   "| kernel | launches | us |\n|---|---|---|\n" +
                                   "\n".join(f"| {short(k)} | {n:.1f} | {us:.1f} |"
                                             for k, n, us in rows[:10]))
                    if name == fused and layer is layers[0]:
                        details.append(f"\nhost functions, {layer.name} {name} {mode}:\n\n"
                                       + host_functions(fn))
            try:
                one()
            except Exception:  # noqa: BLE001
                details.append(f"\n{layer.name}: failed\n```\n{traceback.format_exc()[-1500:]}```")
        section(f"Layers, {mode}", lambda: print("\n".join(summary + details)))
    section("Autotuned configurations", lambda: print(tuned_configs()))

    def model(backward):
        fns = model_variants("tf_efficientnet_cc_b0_8e", args.model_batch, args.device,
                             torch.float32, backward, amp=dtype, channels_last=True,
                             input_size=args.input_size)
        lines = ["| variant | wall ms | device ms | host ms (no sync) |", "|---|---|---|---|"]
        top = {}
        for name in ("static", fused):
            fn = fns[name]
            for _ in range(2):
                fn()
            _sync(args.device)
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            _sync(args.device)
            wall = (time.perf_counter() - t0) / 3 * 1e3
            host = host_us(fn, args.device, calls=3) / 1e3
            total, rows = device_kernels(fn, args.device, calls=2)
            lines.append(f"| {name} | {wall:.2f} | {total / 1e3:.2f} | {host:.2f} |")
            top[name] = rows
        print("\n".join(lines))
        for name, rows in top.items():
            print(f"\n{name}: the kernels with the most device time\n\n"
                  "| kernel | launches | ms |\n|---|---|---|\n" +
                  "\n".join(f"| {short(k)} | {n:.0f} | {us / 1e3:.3f} |" for k, n, us in rows[:12]))
    if args.model_batch:
        for backward in (False, True):
            section(f"Whole model, batch {args.model_batch}, autocast {args.dtype}, "
                    f"{'training step' if backward else 'inference'}",
                    lambda backward=backward: model(backward))
    sys.stdout = sys.__stdout__
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(buffer.getvalue())


if __name__ == "__main__":
    reexec_with_stable_malloc()
    main()
