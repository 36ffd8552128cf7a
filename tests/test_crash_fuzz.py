"""Crash fuzzing of the op's boundary: arbitrary arguments through ``condconv2d`` (backends cpu
and reference; triton under the interpreter for a few examples), the ``CondConv2d`` layer and
``torch.ops.condconv.*``. Each call must either match the float64 reference (where the reference
accepts the input; dtype-appropriate tolerances, NaN/Inf positions equal) or raise a Python
exception (TypeError/ValueError/RuntimeError/NotImplementedError/IndexError) whose message names
an argument: never a crash, a hang or silent garbage.

Drawn: tensors of rank 0-6, sizes 0 to huge (products past 2**31 as expanded or strided views
that allocate little), overlapping and stride-0 views (as_strided, expand), transposed and
channels_last views, every dtype (integer, bool and complex included), meta tensors, any
padding value or string, groups / stride / dilation of any sign, E = 0, NaN and Inf values.

A crash kills the process, so the property runs in a subprocess (this file, run as a script):
a crash or a hang fails the test with the example that was running. The worker caps its
address space (RLIMIT_AS, CONDCONV_CRASH_FUZZ_MEMORY_GB, default 6) so that a runaway
allocation raises instead of exhausting the machine.

CONDCONV_CRASH_FUZZ_EXAMPLES sets the number of examples (default 2000),
CONDCONV_CRASH_FUZZ_SEED the seed (fixed unless "random"; printed, so a failure reproduces with
it),
CONDCONV_CRASH_FUZZ_TIMEOUT the wall-clock limit of the worker in seconds (default: 60 s plus
0.1 s per example). Run it directly: ``python tests/test_crash_fuzz.py --worker SEED EXAMPLES``.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from conftest import fuzz_seed

EXAMPLES = int(os.environ.get("CONDCONV_CRASH_FUZZ_EXAMPLES", "2000"))
SEED = fuzz_seed("CONDCONV_CRASH_FUZZ_SEED")
TIMEOUT = float(os.environ.get("CONDCONV_CRASH_FUZZ_TIMEOUT", 60 + 0.1 * EXAMPLES))
MEMORY_GB = float(os.environ.get("CONDCONV_CRASH_FUZZ_MEMORY_GB", "6"))
# Examples that also run the triton backend (Triton's interpreter: slow), at most.
TRITON_EXAMPLES = int(os.environ.get("CONDCONV_CRASH_FUZZ_TRITON_EXAMPLES", "4"))
# One example may not run longer than this (seconds): a hang is reported with its traceback.
EXAMPLE_TIMEOUT = 30

ARG_NAMES = ("x", "routing", "weight", "bias", "stride", "padding", "dilation", "groups",
             "backend", "grad_out", "output_mask", "in_channels", "out_channels", "kernel_size",
             "num_experts", "routing_weights")
ALLOWED = (TypeError, ValueError, RuntimeError, NotImplementedError, IndexError)


# --------------------------------------------------------------------------------------------
# pytest side: run the worker in a subprocess.

def test_crash_fuzz(tmp_path):
    import pytest
    pytest.importorskip("hypothesis")
    last = tmp_path / "example.txt"
    print(f"condconv crash fuzz: seed {SEED} (CONDCONV_CRASH_FUZZ_SEED={SEED} reproduces), "
          f"{EXAMPLES} examples")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(SEED), str(EXAMPLES),
           str(last)]
    import condconv_kernels
    env = dict(os.environ)  # the worker imports the package this test imported
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(condconv_kernels.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [
        os.environ.get("PYTHONPATH")] if p])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-4000:]
        pytest.fail(f"crash fuzz (seed {SEED}) hung past {TIMEOUT:.0f} s; running example:\n"
                    f"{_read(last)}\n{out!r}")
    print(proc.stdout[-3000:])
    if proc.returncode != 0:
        crashed = proc.returncode < 0 or "Fatal Python error" in proc.stderr
        what = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else (
            "crashed" if crashed else "failed")
        pytest.fail(f"crash fuzz (seed {SEED}, CONDCONV_CRASH_FUZZ_SEED={SEED}) {what}; "
                    f"example:\n{_read(last)}\n--- stdout\n{proc.stdout[-6000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")


def _read(path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return "(none recorded)"


# --------------------------------------------------------------------------------------------
# Worker side.

def _dtypes():
    import torch
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
            torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
            torch.complex128]


def _values(shape, dtype, gen):
    """A contiguous tensor of ``shape`` with values fit for ``dtype``."""
    import torch
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, 3, shape, generator=gen).to(dtype)


def _describe(t) -> str:
    import torch
    if isinstance(t, torch.Tensor):
        return (f"Tensor(shape={tuple(t.shape)}, stride={t.stride()}, dtype={t.dtype}, "
                f"device={t.device}, offset={t.storage_offset()})")
    return repr(t)


class Example:
    """One drawn call: the arguments and how they were made."""

    def __init__(self):
        self.notes = []

    def __str__(self):
        args = ", ".join(f"{k}={_describe(v)}" for k, v in self.args.items())
        return f"condconv2d({args})\n  made by: {'; '.join(self.notes)}"


def _shape_variant(data, st, shape, note, chaos):
    """shape, or (chaos) a mutation of it: another rank, a zero, a huge size."""
    if not chaos:
        return tuple(shape)
    kind = data.draw(st.sampled_from(["keep"] * 3 + ["rank", "zero", "huge", "off"]))
    shape = list(shape)
    if kind == "rank":
        rank = data.draw(st.integers(0, 6))
        shape = (shape + [data.draw(st.integers(1, 3)) for _ in range(6)])[:rank]
    elif kind == "zero" and shape:
        shape[data.draw(st.integers(0, len(shape) - 1))] = 0
    elif kind == "huge" and shape:
        shape[data.draw(st.integers(0, len(shape) - 1))] = data.draw(
            st.sampled_from([2 ** 16 + 1, 2 ** 31 + 3, 2 ** 33, 2 ** 40]))
    elif kind == "off" and shape:
        i = data.draw(st.integers(0, len(shape) - 1))
        shape[i] = max(0, shape[i] + data.draw(st.sampled_from([-1, 1, 2])))
    if kind != "keep":
        note.append(f"shape {kind} -> {tuple(shape)}")
    return tuple(shape)


def _tensor(data, st, gen, name, shape, dtype, device, ex, chaos):
    """A tensor of ``shape``: contiguous, channels_last, transposed, sliced, expanded (stride 0),
    overlapping (as_strided) or huge-but-lazy (a stride-0 view of a few elements)."""
    import torch
    note = []
    shape = _shape_variant(data, st, shape, note, chaos)
    if chaos and data.draw(st.integers(0, 5)) == 0:
        dtype = data.draw(st.sampled_from(_dtypes()))
        note.append(f"dtype {dtype}")
    huge = any(s >= 4096 for s in shape)
    layouts = ["contiguous", "transposed", "sliced", "expanded", "overlap", "channels_last"]
    layout = data.draw(st.sampled_from(layouts)) if not huge else "expanded"
    if huge:
        # Huge: a stride-0 view of one row of real values (allocates a few elements).
        base = _values((shape[-1] if shape[-1] < 4096 else 1,), dtype, gen)
        if shape[-1] >= 4096:
            base = base.expand(shape[-1])
        t = base.expand(shape)
        layout = "expanded-huge"
    elif layout == "transposed" and len(shape) >= 2:
        dims = list(range(len(shape)))
        i, j = data.draw(st.permutations(dims))[:2]
        swapped = list(shape)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        t = _values(tuple(swapped), dtype, gen).transpose(i, j)
    elif layout == "sliced" and len(shape) >= 1:
        big = _values(tuple(s * 2 + 1 for s in shape), dtype, gen)
        t = big[tuple(slice(1, 1 + 2 * s, 2) for s in shape)]
    elif layout == "expanded" and len(shape) >= 1:
        small = [s if data.draw(st.booleans()) else 1 for s in shape]
        small = [1 if s == 0 else s for s in small]
        t = _values(tuple(small), dtype, gen).expand(shape)
    elif layout == "overlap" and len(shape) >= 1:
        strides = [data.draw(st.integers(0, 2)) for _ in shape]
        extent = 1 + sum((s - 1) * d for s, d in zip(shape, strides) if s > 0)
        t = torch.as_strided(_values((max(extent, 1),), dtype, gen), shape, strides)
    elif layout == "channels_last" and len(shape) == 4:
        t = _values(shape, dtype, gen).contiguous(memory_format=torch.channels_last)
    else:
        layout = "contiguous"
        t = _values(shape, dtype, gen)
    if layout != "contiguous":
        note.append(layout)
    if (dtype.is_floating_point or dtype.is_complex) and 0 < t.numel() < 4096 \
            and name in ("x", "routing", "bias") and data.draw(st.integers(0, 4)) == 0:
        # NaN/Inf in x, routing or bias (non-finite expert weights meet the zero padding, where
        # implementations may differ: 0 * NaN; they are not drawn).
        t = t.clone()
        flat = t.view(-1) if t.is_contiguous() else None
        if flat is not None:
            flat[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")]))
            note.append("non-finite value")
    if device == "meta":
        t = t.to("meta") if not huge else torch.empty_strided(
            t.shape, t.stride(), dtype=t.dtype, device="meta")
    if note:
        ex.notes.append(f"{name}: " + ", ".join(note))
    return t


def _int_or_pair(data, st, typical):
    return data.draw(st.one_of(
        st.sampled_from(typical),
        st.integers(-3, 4),
        st.tuples(st.integers(-2, 4), st.integers(-2, 4)),
        st.lists(st.integers(0, 3), max_size=5),
        st.sampled_from([0, -1, 2 ** 31, 2 ** 63 - 1, 2 ** 70, True, 1.0, None, "1", (1, 1.5)]),
    ))


def _padding(data, st):
    return data.draw(st.one_of(
        st.sampled_from([0, 1, 2, "same", "valid"]),
        st.integers(-3, 5),
        st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
        st.tuples(*[st.integers(-1, 3)] * 4),
        st.lists(st.integers(0, 3), max_size=6),
        st.sampled_from(["SAME", "Valid", "full", "", "circular", 2 ** 40, 1.5, None, True,
                         (1, 2, 3), [1, "a"], b"same"]),
    ))


def draw_example(data, st, gen):
    import torch
    ex = Example()
    groups_kind = data.draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if groups_kind == "depthwise":
        cin = data.draw(st.integers(1, 4))
        groups, cout = cin, cin * data.draw(st.integers(1, 2))
    else:
        groups = 1 if groups_kind == "dense" else data.draw(st.integers(2, 3))
        cin = groups * data.draw(st.integers(1, 3))
        cout = groups * data.draw(st.integers(1, 2))
    chaos = data.draw(st.integers(0, 2)) == 0  # else valid arguments, mostly
    B, E = data.draw(st.integers(0, 3)), data.draw(st.integers(0 if chaos else 1, 3))
    kh, kw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    H = data.draw(st.integers(1 if chaos else kh, 7))
    W = data.draw(st.integers(1 if chaos else kw, 7))
    dtype = data.draw(st.sampled_from(_dtypes() if chaos else _dtypes()[:4]))
    device = "meta" if data.draw(st.integers(0, 14)) == 0 else "cpu"
    if device == "meta":
        ex.notes.append("meta tensors")
    if not chaos and data.draw(st.integers(0, 9)) == 0:
        # Valid, but x is huge (a stride-0 view): a kernel step past it keeps the output small.
        huge = data.draw(st.sampled_from([2 ** 16 + 1, 2 ** 31 + 3, 2 ** 33]))
        if data.draw(st.booleans()):
            H = huge
        else:
            W = huge
        ex.notes.append(f"huge valid x: H={H}, W={W}")
    x = _tensor(data, st, gen, "x", (B, cin, H, W), dtype, device, ex, chaos)
    routing = _tensor(data, st, gen, "routing", (B, E), dtype, device, ex, chaos)
    if data.draw(st.integers(0, 5)) == 0 and routing.dim() == 2 and routing.shape[0] > 0:
        routing = routing[:1].expand(routing.shape)  # broadcast from (1, E)
        ex.notes.append("routing expanded from (1, E)")
    weight = _tensor(data, st, gen, "weight", (E, cout, cin // groups, kh, kw), dtype, device,
                     ex, chaos)
    bias = None
    if data.draw(st.booleans()):
        bias = _tensor(data, st, gen, "bias", (E, cout), dtype, device, ex, chaos)
    if chaos:
        stride = _int_or_pair(data, st, [1, 1, 2, (1, 2), (2, 1)])
        dilation = _int_or_pair(data, st, [1, 1, 1, 2, (1, 2)])
        padding = _padding(data, st)
        groups_arg = data.draw(st.one_of(
            st.just(groups), st.integers(-2, 7),
            st.sampled_from([2 ** 31, -2 ** 40, True, 1.0, None, "1"])))
    else:
        stride = data.draw(st.sampled_from([1, 2, (1, 2), (2, 1), 3]))
        dilation = data.draw(st.sampled_from([1, 1, 2, (1, 2)]))
        padding = data.draw(st.sampled_from([0, 1, 2, (0, 1), (1, 0, 2, 1), "same", "valid"]))
        groups_arg = groups
        if max(H, W) > 4096:
            stride = (H if H > 4096 else 1, W if W > 4096 else 1)
            stride = tuple(s // 2 if s > 1 else s for s in stride)
    kind = data.draw(st.integers(0, 39 if not chaos else 9))
    if kind == 0:  # a non-tensor argument
        which = data.draw(st.sampled_from(["x", "routing", "weight", "bias"]))
        junk = data.draw(st.sampled_from([None, 1.0, [1.0, 2.0], "x", object()]))
        if which == "x":
            x = junk
        elif which == "routing":
            routing = junk
        elif which == "weight":
            weight = junk
        else:
            bias = junk
        ex.notes.append(f"{which} replaced by {junk!r}")
    elif kind == 1 and isinstance(x, torch.Tensor) and x.dim() == 4 and routing.dim() == 2 \
            and x.shape[0] == routing.shape[0] and routing.shape[1] == x.shape[1] and \
            x.shape[2] > 0 and x.shape[3] > 0:
        routing = x[:, :, 0, 0]  # x's memory used again as routing
        ex.notes.append("routing is a view of x")
    ex.args = dict(x=x, routing=routing, weight=weight, bias=bias, stride=stride,
                   padding=padding, dilation=dilation, groups=groups_arg)
    return ex


def _reference_out_of_memory(backend, exc, x) -> bool:
    """The reference backend (PyTorch's convolution) copies x densely, padded: over a huge
    stride-0 view or a huge padding it runs out of memory, and says so naming 'x'."""
    return backend == "reference" and isinstance(exc, RuntimeError) and \
        "ran out of memory for argument 'x'" in str(exc)


def _names_argument(exc) -> bool:
    msg = str(exc)
    return any(re.search(rf"['\"`]?\b{re.escape(n)}\b['\"`]?", msg) for n in ARG_NAMES)


def _call(fn):
    """('ok', value) or ('raised', exc); a disallowed exception type or a message naming no
    argument fails."""
    try:
        return "ok", fn()
    except ALLOWED as exc:
        assert _names_argument(exc), f"unhelpful error {type(exc).__name__}: {exc}"
        return "raised", exc


def _truth(args):
    """The float64 per-example loop on the normalised arguments, or None where it rejects them
    (or the arguments do not normalise)."""
    import torch
    from condconv_kernels import _args, reference
    from condconv_kernels.ops import normalise_arguments
    x, r, w, b = (args[k] for k in ("x", "routing", "weight", "bias"))
    try:
        stride, pad, dilation, _ = normalise_arguments(x, r, w, b, args["stride"],
                                                       args["padding"], args["dilation"],
                                                       args["groups"])
        _args.check_tensors(x, r, w, b, stride, pad, dilation, args["groups"])
    except Exception:  # noqa: BLE001  (which exception is the op's business, checked there)
        return None
    shape = _args.out_shape(x.shape, w.shape, stride, pad, dilation)
    if x.shape[0] == 0:
        return torch.empty(shape, dtype=torch.float64, device=x.device), None
    if x.device.type != "meta" and math.prod(shape) * 8 > MEMORY_GB * 2 ** 30 / 8:
        return TOO_BIG, shape  # valid, but the output does not fit the worker's memory cap
    kernel = (w.shape[3], w.shape[4])
    if x.device.type != "meta" and max(x.shape[2] + pad[0] + pad[1],
                                       x.shape[3] + pad[2] + pad[3]) > 4096:
        # A huge (stride-0) x: only the pixels the windows read, gathered (zeros for the
        # padding) so that window o is block o of a stride-k convolution.
        x = _gather_windows(x, pad, stride, dilation, kernel)
        stride, pad, dilation = kernel, (0, 0, 0, 0), (1, 1)
    if x.device.type != "meta" and (x.numel() > 2 ** 16 or x.shape[0] > 256):
        return TOO_BIG, shape  # a huge batch or channel count: the shape is checked, not values
    d = [t.double() if t is not None else None for t in (x, r, w, b)]
    out = reference.condconv2d_loop(*d, stride, pad, dilation, args["groups"])
    if out.device.type == "meta":
        return out, None
    a = [t.double().abs() if t is not None else None for t in (x, r, w, b)]
    return out, reference.condconv2d_loop(*a, stride, pad, dilation, args["groups"])


def _gather_windows(x, pad, stride, dilation, kernel):
    import torch
    from condconv_kernels import _args
    index, inside = [], []
    for dim, (size, before, after, s, d, k) in enumerate(
            zip(x.shape[2:], pad[::2], pad[1::2], stride, dilation, kernel)):
        out = _args.output_size(size, k, s, before, after, d)
        idx = torch.tensor([o * s + i * d - before for o in range(out) for i in range(k)],
                           dtype=torch.long)
        index.append(idx)
        inside.append((idx >= 0) & (idx < size))
    small = torch.zeros(x.shape[0], x.shape[1], len(index[0]), len(index[1]),
                        dtype=torch.float64)
    rows = inside[0].nonzero().flatten()
    cols = inside[1].nonzero().flatten()
    part = x[:, :, index[0][rows][:, None], index[1][cols][None, :]]  # no huge intermediate
    small[:, :, rows[:, None], cols[None, :]] = part.double()
    return small.to(x.dtype)


TOO_BIG = "too big"


def _allocation_error(exc) -> bool:
    return isinstance(exc, MemoryError) or "allocate" in str(exc) or "bad_alloc" in str(exc)


RTOL = {"torch.float64": 1e-9, "torch.float32": 2e-5, "torch.float16": 4e-3,
        "torch.bfloat16": 3e-2}


def _check_output(out, truth, dtype, name, strict=True, computed_in=None):
    """out against the float64 truth (expected, magnitude): shape, dtype, device, NaN and Inf
    positions, and |out - expected| <= rtol * 4 * (magnitude + 1), magnitude being the
    convolution of the absolute values (the scale of the rounding errors) and rtol that of
    ``computed_in`` (default ``dtype``): a float32 routing gradient of bfloat16 x and weight is
    computed from bfloat16 products."""
    import torch
    expected, magnitude = truth
    assert isinstance(out, torch.Tensor), f"{name}: returned {type(out).__name__}"
    assert tuple(out.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(out.shape)}, expected {tuple(expected.shape)}")
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert out.device == expected.device, f"{name}: device {out.device}"
    if out.device.type == "meta" or magnitude is None:
        return
    o = out.double()
    if strict is not True:
        # Examples with an Inf routing weight have Inf kernels: 0 * Inf in the zero padding is
        # NaN, or skipped (ATen's own float32 and float64 paths differ): not compared. (A NaN
        # routing weight makes the example's output NaN: compared.)
        keep = ~strict
        o, expected, magnitude = o[keep], expected[keep], magnitude[keep]
    assert torch.equal(o.isnan(), expected.isnan()), f"{name}: NaN positions differ"
    assert torch.equal(o.isinf(), expected.isinf()), f"{name}: Inf positions differ"
    fin = expected.isfinite()
    bound = RTOL[str(computed_in or dtype)] * (magnitude[fin] + 1) * 4
    err = (o[fin] - expected[fin]).abs()
    assert (err <= bound).all(), f"{name}: max error {(err - bound).max().item():.3e} over bound"


def run_example(ex, state):
    import torch
    import condconv_kernels as cc
    from condconv_kernels import _args, nn as ccnn
    args = ex.args
    truth = _truth(args) if isinstance(args["x"], torch.Tensor) and isinstance(
        args["weight"], torch.Tensor) else None
    state["valid"] += truth is not None
    backends = ["cpu", "reference"]
    if state["triton_left"] > 0 and truth is not None and truth[0] is not TOO_BIG and \
            args["x"].device.type == "cpu" and max(args["x"].shape[2:]) <= 4096 and \
            args["x"].dtype in (torch.float32, torch.float16) and "triton" in state["available"]:
        state["triton_left"] -= 1
        backends.append("triton")
    if truth is not None and truth[0] is TOO_BIG:
        # Valid arguments, a huge input or output: an allocation error, or the output (shape
        # checked). Run where that is quick: outputs past the memory cap (the allocation fails
        # at once) or small ones.
        out_elements = math.prod(truth[1])
        if MEMORY_GB * 2 ** 30 < out_elements * args["x"].element_size() < 2 * MEMORY_GB * 2 ** 30 \
                or 2 ** 20 < out_elements * args["x"].element_size() <= MEMORY_GB * 2 ** 30:
            return
        for backend in backends:
            try:
                out = cc.condconv2d(**args, backend=backend)
                assert tuple(out.shape) == tuple(truth[1]), f"{backend}: shape {out.shape}"
            except (MemoryError, RuntimeError) as exc:
                assert _allocation_error(exc), f"{backend}: {type(exc).__name__}: {exc}"
        return
    strict = True  # else a (B,) mask of the examples with an Inf routing weight
    r = args["routing"]
    if truth is not None and r.device.type == "cpu" and r.dtype.is_floating_point and \
            r.isinf().any():
        strict = r.isinf().any(1)
    state["strict"] = strict
    results = {}
    for backend in backends:
        status, value = _call(lambda: cc.condconv2d(**args, backend=backend))
        results[backend] = status
        if status == "ok":
            assert truth is not None, (
                f"backend {backend}: accepted arguments the reference rejects, returned "
                f"{_describe(value)}")
            _check_output(value, truth, args["x"].dtype, backend, strict)
        elif truth is not None and not (backend == "cpu" and args["x"].device.type == "meta") \
                and not _reference_out_of_memory(backend, value, args["x"]):
            raise AssertionError(f"backend {backend}: rejected valid arguments: "
                                 f"{type(value).__name__}: {value}")
    if truth is None:
        return
    # Valid arguments: the same call through the layer, the ops, and backward.
    x, r, w, b = (args[k] for k in ("x", "routing", "weight", "bias"))
    stride = _args.pair(args["stride"], "stride", 1)
    dilation = _args.pair(args["dilation"], "dilation", 1)
    pad = list(_args.resolve_padding(args["padding"], x.shape[-2:], w.shape[-2:], stride,
                                     dilation))
    if x.device.type == "cpu":
        status, out = _call(lambda: torch.ops.condconv.native_forward(
            x, r, w, b, list(stride), pad, list(dilation), args["groups"]))
        assert status == "ok", f"native_forward rejected valid arguments: {out}"
        _check_output(out, truth, x.dtype, "native_forward", strict)
    for backend in ("cpu", "reference"):
        if x.device.type == "meta" and backend == "cpu":
            continue
        status, out = _call(lambda: torch.ops.condconv.condconv2d(
            x, r, w, b, list(stride), pad, list(dilation), args["groups"], backend))
        if _reference_out_of_memory(backend, out, x):
            continue
        assert status == "ok", f"torch.ops.condconv.condconv2d rejected valid arguments: {out}"
        _check_output(out, truth, x.dtype, f"torch.ops.condconv.condconv2d[{backend}]", strict)
    _check_layer(args, truth, state)
    _check_backward(args, truth, stride, pad, dilation, state)


def _check_layer(args, truth, state):
    """The CondConv2d layer with these arguments, where it has them (int/tuple padding, an
    int groups, the weight's dtype and device)."""
    import torch
    from condconv_kernels import nn as ccnn
    x, r, w, b = (args[k] for k in ("x", "routing", "weight", "bias"))
    E, cout, cin_g, kh, kw = w.shape
    padding = args["padding"]
    if isinstance(padding, str) and padding.lower() == "same":
        padding = "same"
    elif isinstance(padding, str):
        padding = 0 if padding.lower() == "valid" else padding
    try:
        layer = ccnn.CondConv2d(x.shape[1], cout, (kh, kw), args["stride"], padding,
                                args["dilation"], args["groups"], bias=b is not None,
                                num_experts=E, device=x.device, dtype=x.dtype,
                                backend=state["layer_backend"])
    except ALLOWED as exc:
        assert _names_argument(exc), f"CondConv2d: unhelpful error {exc}"
        return
    state["layer_backend"] = "reference" if state["layer_backend"] == "cpu" else "cpu"
    if x.device.type == "meta" and layer.backend == "cpu":
        return
    with torch.no_grad():
        layer.weight.copy_(w.reshape(E, -1))
        if b is not None:
            layer.bias.copy_(b)
    status, out = _call(lambda: layer(x, r))
    if _reference_out_of_memory(layer.backend, out, x):
        return
    if padding == "same" and status == "raised":
        return  # the layer's "same" is timm's (static when exact): may differ from TF's
    assert status == "ok", f"CondConv2d rejected valid arguments: {out}"
    if padding != "same":
        _check_output(out, truth, x.dtype, f"CondConv2d[{layer.backend}]", state["strict"])


def _check_backward(args, truth, stride, pad, dilation, state):
    """Gradients against float64 autograd, for finite floating inputs on CPU."""
    import torch
    import condconv_kernels as cc
    from condconv_kernels import reference
    x, r, w, b = (args[k] for k in ("x", "routing", "weight", "bias"))
    tensors = [t for t in (x, r, w, b) if t is not None]
    if x.device.type != "cpu" or not x.dtype.is_floating_point or max(x.shape[2:]) > 4096 or any(
            not t.isfinite().all() for t in tensors) or truth[0].numel() == 0:
        return
    state["backward"] += 1
    if state["backward"] % 3:
        return  # a third of them: the backward is the slower half
    g = torch.Generator().manual_seed(state["backward"])
    grad_out = torch.randn(truth[0].shape, generator=g, dtype=torch.float64)
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in (x, r, w, b)]
    ref = reference.condconv2d_loop(*leaves, stride, pad, dilation, args["groups"])
    ref_grads = torch.autograd.grad(ref, [t for t in leaves if t is not None], grad_out)
    abs_leaves = [t.detach().double().abs().requires_grad_(True) if t is not None else None
                  for t in (x, r, w, b)]
    mag = reference.condconv2d_loop(*abs_leaves, stride, pad, dilation, args["groups"])
    mag_grads = torch.autograd.grad(mag, [t for t in abs_leaves if t is not None],
                                    grad_out.abs())
    for backend in ("cpu", "reference"):
        ours = [t.detach().requires_grad_(True) if t is not None else None
                for t in (x, r, w, b)]
        out = cc.condconv2d(*ours, args["stride"], args["padding"], args["dilation"],
                            args["groups"], backend=backend)
        grads = torch.autograd.grad(out, [t for t in ours if t is not None],
                                    grad_out.to(x.dtype))
        for i, (gr, t, m) in enumerate(zip(grads, ref_grads, mag_grads)):
            _check_output(gr, (t, m), gr.dtype, f"{backend} grad {i}",
                          computed_in=max(gr.dtype, x.dtype, key=lambda d: RTOL[str(d)]))


def worker(seed: int, examples: int, log_path: str) -> None:
    import faulthandler
    import resource
    import time
    import warnings

    faulthandler.enable()
    if "asan" not in os.environ.get("LD_PRELOAD", ""):  # ASan reserves terabytes of shadow
        limit = int(MEMORY_GB * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    warnings.filterwarnings("ignore")
    import torch
    from hypothesis import HealthCheck, given, settings, seed as hseed
    from hypothesis import strategies as st
    import condconv_kernels as cc

    threads = torch.get_num_threads()
    state = {"count": 0, "valid": 0, "triton_left": TRITON_EXAMPLES, "backward": 0,
             "available": cc.available_backends("cpu"), "layer_backend": "cpu"}

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def crash_fuzz(data):
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
        ex = draw_example(data, st, gen)
        state["count"] += 1
        # One thread mostly (tiny tensors: thread wake-ups would dominate), every 8th example
        # with all of them (the kernels' parallel partitioning).
        torch.set_num_threads(threads if state["count"] % 8 == 0 else 1)
        with open(log_path, "w") as f:
            f.write(str(ex) + "\n")
        faulthandler.dump_traceback_later(EXAMPLE_TIMEOUT, exit=True)
        t0 = time.perf_counter()
        try:
            run_example(ex, state)
            if os.environ.get("CONDCONV_CRASH_FUZZ_PROFILE"):
                state.setdefault("times", []).append((time.perf_counter() - t0, str(ex)))
        except Exception as exc:  # noqa: BLE001  (any escape is a failure: report the example)
            raise AssertionError(f"{type(exc).__name__}: {exc}\nexample: {ex}") from exc
        finally:
            faulthandler.cancel_dump_traceback_later()

    start = time.time()
    crash_fuzz()
    for t, e in sorted(state.get("times", []), reverse=True)[:8]:
        print(f"{t:.3f} s: {e}")
    print(f"crash fuzz: seed {seed}, {state['count']} examples ({state['valid']} valid), "
          f"{TRITON_EXAMPLES - state['triton_left']} with triton, {state['backward']} "
          f"with valid finite floating inputs, {time.time() - start:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        seed = int(sys.argv[2]) if len(sys.argv) > 2 else SEED
        n = int(sys.argv[3]) if len(sys.argv) > 3 else EXAMPLES
        log = sys.argv[4] if len(sys.argv) > 4 else os.devnull
        print(f"condconv crash fuzz: seed {seed}, {n} examples", flush=True)
        worker(seed, n, log)
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker [SEED [EXAMPLES [LOG]]]")
