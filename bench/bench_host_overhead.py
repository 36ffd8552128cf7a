"""Host time of the op layer around a backend: condconv2d's eager path (an autograd.Function
around the backend) against the registered custom op (dispatcher, schema, autograd wrapper,
second argument check), with the backend's kernels replaced by stubs that only allocate
their outputs, so what is timed is the Python and dispatch work that runs on the host for every
call on the GPU. Runs on the CPU (the triton backend under TRITON_INTERPRET=1, never launched).

    python bench/bench_host_overhead.py [--calls 2000] [--out FILE.md]

Prints microseconds per call, inference and forward + backward, and the ratio.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets backend "triton" take CPU tensors

import torch  # noqa: E402

import condconv_kernels as cc  # noqa: E402
from condconv_kernels import ops  # noqa: E402
from condconv_kernels.cli import parser  # noqa: E402
from condconv_kernels.profile.tables import header, machine_line, row, write_result  # noqa: E402


def _stub_forward(x, routing, weight, bias, stride, padding, dilation, groups):
    shape = cc._args.out_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, memory_format=cc._args.suggest_memory_format(x))


def _stub_backward(grad_out, x, routing, weight, bias, stride, padding, dilation, groups, mask):
    return tuple(torch.empty_like(t) if m and t is not None else None
                 for t, m in zip((x, routing, weight, bias), mask))


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
    args = p.parse_args(argv)
    if "triton" not in cc.available_backends("cpu"):
        p.error("needs triton installed (its kernels are never launched)")
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
            times[name] = per_call_us(fn, args.calls)
        rows.append(row([mode, f"{times['op']:.1f}", f"{times['eager']:.1f}",
                         f"{times['eager'] / times['op']:.2f}"]))
    table = "\n".join(["Host microseconds per call of condconv2d (backend kernels stubbed)", "",
                       *header(["mode", "custom op", "eager path", "eager / op"]), *rows, "",
                       machine_line()])
    print(table)
    if args.out:
        write_result(args.out, table, "python bench/bench_host_overhead.py "
                     + " ".join(argv if argv else sys.argv[1:]))


if __name__ == "__main__":
    main()
