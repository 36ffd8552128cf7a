"""Host time of the op layer around a backend: condconv2d's eager path (an autograd.Function
around the backend) against the registered custom op (dispatcher, schema, autograd wrapper,
second argument check), with the backend's kernels replaced by stubs that only allocate
their outputs, so what is timed is the Python and dispatch work that runs on the host for every
call on the GPU. Runs on the CPU (the triton backend under TRITON_INTERPRET=1, never launched).

    python bench/bench_host_overhead.py [--calls 2000] [--out FILE.md]

Prints microseconds per call, inference and forward + backward, and the ratio.

With ``--dry-run`` it times the other half instead: the triton backend's own forward and
backward (its launchers, the autotuner, Triton's launch path), on a dense 1x1 and a depthwise
layer, with every kernel compiled for sm_90 and launched dry
(:mod:`condconv_kernels.triton.dry_run`; the first run compiles them, a minute or two). It
prints microseconds per call and the Triton launches each call makes.
"""
from __future__ import annotations

import os
import sys
import time

DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:  # the kernels are compiled and launched dry: no interpreter
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend "triton" take CPU tensors

import torch  # noqa: E402

import condconv_kernels as cc  # noqa: E402
from condconv_kernels import ops  # noqa: E402
from condconv_kernels.cli import parser  # noqa: E402
from condconv_kernels.profile.tables import header, machine_line, row, write_result  # noqa: E402


def _stub_forward(x, routing, weight, bias, stride, padding, dilation, groups, *scales):
    shape = cc._args.out_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, memory_format=cc._args.suggest_memory_format(x))


def _stub_backward(grad_out, x, routing, weight, bias, stride, padding, dilation, groups, mask,
                   *scales):
    mask = cc._args.backward_mask(mask, scales)
    return tuple(torch.empty_like(t) if m and t is not None else None
                 for t, m in zip((x, routing, weight, bias, *scales), mask))


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):  # the best of five rounds: the least disturbed by the machine
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--calls", type=int, default=2000, help="Calls per timed round.")
    p.add_argument("--out", help="Also write the table (markdown) to this file.")
    p.add_argument("--dry-run", action="store_true",
                   help="Time the triton backend's launchers and Triton's launch path, kernels "
                        "compiled for sm_90 and launched dry, instead of the op layer.")
    args = p.parse_args(argv)
    table = dry_run_table(args.calls) if args.dry_run else op_layer_table(args.calls)
    print(table)
    if args.out:
        write_result(args.out, table, "python bench/bench_host_overhead.py "
                     + " ".join(argv if argv else sys.argv[1:]))


def op_layer_table(calls: int) -> str:
    """The op layer's host time around a stubbed backend: custom op against eager path."""
    if "triton" not in cc.available_backends("cpu"):
        raise SystemExit("needs triton installed (its kernels are never launched)")
    ops._FORWARD["triton"], ops._BACKWARD["triton"] = _stub_forward, _stub_backward
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    routing, weight = torch.rand(2, 4), torch.randn(4, 8, 8, 1, 1)
    conv = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
    leaves = [t.detach().requires_grad_(True) for t in (x, routing, weight)]
    grad = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)

    def eager(*t):
        return cc.condconv2d(*t, None, backend="triton")

    def op(*t):
        return torch.ops.condconv.condconv2d(*t, None, *conv, "triton")

    rows = []
    for mode in ("inference", "forward + backward"):
        times = {}
        for name, call in (("op", op), ("eager", eager)):
            if mode == "inference":
                def fn(call=call):
                    with torch.no_grad():
                        call(x, routing, weight)
            else:
                def fn(call=call):
                    torch.autograd.grad(call(*leaves), leaves, grad)
            times[name] = per_call_us(fn, calls)
        rows.append(row([mode, f"{times['op']:.1f}", f"{times['eager']:.1f}",
                         f"{times['eager'] / times['op']:.2f}"]))
    return "\n".join(["Host microseconds per call of condconv2d (backend kernels stubbed)", "",
                       *header(["mode", "custom op", "eager path", "eager / op"]), *rows, "",
                       machine_line()])


# (name, Cin, Cout, kernel, groups, pixels a side) of the layers timed by dry_run_table: small
# tensors (the host's work does not depend on their size; torch's work on the CPU, standing for
# its launches on the GPU, would).
DRY_RUN_LAYERS = (("pw 1x1 16->16 @7x7", 16, 16, 1, 1, 7),
                  ("dw 5x5 16 @14x14", 16, 16, 5, 16, 14))


def dry_run_table(calls: int) -> str:
    """The triton backend's forward and backward host time per call, launched dry."""
    import triton

    from condconv_kernels import triton as backend
    from condconv_kernels.triton import dry_run

    dry_run.install()
    rows = []
    for name, cin, cout, k, groups, side in DRY_RUN_LAYERS:
        B, E = 8, 8
        x = torch.randn(B, cin, side, side, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        routing = torch.rand(B, E)
        weight = torch.randn(E, cout, cin // groups, k, k, dtype=torch.bfloat16)
        conv = ([1, 1], [k // 2] * 4, [1, 1], groups)
        grad = torch.randn(B, cout, side, side, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        passes = (("forward", lambda: backend.forward(x, routing, weight, None, *conv)),
                  ("backward", lambda: backend.backward(grad, x, routing, weight, None, *conv,
                                                        (True, True, True, False))))
        for pass_name, fn in passes:
            fn()  # compiles (the first time) and autotunes, dry
            dry_run.LAUNCHES.clear()
            fn()
            launches = sum(dry_run.LAUNCHES.values())
            rows.append(row([name, pass_name, f"{per_call_us(fn, calls):.1f}", str(launches)]))
    return "\n".join([
        "Host microseconds per call of the triton backend (kernels compiled for sm_90, launched "
        "dry; the op layer around it is the other table)", "",
        *header(["layer", "pass", "host us", "Triton launches"]), *rows, "",
        f"autotuning {'on' if backend._config.AUTOTUNE else 'off'}, triton {triton.__version__}",
        machine_line()])


if __name__ == "__main__":
    main()
