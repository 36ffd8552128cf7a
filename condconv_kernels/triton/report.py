"""A static performance report of the triton backend, made without a GPU.

    python -m condconv_kernels.triton.report [--arch 90] [--batch 256] [--dtype bfloat16]
                                             [--layout channels_last] [--json FILE] [--all]
                                             [--before EARLIER.json] [--scales]
                                             [--stationary [PASSES]] [--model resnet]
                                             [--first N] [--layers NAMES]

For each of the 24 CondConv layers of tf_efficientnet_cc_b0_8e (``--model resnet``: the dense
3x3 layers of a ResNet-18/34 at 224, 8 experts), every kernel the layer runs
(forward, grad_x, kernel gradient) is launched on meta tensors with its launch recorded (the
exact arguments, so the exact specialization: dtypes, strides equal to 1, divisibility by 16),
then compiled for ``sm_<arch>`` at each configuration of its table. Per layer and kernel the
report prints the configuration the model below predicts fastest (``--all``: every one): grid,
tile sizes and examples per program, registers and spilled bytes (ptxas), shared memory,
whether tensor-core instructions (wgmma, or mma.sync) and asynchronous copies (cp.async, or the
bulk tensor copies of TMA) appear in the code, and the model:

- HBM bytes: the fewest the kernel must move (each input read once, each output written once);
- L2 -> SM bytes: what its programs load, tile by tile (expert tiles, x or grad_out tiles,
  partial sums), with tiles padded to their block sizes (a depthwise program's input tile and
  halo once: its tap-by-tap reloads are counted as L1 hits);
- tensor-core FLOPs (its dots, padded to the tiles) and CUDA-core FLOPs (the expert mix and
  the depthwise arithmetic); a strided dense grad_x's K blocks counted phase by phase, over
  the taps that reach each phase (``phase_taps``);
- issue time: the warp instructions the programs' main loops issue, read from the machine
  code (below) and multiplied by the kernel's trip counts, at 4 a clock an SM (1.78 GHz, the
  clock at which 128 FMA lanes an SM make the 60 TFLOP/s): a floor
  (set-up and epilogues left out), which puts the depthwise kernels and the dense kernel
  gradient above their traffic terms (those alone are 2-4x too low) and, with the latency
  term below, the depthwise ones where they measured;
- modeled time: the largest of HBM bytes / 3.0 TB/s, L2 bytes / 6 TB/s, tensor-core FLOPs /
  800 TFLOP/s (wgmma; half of it for mma.sync), CUDA-core FLOPs / 60 TFLOP/s, each divided by
  the fraction of the 132 SMs the grid can fill, the issue time and (dense and depthwise
  kernels) the latency term, times 2 where registers spill, plus the experts' copy into
  tap-major order where the launch needs it (channels_last 3x3 dense);
- floor: the layer's own floor for that pass, max(FLOPs / 800 TFLOP/s, HBM bytes / 3.0 TB/s).

The dense kernel gradient's sum kernel (record ``dense_kgrad_sum``: its batch slices'
float32 gradients and grad_routing's partial sums, summed into the two gradients) moves only
what the kernel gradient's design leaves it, so its floor is its own traffic; its partial
sums are counted at the rows the smallest tiles allocate (a launch writes those of its tiles
only, which the sum kernel reads: fewer where the tuner picks larger tiles).

The main loop's counts per iteration come from the machine code
(:mod:`condconv_kernels.triton.sass`): instructions, barriers and global loads into registers
(``loop instr / bar / ldg``; the JSON has every ``loop_`` count, ``loop_issue_cycles`` and
``issue_us``). The dense and depthwise kernels also have a latency term (``latency_us``, the
table's ``issue / latency`` column; :data:`DOT_CYCLES`, :data:`DW_ROW_CYCLES`), fitted to the
autotuner's timings of every configuration on an H200: a dense program's examples' work in a K
step adds up, so their time grows with the examples a program serves where the traffic terms
say it shrinks; a depthwise program waits for each row of taps' loads in turn; the programs an
SM holds at once overlap.

``--stationary`` models the backend as ``CONDCONV_TRITON_STATIONARY=1`` runs it (``--stationary
PASSES``: as that variable set to PASSES, e.g. ``kernel_grad``). The 1x1 passes the
experts-stationary kernel takes (:mod:`condconv_kernels.triton.stationary`; records
``stationary_fwd``, ``stationary_bwd_x``, ``stationary_routing``, and the kernel gradient then
without its routing half) are compiled at their plan and modeled by their own rule. One
program per SM works through its slice of the batch one example after another, so its time
adds up rather than overlaps: the slab's copy from L2, then per example the mix (an issue slot
for each slab value's conversion and one for its FMA, per lane, against 4 x 32 lanes a clock;
or the slab's shared-memory reads at 128 bytes a clock, whichever is longer), the tensor-core
products (or their shared-memory operands, whichever is longer) and the epilogue; the routing
form has no mix: per pixel tile its D_b product, then per example D_b against each expert's
slab (a conversion, an FMA and half a shared-memory load per slab value). The clock is the one
that makes 128 FMA lanes per SM give the 60 TFLOP/s; the modeled time is the longest of that
sum, HBM and L2. The records add ``smem_bytes`` (shared-memory reads and writes) and
``serial_us`` (that sum). The ``kernel_grad`` pass's kernel
(:mod:`condconv_kernels.triton.pointwise_grad`, records ``pointwise_grad``) is compiled at its
plan and modeled as the Triton kernels are: its traffic, FLOPs and issue time (a loop over the
examples around the loop over their pixel tiles). The ``mix`` pass's kernel
(:mod:`condconv_kernels.triton.stationary_mix`, records ``mix_fwd``, ``mix_bwd_x``: the mix on the
tensor cores) is modeled as the longest of HBM, L2, its issue time (its nested loops' counts,
``loop_nested``) and a serial sum of its phases (per chunk the mix, the mixed tiles' stores and
the products, each the longer of its tensor-core work and its shared-memory bytes).

``--scales`` gives every layer ODConv's three per-example scales (in_scale, out_scale, tap_scale):
the compiled code is then the scaled kernels' (the stationary kernel's too, with
``--stationary``; the model still counts the unscaled traffic and FLOPs: the scales add a
vector per example and tile).

Run it in a process without ``TRITON_INTERPRET=1`` (like compile_check). The ceilings are the
H100's datasheet-level figures the project plans with; the GPU kit measures the real ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..cli import parser
from . import _config, sass
from ._grid import cdiv

HBM, L2, TC, CC, SMS = 3.0e12, 6.0e12, 800e12, 60e12, 132
# Per SM, for the stationary kernel's serial model: the clock at which 128 FMA lanes make CC,
# lane-instructions issued a second (4 schedulers x 32 lanes), shared-memory bytes a second
# (128 a clock) and tensor-core FLOPs a second.
CLOCK = CC / (SMS * 128 * 2)
ISSUE_SM, SMEM_SM, TC_SM = 128 * CLOCK, 128 * CLOCK, TC / SMS
STATIONARY_PASSES = ("stationary_fwd", "stationary_bwd_x", "stationary_routing")
MIX_PASSES = ("mix_fwd", "mix_bwd_x")
POINTWISE_GRAD = "pointwise_grad"
KERNEL_NAMES = ("dense_fwd_kernel", "dense_bwd_x_kernel", "dense_bwd_w_kernel",
                "dense_kgrad_sum_kernel", "dw_fwd_kernel", "dw_bwd_x_kernel", "dw_bwd_w_kernel")


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its arguments, and its grid function."""
    name: str
    kernel: object
    args: tuple
    kwargs: dict
    grid: object


def _base(kernel):
    while hasattr(kernel, "fn") and not isinstance(kernel, triton.JITFunction):
        kernel = kernel.fn
    return kernel


def record_launches(fn) -> List[Launch]:
    """Runs ``fn()`` with every kernel of the triton backend replaced by a recorder."""
    import condconv_kernels.triton as backend
    launches: List[Launch] = []
    saved = {name: getattr(backend, name) for name in KERNEL_NAMES}

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append(Launch(self.name, self.kernel, args, kwargs, grid))
            return run
    try:
        for name, kernel in saved.items():
            setattr(backend, name, Recorder(name, kernel))
        fn()
    finally:
        for name, kernel in saved.items():
            setattr(backend, name, kernel)
    return launches


def _stationary_recorders(launches: List[Launch]):
    """Stand-ins for :func:`stationary.run` and :func:`stationary.routing_grad` that record
    the launch (its sizes in ``kwargs``, its program count as the grid) and return an output
    of the right shape."""
    from . import stationary

    def record(name, inp, weight, config, rows, transposed, routing, has_bias, scales):
        E, cout, cin = weight.shape[:3]
        B, k, H, W = inp.shape
        count = stationary.programs(B, rows, SMS)[2]
        launches.append(Launch(name, stationary.pw_stationary_kernel, (), dict(
            E=E, K=k, P=H * W, rows=rows, batch=B, transposed=transposed, routing=routing,
            has_bias=has_bias, scaled=any(t is not None for t in scales), plan=config),
            (count,)))

    def run(inp, routing, weight, bias, out, config, transposed=False,
            scales=stationary.NO_SCALES):
        rows = weight.shape[2] if transposed else weight.shape[1]
        record("stationary_bwd_x" if transposed else "stationary_fwd", inp, weight, config,
               rows, transposed, False, bias is not None, scales)
        return out

    def routing_grad(inp, dual, weight, config, transposed=False, scales=stationary.NO_SCALES):
        rows = weight.shape[2] if transposed else weight.shape[1]
        record("stationary_routing", inp, weight, config, rows, transposed, True, False,
               scales)
        return torch.empty((inp.shape[0], weight.shape[0]), device=inp.device,
                           dtype=torch.float32)
    return run, routing_grad


def _mix_recorder(recorded: List[Launch]):
    """A stand-in for :func:`stationary_mix.run` that records the launch (its sizes in
    ``kwargs``, its program count as the grid) in ``recorded`` and returns the output (the
    backend's own list of launches, ``launches``, is left alone: nothing ran)."""
    from . import stationary_mix

    def run(inp, routing, weight, bias, out, config, transposed=False, launches=None):
        E, cout, cin = weight.shape[:3]
        B, k, H, W = inp.shape
        rows = cin if transposed else cout
        count = stationary_mix.programs(B, rows, SMS)[2]
        recorded.append(Launch(MIX_PASSES[transposed], stationary_mix.pw_mix_kernel, (), dict(
            E=E, K=k, P=H * W, rows=rows, batch=B, transposed=transposed,
            has_bias=bias is not None, plan=config), (count,)))
        return out
    return run


def _pointwise_grad_recorder(launches: List[Launch]):
    """A stand-in for :func:`pointwise_grad.kernel_grads` that records the launch (its sizes in
    ``kwargs``, its program count as the grid) and returns outputs of the right shapes."""
    from . import pointwise_grad

    def kernel_grads(grad_out, x, routing, weight, need_r, need_w, config):
        B, cin, H, W = x.shape
        E, cout = weight.shape[:2]
        count = pointwise_grad.programs(B, cin, cout, config)[3]
        launches.append(Launch(POINTWISE_GRAD, pointwise_grad.pw_kgrad_kernel, (), dict(
            E=E, cin=cin, cout=cout, P=H * W, batch=B, need_r=need_r, need_w=need_w,
            plan=config), (count,)))
        return (torch.empty((B, E), device=x.device, dtype=torch.float32) if need_r else None,
                torch.empty_like(weight) if need_w else None)
    return kernel_grads


def layer_launches(layer, batch: int, dtype: torch.dtype, channels_last: bool,
                   scales: bool = False, stationary=frozenset()) -> List[Launch]:
    """The launches of one forward and one backward (all four gradients) of a layer, on meta
    tensors laid out as a benchmark's (x in ``dtype``, routing in float32); ``scales``: with
    the three per-example scales (float32); ``stationary``: the passes of the backend's switch
    to the experimental Hopper kernels that are on (True: all; see the module's docstring)."""
    from unittest import mock
    import condconv_kernels.triton as backend
    from .. import _env
    from . import pointwise_grad as pg
    from . import stationary as st
    from . import stationary_mix as sm
    if stationary is True:
        stationary = _env.STATIONARY_PASSES
    x = torch.empty(batch, layer.cin, layer.height, layer.width, device="meta", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    routing = torch.empty(batch, layer.experts, device="meta", dtype=torch.float32)
    weight = torch.empty(layer.experts, layer.cout, layer.cin // layer.groups, layer.kernel,
                         layer.kernel, device="meta", dtype=dtype)
    stride, pad = (layer.stride, layer.stride), layer.padding
    shapes = ((batch, layer.cin), (batch, layer.cout), (batch, layer.kernel, layer.kernel))
    scaled = tuple(torch.empty(shape, device="meta") if scales else None for shape in shapes)

    def run():
        out = backend.forward(x, routing, weight, None, stride, pad, (1, 1), layer.groups,
                              *scaled)
        backend.backward(torch.empty_like(out), x, routing, weight, None, stride, pad, (1, 1),
                         layer.groups, (True, True, True, False), *scaled)
    if not stationary:
        return record_launches(run)
    launches: List[Launch] = []
    fake_run, fake_routing_grad = _stationary_recorders(launches)
    with mock.patch.object(_env, "TRITON_STATIONARY", frozenset(stationary)), \
            mock.patch.object(st, "eligible", st.fits), \
            mock.patch.object(st, "run", fake_run), \
            mock.patch.object(st, "routing_grad", fake_routing_grad), \
            mock.patch.object(pg, "eligible", pg.fits), \
            mock.patch.object(pg, "kernel_grads", _pointwise_grad_recorder(launches)), \
            mock.patch.object(sm, "eligible", sm.fits), \
            mock.patch.object(sm, "run", _mix_recorder(launches)):
        dense = record_launches(run)
    # In launch order: the forward, grad_x, grad_routing, then the kernel gradient.
    order = {"stationary_fwd": 0, "mix_fwd": 0, "dense_fwd_kernel": 0, "dw_fwd_kernel": 0,
             "stationary_bwd_x": 1, "mix_bwd_x": 1, "dense_bwd_x_kernel": 1,
             "dw_bwd_x_kernel": 1, "stationary_routing": 2}
    return sorted(launches + dense, key=lambda l: order.get(l.name, 3))


def configurations(launch: Launch):
    """(tile sizes, warps, stages) of every configuration the launch may run."""
    kernel = launch.kernel
    if hasattr(kernel, "configs"):  # autotuned: the table, as the tuner's pruning leaves it
        configs = kernel.configs
        if kernel.early_config_prune:
            named = dict(zip(_base(kernel).arg_names, launch.args))
            configs = kernel.early_config_prune(configs, named, **launch.kwargs)
        return [({k: v for k, v in c.kwargs.items()}, c.num_warps, c.num_stages)
                for c in configs]
    blocks = {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK_")}
    return [(blocks, launch.kwargs.get("num_warps", 4), launch.kwargs.get("num_stages", 3))]


def compile_launch(launch: Launch, config, arch: int = 90):
    """Compiles the launch's exact specialization at a configuration, as the JIT would."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = _base(launch.kernel)
    blocks, warps, stages = config
    kwargs = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}
    kwargs.update(blocks, num_warps=warps, num_stages=stages)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__), bound


def ptxas_usage(ptx: str, arch: int) -> Dict[str, int]:
    """Registers, stack frame and spill stores of a PTX module, from ptxas -v."""
    ptxas = sass.tool("ptxas")
    target = re.search(r"\.target\s+(\S+)", ptx)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, f"-arch={target.group(1) if target else f'sm_{arch}'}",
                                 "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", result.stderr)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", result.stderr)
    return {"registers": int(regs.group(1)) if regs else -1,
            "stack_bytes": int(spill.group(1)) if spill else -1,
            "spill_bytes": int(spill.group(2)) if spill else -1}


def _grid(launch: Launch, blocks) -> int:
    grid = launch.grid
    if callable(grid):
        grid = grid(dict(blocks))
    return math.prod(grid)


def phase_taps(kernel: int, stride: int, pad: int) -> List[int]:
    """Per phase p of the input positions along one dimension (p, p + stride, ...), how many of
    the kernel's taps feed an output position from them (dense grad_x's PHASES)."""
    return [sum((p + pad - t) % stride == 0 for t in range(kernel)) for p in range(stride)]


def _k_steps(layer, launch: Launch, programs: int, red: int, bk: int) -> int:
    """The K blocks a dense forward / grad_x launch's ``programs`` run in all: ``red`` / bk each,
    or with PHASES (grad_x at a stride) each program's phase's taps x the output channels
    (programs spread evenly over the phases)."""
    if not launch.kwargs.get("PHASES"):
        return programs * cdiv(red, bk)
    k, s, (top, _, left, _) = layer.kernel, layer.stride, layer.padding
    counts = [h * w for h in phase_taps(k, s, top)[:layer.height]
              for w in phase_taps(k, s, left)[:layer.width]]  # the phases that hold pixels
    per_phase = programs // len(counts)
    return sum(per_phase * cdiv(n * (layer.cout // layer.groups), bk) for n in counts)


def model(layer, batch: int, itemsize: int, launch: Launch, blocks, programs: int):
    """(HBM bytes, L2 -> SM bytes, tensor-core FLOPs, CUDA-core FLOPs, floor FLOPs) of one
    launch at one configuration; see the module's docstring."""
    B, E, k = batch, layer.experts, layer.kernel
    cin, cout, g = layer.cin, layer.cout, layer.groups
    H, W = layer.height, layer.width
    ho, wo = layer.out_hw
    P, Q = ho * wo, H * W
    kernel_numel = cout * (cin // g) * k * k
    x_bytes, out_bytes = B * cin * Q * itemsize, B * cout * P * itemsize
    experts_bytes = E * kernel_numel * itemsize
    conv_flops = 2 * B * cout * P * (cin // g) * k * k
    mix_flops = 2 * B * E * kernel_numel
    name = launch.name
    if name in ("dense_fwd_kernel", "dense_bwd_x_kernel"):
        # (examples, rows, pixels, reduction); the kernels of before examples blocks had one
        # example per program and named the tiles by what they held.
        bb = blocks.get("BLOCK_B", 1)
        bm = blocks.get("BLOCK_M", blocks.get("BLOCK_CO", blocks.get("BLOCK_CI")))
        bn = blocks.get("BLOCK_N", blocks.get("BLOCK_P", blocks.get("BLOCK_Q")))
        bk = blocks["BLOCK_K"]
        fwd = name == "dense_fwd_kernel"
        red = (cin // g) * k * k if fwd else (cout // g) * k * k
        steps = _k_steps(layer, launch, programs, red, bk)  # over all programs
        l2 = steps * (E * bm * bk + bb * bk * bn) * itemsize
        l2 += programs * bb * bm * bn * itemsize  # the stores
        tc = steps * bb * 2 * bm * bn * bk
        cc = steps * bb * 2 * E * bm * bk
        hbm = (x_bytes + out_bytes if fwd else out_bytes + x_bytes) + experts_bytes
        return hbm, l2, tc, cc, conv_flops + mix_flops
    if name == "dense_bwd_w_kernel":
        bco, bk, bp = blocks["BLOCK_CO"], blocks["BLOCK_K"], blocks["BLOCK_P"]
        names = _base(launch.kernel).arg_names
        per_program = launch.args[names.index("B_PER_SPLIT")]  # examples per program
        examples = programs * per_program
        # Without its routing half (NEED_R off: the stationary kernel computes it), no W tiles
        # and half the CUDA-core work.
        halves = 1 if launch.kwargs.get("NEED_R", True) is False else 2
        l2 = (examples * cdiv(P, bp) * (bco * bp + bp * bk) * itemsize  # grad_out, x tiles
              + programs * E * bco * bk * ((halves - 1) * itemsize + 4))  # W in, grads out
        if "E_POW2" not in launch.kwargs:  # the kernel before: W, gw read and written,
            l2 += examples * E * bco * bk * (itemsize + 8)  # per example
        tc = examples * cdiv(P, bp) * 2 * bco * bk * bp
        cc = examples * 2 * halves * E * bco * bk  # routing x G into the gradients, <G, W[e]>
        hbm = x_bytes + out_bytes + experts_bytes + E * kernel_numel * 4
        return hbm, l2, tc, cc, conv_flops + 2 * mix_flops
    if name == "dense_kgrad_sum_kernel":
        # The batch slices' gradients and grad_routing's partial sums read once, the gradients
        # written once: its own traffic, its floor too (a step of the design, not the layer's)
        a = dict(zip(_base(launch.kernel).arg_names, launch.args))
        kw = launch.kwargs
        gw = a["S"] * a["EN"] * 4 * kw["NEED_W"]
        part = a["ROWS"] * a["BE"] * 4 * kw["NEED_R"]
        hbm = gw + part + kw["NEED_W"] * a["EN"] * itemsize + kw["NEED_R"] * a["BE"] * 4
        return hbm, hbm, 0, gw // 4 + part // 4, 0
    # Depthwise: direct arithmetic on CUDA cores. A program's input tile with its halo is
    # counted once from L2 for each of its EXAMPLES (a row of taps loads each column once; the
    # next row's reloads are L1 hits). Forward and grad_x: each program loads its channels'
    # taps of the E experts once, mixes them for its examples and stores them in the buffer of
    # mixed taps (float32), then reads them back once an example: L2 traffic (the buffer's
    # write-back to HBM, 4 bytes a channel and tap of an example, is left out of the floor,
    # which is the layer's).
    taps, s = k * k, layer.stride

    def halo(pixels, out_w, in_w, in_h):  # input pixels under `pixels` output pixels
        rows = cdiv(pixels, out_w) + 1
        return min(in_h, rows * s + k - 1) * in_w
    if name in ("dw_fwd_kernel", "dw_bwd_x_kernel"):
        bc, cols = blocks["BLOCK_C"], blocks["COLS"]
        fwd = name == "dw_fwd_kernel"
        mult = 1 if fwd else cout // cin
        width = cols if fwd else cols * s  # a group's pixels
        groups_a_row = cdiv(wo if fwd else W, width)
        bp = blocks["BLOCK_Q"] * width  # a program's pixels (with the last group's tail)
        tile = (halo(bp, groups_a_row * width, W, H) if fwd else
                halo(bp, groups_a_row * width, wo, ho))
        ex = _dw_examples(B, blocks)
        staged = taps * bc * (E * itemsize + ex * 2 * 4)
        l2 = programs * (mult * (ex * bc * tile * itemsize + staged) + ex * bc * bp * itemsize)
        cc = programs * ex * mult * taps * (2 * bc * bp + 2 * E * bc)
        return x_bytes + out_bytes + experts_bytes, l2, 0, cc, conv_flops + mix_flops
    # dw_bwd_w_kernel: a program per (example, channel tile), over its pixels in blocks of
    # BLOCK_L groups of COLS: per block its grad_out tile and input tile with halo from L2 once
    # (the next row of taps' reloads hit L1); G written once; then the two matrix products on
    # G (routing^T G, G W^T) read it twice.
    bc, cols = blocks["BLOCK_C"], blocks["COLS"]
    bp = blocks["BLOCK_L"] * cols
    g_bytes = B * cout * taps * 4
    nb = _dw_kgrad_blocks(layer, blocks)
    l2 = B * cdiv(cout, bc) * nb * bc * (bp + halo(bp, cdiv(wo, cols) * cols, W, H)) * itemsize
    l2 += g_bytes
    cc = B * cout * taps * 2 * P
    hbm = x_bytes + out_bytes + experts_bytes + 3 * g_bytes + E * kernel_numel * 4
    return hbm, l2, 0, cc, conv_flops + 2 * mix_flops


def _copy_us(layer, itemsize: int, launch: Launch) -> float:
    """The host-side copy a launch needs before it runs, as HBM time: the experts reordered
    tap-major for a dense forward / grad_x with TAP_MAJOR, and for the kernel gradient with
    TAP_MAJOR where it reads them (its routing half, or the scales' gradients; its own
    gradient is put back in order by the copy that converts it to W's dtype anyway); read and
    written once a call, not part of the layer's floor."""
    if not launch.kwargs.get("TAP_MAJOR"):
        return 0.0
    if launch.name == "dense_bwd_w_kernel" and not (launch.kwargs.get("NEED_R")
                                                   or launch.kwargs.get("SCALE_GRADS")):
        return 0.0
    experts = layer.experts * layer.cout * (layer.cin // layer.groups) * layer.kernel ** 2
    return 1e6 * 2 * experts * itemsize / HBM


def stationary_model(itemsize: int, launch: Launch) -> dict:
    """The experts-stationary kernel's traffic, work and time (module docstring): hbm_bytes,
    l2_bytes, smem_bytes, tc_flops, cc_flops (the mix's, or the routing form's reductions),
    floor_flops and serial_us (the program's sum; 2 x that where registers spill is the
    caller's)."""
    from . import stationary
    a = launch.kwargs
    plan, E, K, P, R, B = a["plan"], a["E"], a["K"], a["P"], a["rows"], a["batch"]
    M, bn = stationary.BLOCK_M, plan["BLOCK_N"]
    kp = plan["NUM_KC"] * plan["BLOCK_K"]
    tiles = -(-P // bn)
    n_co, per, count = stationary.programs(B, R, SMS)
    slab = E * M * kp * itemsize
    x_bytes, out_bytes = B * K * P * itemsize, B * R * P * itemsize
    hbm = x_bytes + out_bytes + E * R * K * itemsize
    # L2 -> SM: each program's slab once; each example's (K x P) tile once per row block (the
    # masked copies read no padding); the output written (or, the routing form, grad_out read)
    # once.
    l2 = count * slab + n_co * x_bytes + out_bytes
    floor_flops = 2 * B * R * K * P + 2 * B * E * R * K  # the static layer's and the mix
    product = 2 * M * kp * bn  # one (64 x K) x (K x BLOCK_N) product
    operands = (M * kp + kp * bn) * itemsize  # both from shared memory
    if a["routing"]:
        # Per pixel tile the product D += dual tile x tile^T (64 x K over BLOCK_N pixels), both
        # operands from shared memory; per example D against each expert's slab: per slab
        # value a conversion, an FMA and half a shared-memory load (two values a load).
        reduce = E * M * kp
        per_example = (tiles * max(product / TC_SM, operands / SMEM_SM)
                       + max(2.5 * reduce / ISSUE_SM, reduce * itemsize / SMEM_SM))
        tc = n_co * B * tiles * product
        cc = n_co * B * 2 * reduce
        smem = n_co * B * (tiles * operands + reduce * itemsize)
    else:
        # The mix: per slab value, a conversion and an FMA (an issue slot each) and its share
        # of the shared-memory read; the mixed kernel converted two values an instruction (and
        # written to shared memory, A_SMEM). Then per pixel tile the product (A from registers
        # up to 64 pixels: only the x tile from shared memory) and the epilogue (a conversion
        # and a store issue per output element, per lane).
        mixed = E * M * kp
        mix_smem = mixed * itemsize + (M * kp * itemsize if plan["A_SMEM"] else 0)
        mix = max((2 * mixed + M * kp / 2) / ISSUE_SM, mix_smem / SMEM_SM)
        tile_smem = operands if plan["A_SMEM"] else kp * bn * itemsize
        per_example = mix + tiles * (max(product / TC_SM, tile_smem / SMEM_SM)
                                     + 2 * M * bn / ISSUE_SM)
        tc = n_co * B * tiles * product
        cc = n_co * B * 2 * mixed
        smem = n_co * B * (mix_smem + tiles * tile_smem)
    serial = count * slab / L2 + per * per_example
    return dict(hbm_bytes=hbm, l2_bytes=l2, smem_bytes=smem, tc_flops=tc, cc_flops=cc,
                floor_flops=floor_flops, serial_us=1e6 * serial, programs=count,
                examples_per_program=per)


def mix_model(itemsize: int, launch: Launch) -> dict:
    """The experts-stationary kernel with the mix on the tensor cores (:mod:`.stationary_mix`):
    hbm_bytes (x, the output and the experts once), l2_bytes (each program's E expert rows
    once, each example's x once per row block, the output once), smem_bytes and tc_flops (per
    block of NB examples and chunk of 16 channels: the 8 mix products, each reading a (64 x 16)
    slab tile and the routing block, and the NB mixed tiles stored; per chunk of a unit's x
    (NB examples' tiles, or one example's TILES) its copy in and the 4 products reading the
    x tiles and their mixed tiles, or with REG_A (one tile an example) the mixed tiles
    shuffled into registers, neither stored nor read; per example the output staged through
    shared memory),
    floor_flops, and serial_us: the mix, the stores and the products one after another (each
    the longer of its tensor-core work and its shared-memory bytes; the copies' writes with
    the stores), the staging, plus the slab's copy from L2. Latencies (the waits, the barriers,
    the loads' round trips) are left out."""
    from . import stationary_mix as sm
    a = launch.kwargs
    plan, E, K, P, R, B = a["plan"], a["E"], a["K"], a["P"], a["rows"], a["batch"]
    M, bn, nb, chunks, tiles = sm.BLOCK_M, plan["BLOCK_N"], sm.NB, plan["NUM_C"], plan["TILES"]
    n_co, per, count = sm.programs(B, R, SMS)
    x_bytes, out_bytes = B * K * P * itemsize, B * R * P * itemsize
    hbm = x_bytes + out_bytes + E * R * K * itemsize
    l2 = count * E * M * K * itemsize + n_co * x_bytes + out_bytes
    floor_flops = 2 * B * R * K * P + 2 * B * E * R * K
    tile = M * sm.CHUNK * itemsize  # a (64 x 16) tile: a slab tile, a mixed tile
    mix_tc = 8 * 2 * M * sm.CHUNK * 2 * nb
    mix_smem = 8 * (tile + sm.CHUNK * 2 * nb * itemsize)
    # the mixed tiles through shared memory (stored, then read by the products), or, REG_A,
    # shuffled into the products' A operands in registers
    stored = 0 if plan.get("REG_A") else nb * tile
    mix = max(mix_tc / TC_SM, mix_smem / SMEM_SM) + stored / SMEM_SM  # a block's chunk
    x_chunk = nb * sm.CHUNK * bn * itemsize  # a unit's chunk (its copy two chunks ahead)
    conv_tc = nb * 2 * M * sm.CHUNK * bn  # its 4 products
    conv_smem = stored + x_chunk
    conv = x_chunk / SMEM_SM + max(conv_tc / TC_SM, conv_smem / SMEM_SM)
    units_a_block = 1 if tiles == 1 else nb  # (a block of one-tile examples, or nb examples)
    staging = 2 * M * bn * itemsize * tiles  # an example's output, written and read
    blocks = cdiv(per, nb)
    serial = (count * E * M * K * itemsize / L2
              + blocks * chunks * (mix + units_a_block * conv) + per * staging / SMEM_SM)
    n_blocks = n_co * cdiv(B, nb)  # (row block, block of examples) pairs
    return dict(hbm_bytes=hbm, l2_bytes=l2,
                smem_bytes=n_blocks * chunks * (mix_smem + stored
                                                + units_a_block * (x_chunk + conv_smem))
                + n_co * B * staging,
                tc_flops=n_blocks * chunks * (mix_tc + units_a_block * conv_tc), cc_flops=0,
                floor_flops=floor_flops, serial_us=1e6 * serial, programs=count,
                examples_per_program=per, blocks=blocks)


def _serial_record(layer, launch: Launch, config: str, m: dict, info: dict) -> dict:
    """The record of a launch of one of the Gluon kernels whose model has a serial sum (the
    experts-stationary kernels): the layer, the configuration, the model's numbers and the
    compiled kernel's info."""
    return dict(layer=layer.name, shape=layer.describe(), kernel=launch.name, config=config,
                examples_per_program=m["examples_per_program"], grid=m["programs"],
                hbm_bytes=m["hbm_bytes"], l2_bytes=m["l2_bytes"], smem_bytes=m["smem_bytes"],
                tc_flops=m["tc_flops"], cc_flops=m["cc_flops"],
                floor_us=1e6 * max(m["floor_flops"] / TC, m["hbm_bytes"] / HBM),
                serial_us=m["serial_us"], **info)


def _mix_record(layer, dtype: torch.dtype, itemsize: int, launch: Launch, arch: int,
                cache: dict) -> dict:
    """The record of one launch of the kernel with the mix on the tensor cores: compiled at its
    plan, modeled by :func:`mix_model`, its issue time from its main loop (a chunk an
    iteration, NUM_C a block of examples); the modeled time the longest of HBM, L2, the issue
    time and the serial sum."""
    from . import stationary_mix as sm
    a = launch.kwargs
    plan = a["plan"]
    key = (launch.name, a["E"], a["K"], a["P"], a["has_bias"], dtype)
    info = _compile_info(cache, key, lambda: sm.compile_for(
        a["E"], a["K"], a["P"], dtype, arch, a["transposed"], a["has_bias"]), arch)
    m = mix_model(itemsize, launch)
    record = _serial_record(layer, launch, f"16x{plan['NUM_C']}x{plan['BLOCK_N']}"
                                           f"{'' if plan['TILES'] == 1 else 'x' + str(plan['TILES'])}"
                                           f" nb{sm.NB} w{sm.WARPS}", m, info)
    if "error" in info:
        record["modeled_us"] = float("inf")
        return record
    hot, inner = info.get("loop_instructions") or 0, info.get("loop_inner_instructions") or 0
    chunks = plan["NUM_C"]
    if plan["TILES"] == 1:  # a loop over the blocks of examples around the loop over chunks
        per_program = m["blocks"] * (hot + (chunks - 1) * inner)
    else:  # around the mix's loop over chunks, then the examples' loop around theirs
        mix, example, conv = (info.get("loop_nested") or [0, 0, 0])[:3]
        per_program = m["blocks"] * (hot + (chunks - 1) * mix + (sm.NB - 1) * example
                                     + sm.NB * (chunks - 1) * conv)
    record["issue_us"] = 1e6 * m["programs"] * per_program * sm.WARPS / (SMS * 4 * CLOCK)
    fill = min(1.0, m["programs"] / SMS)
    record["modeled_us"] = max(1e6 * m["hbm_bytes"] / HBM, 1e6 * m["l2_bytes"] / L2 / fill,
                               m["serial_us"], record["issue_us"]) * (
        2.0 if info["spill_bytes"] > 0 else 1.0)
    return record


def pointwise_grad_model(itemsize: int, launch: Launch) -> dict:
    """The kernel gradient in the accumulator's layout (:mod:`.pointwise_grad`): hbm_bytes (as
    the Triton kernel gradient's: x, grad_out, the experts read, float32 gradients written
    once), l2_bytes (grad_out once per tile of input channels and x once per tile of output
    channels (the masked copies read no padding), per program the E expert tiles in and the
    gradients out, per (tile, example) a warp's E partial sums), tc_flops (padded tiles),
    cc_flops (the fold: routing x G into each gradient, <G, W[e]>), floor_flops, and the
    programs and examples a program."""
    from . import pointwise_grad as pg
    a = launch.kwargs
    E, cin, cout, P, B, plan = a["E"], a["cin"], a["cout"], a["P"], a["batch"], a["plan"]
    n_ci, n_co, per, count = pg.programs(B, cin, cout, plan)
    tile = pg.BLOCK_CO * plan["BLOCK_CI"]
    tiles = cdiv(P, pg.BLOCK_P)
    halves = int(a["need_r"]) + int(a["need_w"])
    examples = n_ci * n_co * B  # (tile, example) pairs
    x_bytes, g_bytes = B * cin * P * itemsize, B * cout * P * itemsize
    hbm = x_bytes + g_bytes + E * cout * cin * (itemsize + 4)
    l2 = (n_ci * g_bytes + n_co * x_bytes
          + count * E * tile * (itemsize * a["need_r"] + 4 * a["need_w"])
          + examples * plan["WARPS"] * E * 4 * a["need_r"])
    tc = examples * tiles * 2 * tile * pg.BLOCK_P
    cc = examples * 2 * halves * E * tile
    floor_flops = 2 * B * cout * cin * P + 2 * halves * B * E * cout * cin
    return dict(hbm_bytes=hbm, l2_bytes=l2, tc_flops=tc, cc_flops=cc, floor_flops=floor_flops,
                programs=count, examples_per_program=per, tiles=tiles)


def _pointwise_grad_record(layer, dtype: torch.dtype, itemsize: int, launch: Launch, arch: int,
                           cache: dict) -> dict:
    """The record of one launch of the kernel gradient in the accumulator's layout: compiled
    at its plan, modeled by :func:`pointwise_grad_model` and its issue time."""
    from . import pointwise_grad as pg
    a = launch.kwargs
    warps = a["plan"]["WARPS"]
    key = (POINTWISE_GRAD, a["E"], a["cin"], a["cout"], a["P"], a["need_r"], a["need_w"], warps,
           dtype)
    info = _compile_info(cache, key, lambda: pg.compile_for(
        a["E"], a["cin"], a["cout"], a["P"], dtype, arch, a["need_r"], a["need_w"], warps), arch)
    m = pointwise_grad_model(itemsize, launch)
    record = dict(layer=layer.name, shape=layer.describe(), kernel=POINTWISE_GRAD,
                  config=f"64x{a['plan']['BLOCK_CI']}x{pg.BLOCK_P} buf{a['plan']['NBUF']} "
                         f"w{warps}{'' if a['need_r'] else ' (weight)'}",
                  examples_per_program=m["examples_per_program"], grid=m["programs"],
                  hbm_bytes=m["hbm_bytes"], l2_bytes=m["l2_bytes"], tc_flops=m["tc_flops"],
                  cc_flops=m["cc_flops"],
                  floor_us=1e6 * max(m["floor_flops"] / TC, m["hbm_bytes"] / HBM), **info)
    if "error" in info:
        record["modeled_us"] = float("inf")
        return record
    hot, inner = info.get("loop_instructions"), info.get("loop_inner_instructions") or 0
    # A loop over the program's examples around the loop over their pixel tiles.
    per_program = (m["examples_per_program"] * (hot + (m["tiles"] - 1) * inner)
                   if hot is not None else 0)
    record["issue_us"] = 1e6 * m["programs"] * per_program * warps / (SMS * 4 * CLOCK)
    record["modeled_us"] = modeled_us(m["hbm_bytes"], m["l2_bytes"], m["tc_flops"],
                                      m["cc_flops"], m["programs"], info["tensor_core"],
                                      info["spill_bytes"] > 0, record["issue_us"])
    return record


def _dw_examples(batch: int, blocks) -> float:
    """A depthwise forward / grad_x program's examples (on average where the last block of the
    batch is short)."""
    return batch / cdiv(batch, blocks.get("EXAMPLES", 1))


def _dw_rows(layer, name: str, blocks, batch: int) -> float:
    """A depthwise forward / grad_x program's rows of taps: kh for each of its examples (and,
    grad_x, each channel multiplier's)."""
    mult = layer.cout // layer.cin if name == "dw_bwd_x_kernel" else 1
    return _dw_examples(batch, blocks) * mult * layer.kernel


def _dw_kgrad_blocks(layer, blocks) -> int:
    """A depthwise kernel-gradient program's blocks of BLOCK_L groups of COLS output pixels."""
    ho, wo = layer.out_hw
    return cdiv(ho * cdiv(wo, blocks["COLS"]), blocks["BLOCK_L"])


def modeled_us(hbm, l2, tc, cc, programs, tensor_core: str, spills: bool,
               issue: float = 0.0, latency: float = 0.0) -> float:
    fill = min(1.0, programs / SMS)
    tc_rate = TC if tensor_core == "wgmma" else TC / 2 if tensor_core == "mma" else CC
    t = max(hbm / HBM, l2 / L2 / fill, tc / tc_rate / fill, cc / CC / fill, issue / 1e6,
            latency / 1e6)
    return 1e6 * t * (2.0 if spills else 1.0)


# The latency term of the dense kernels, fitted to what the autotuner measured on an H200 (the
# third GPU run: every configuration of the 1x1 layers' dense forward, grad_x and kernel
# gradient at batch 256 in bfloat16, bench/tuner_timings.py; gpu-model.md, "Against the
# tuner's timings"). A dense forward / grad_x program spends about DOT_CYCLES a K step on each
# example of its block, about the same for 64 x 64 and 128 x 64 tiles, K steps of 16 and 32,
# 4 and 8 warps: its examples' work (the mix into each one's operand, its dot, the barriers
# around its tiles, two a K step per example in the compiled code) adds up where the traffic
# terms say the examples share the loads. (The fastest configuration, two programs an SM of
# two examples, also sits at its L2 term there: 40 KB a K step a program at ~5.5 TB/s.) A
# kernel-gradient program spends KGRAD_TILE_CYCLES + KGRAD_PIXEL_CYCLES x BLOCK_P a pixel tile
# and KGRAD_FOLD_CYCLES an example's fold. The programs an SM holds at once (as many as its
# registers, shared memory and warp slots allow) overlap; the waves of them follow each other.
DOT_CYCLES = 700
KGRAD_TILE_CYCLES, KGRAD_PIXEL_CYCLES, KGRAD_FOLD_CYCLES = 300, 8, 1200
# The depthwise kernels' latency term, fitted to the same run's timings of every configuration
# of five depthwise forwards, a grad_x and a kernel gradient: whatever its tile (the row loop
# 219-691 instructions, 12-36 loads into registers) and programs an SM (2-4), a forward or
# grad_x program spends about DW_ROW_CYCLES on each row of taps of each of its examples (the
# row's loads, then its FMAs, waited for in turn), and DW_PROGRAM_CYCLES once (its mixed taps
# staged, its first loads); a kernel-gradient program DW_KGRAD_BLOCK_CYCLES on each block of
# its pixels. Their issue floor alone was 1.4-2.9x under the measured times.
DW_PROGRAM_CYCLES, DW_ROW_CYCLES, DW_KGRAD_BLOCK_CYCLES = 2750, 1950, 4850
# A row of taps whose loads Triton copies asynchronously rows ahead (ROW_STAGES > 1): a
# prediction, not a fit (no GPU has run one yet): about half DW_ROW_CYCLES, the row's loads no
# longer waited for, what is left its shared-memory reads, FMAs and two barriers, near the
# issue time of the SM's resident programs.
DW_PIPELINED_ROW_CYCLES = 1000
SM_REGISTERS, SM_SHARED, SM_WARPS = 65536, 228 * 1024, 64


def resident(registers: int, warps: int, shared: int) -> int:
    """Programs of ``warps`` warps, ``registers`` a thread and ``shared`` bytes of shared
    memory an SM holds at once (registers allocated in eights a thread, 1 KB of shared memory
    reserved a program)."""
    per_program = -(-max(registers, 1) // 8) * 8 * 32 * warps
    return max(1, min(SM_REGISTERS // per_program, SM_SHARED // (shared + 1024),
                      SM_WARPS // warps))


def latency_us(layer, launch: Launch, blocks, programs: int, warps: int, info: dict,
               batch: int) -> float:
    """The latency term of the dense and depthwise kernels (see DOT_CYCLES and DW_ROW_CYCLES):
    each program's serial cycles, times the waves of programs the SMs hold at once; 0 for the
    other kernels."""
    name = launch.name
    if name in ("dense_fwd_kernel", "dense_bwd_x_kernel"):
        reduced = layer.cin if name == "dense_fwd_kernel" else layer.cout
        red = reduced // layer.groups * layer.kernel ** 2
        steps = _k_steps(layer, launch, programs, red, blocks["BLOCK_K"]) / programs
        cycles = steps * blocks.get("BLOCK_B", 1) * DOT_CYCLES
    elif name == "dense_bwd_w_kernel":
        names = _base(launch.kernel).arg_names
        examples = launch.args[names.index("B_PER_SPLIT")]
        ho, wo = layer.out_hw
        tiles = cdiv(ho * wo, blocks["BLOCK_P"])
        cycles = examples * (tiles * (KGRAD_TILE_CYCLES + KGRAD_PIXEL_CYCLES * blocks["BLOCK_P"])
                             + KGRAD_FOLD_CYCLES)
    elif name in ("dw_fwd_kernel", "dw_bwd_x_kernel"):  # as issue_us counts the rows of taps
        row = DW_ROW_CYCLES if blocks.get("ROW_STAGES", 1) <= 1 else DW_PIPELINED_ROW_CYCLES
        cycles = DW_PROGRAM_CYCLES + _dw_rows(layer, name, blocks, batch) * row
    elif name == "dw_bwd_w_kernel":
        cycles = _dw_kgrad_blocks(layer, blocks) * DW_KGRAD_BLOCK_CYCLES
    else:
        return 0.0
    waves = cdiv(programs, SMS * resident(info["registers"], warps, info["shared_bytes"]))
    return 1e6 * waves * cycles / CLOCK


def issue_us(layer, launch: Launch, blocks, programs: int, warps: int, info: dict,
             batch: int) -> float:
    """The launch's issue floor: the instructions its programs' main loops issue (a warp's
    count, times the ``warps``, over 4 schedulers an SM at ``CLOCK``), from the loop counts of
    :func:`sass.hot_loop` and the kernel's trip counts; 0 where either is unknown (the
    stationary kernel has its own serial model). Only the main loop is counted (and, where it
    holds one, the loop inside it): set-up and epilogues are left out, so this is a floor."""
    hot, inner = info.get("loop_instructions"), info.get("loop_inner_instructions") or 0
    if hot is None:
        return 0.0
    ho, wo = layer.out_hw
    name, k, g = launch.name, layer.kernel, layer.groups
    if name in ("dense_fwd_kernel", "dense_bwd_x_kernel"):  # one K loop
        red = (layer.cin // g if name == "dense_fwd_kernel" else layer.cout // g) * k * k
        per_program = _k_steps(layer, launch, programs, red, blocks["BLOCK_K"]) / programs * hot
    elif name == "dense_bwd_w_kernel":
        names = _base(launch.kernel).arg_names
        examples = launch.args[names.index("B_PER_SPLIT")]
        tiles = cdiv(ho * wo, blocks["BLOCK_P"])
        if tiles <= 64:  # (example, tile) in one loop, the fold after the last tile only
            fold = info.get("loop_skipped") or 0
            per_program = examples * (tiles * (hot - fold) + fold)
        else:  # a loop over examples around the loops over their tiles
            per_program = examples * (hot + (tiles - 1) * inner)
    elif name in ("dw_fwd_kernel", "dw_bwd_x_kernel"):
        # the loop over the rows of taps (the innermost: inside the loop over the program's
        # examples and, grad_x, the channel multiplier's), k a channel multiplier and example;
        # an example's epilogue, in the examples' loop, left out as before that loop
        row = (info.get("loop_innermost") or [hot])[-1]
        per_program = _dw_rows(layer, name, blocks, batch) * row
    elif name == "dw_bwd_w_kernel":  # blocks of groups of pixels, the rows of taps unrolled
        per_program = _dw_kgrad_blocks(layer, blocks) * hot
    else:
        return 0.0
    return 1e6 * programs * per_program * warps / (SMS * 4 * CLOCK)


def _compiled_info(compiled, arch: int) -> dict:
    """Registers, spills, shared memory, tensor-core and asynchronous-copy instructions of a
    compiled kernel, and its main loop's counts per iteration (:func:`sass.hot_loop`)."""
    ptx = compiled.asm["ptx"]
    return dict(ptxas_usage(ptx, arch), shared_bytes=compiled.metadata.shared,
                tensor_core=("wgmma" if "wgmma.mma_async" in ptx else
                             "mma" if "mma.sync" in ptx else "none"),
                async_copy=("tma" if "cp.async.bulk.tensor" in ptx else
                            "cp.async" if "cp.async" in ptx else "none"),
                **sass.hot_loop(sass.disassemble(compiled.asm["cubin"]),
                                compiled.metadata.num_warps))


def _compile_info(cache: dict, key, build, arch: int) -> dict:
    """The compiled kernel's info (or the error) for ``key``, compiling with ``build()`` once."""
    if key not in cache:
        try:
            cache[key] = _compiled_info(build(), arch)
        except Exception as exc:  # noqa: BLE001 -- reported in the record
            cache[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[-1][:200]}"}
    return cache[key]


def _stationary_record(layer, batch: int, dtype: torch.dtype, itemsize: int, launch: Launch,
                       arch: int, cache: dict) -> dict:
    """The record of one experts-stationary launch: compiled at its plan, modeled by
    :func:`stationary_model`."""
    from . import stationary
    a = launch.kwargs
    plan = a["plan"]
    key = (launch.name, a["E"], a["K"], a["P"], a["has_bias"], a["scaled"], dtype)
    info = _compile_info(cache, key, lambda: stationary.compile_for(
        a["E"], a["K"], a["P"], dtype, arch, a["transposed"], a["routing"], a["has_bias"],
        a["scaled"]), arch)
    m = stationary_model(itemsize, launch)
    config = (f"{plan['BLOCK_K']}x{plan['NUM_KC']}x{plan['BLOCK_N']}"
              f"{' A_smem' if plan['A_SMEM'] else ''} buf{plan['NBUF']} w{stationary.WARPS}")
    record = _serial_record(layer, launch, config, m, info)
    if "error" in info:
        record["modeled_us"] = float("inf")
    else:
        fill = min(1.0, m["programs"] / SMS)
        spills = info["spill_bytes"] > 0 or info["shared_bytes"] > _config.SHARED_LIMIT
        record["modeled_us"] = max(1e6 * m["hbm_bytes"] / HBM, 1e6 * m["l2_bytes"] / L2 / fill,
                                   m["serial_us"]) * (2.0 if spills else 1.0)
    return record


def config_label(blocks: dict, warps: int, stages: int) -> str:
    """A configuration as the records name it: its tile sizes joined by x, then its warps and
    stages (``2x64x64x32 w4 s3``)."""
    return "x".join(str(v) for v in blocks.values()) + f" w{warps} s{stages}"


def config_record(layer, batch: int, itemsize: int, launch: Launch, config, arch: int = 90,
                  cache: Optional[dict] = None) -> dict:
    """The record of one of the Triton kernels' launches at one configuration (tile sizes,
    warps, stages): compiled (``cache``: compiled infos by launch and configuration, shared
    between calls) and modeled."""
    cache = {} if cache is None else cache
    key = (launch.name, repr(launch.args), repr(sorted(launch.kwargs.items())), repr(config))
    info = _compile_info(cache, key, lambda: compile_launch(launch, config, arch)[0], arch)
    blocks = config[0]
    programs = _grid(launch, blocks)
    hbm, l2, tc, cc, floor_flops = model(layer, batch, itemsize, launch, blocks, programs)
    record = dict(layer=layer.name, shape=layer.describe(),
                  kernel=launch.name.replace("_kernel", ""),
                  config=config_label(blocks, config[1], config[2]),
                  examples_per_program=blocks.get("BLOCK_B", blocks.get("EXAMPLES", 1)),
                  grid=programs, hbm_bytes=hbm, l2_bytes=l2, tc_flops=tc, cc_flops=cc,
                  floor_us=1e6 * max(floor_flops / TC, hbm / HBM), **info)
    if "error" in info:
        record["modeled_us"] = float("inf")
        return record
    record["issue_us"] = issue_us(layer, launch, blocks, programs, config[1], info, batch)
    record["latency_us"] = latency_us(layer, launch, blocks, programs, config[1], info,
                                      batch)
    spills = info["spill_bytes"] > 0 or info["shared_bytes"] > _config.SHARED_LIMIT
    record["modeled_us"] = modeled_us(hbm, l2, tc, cc, programs, info["tensor_core"], spills,
                                      record["issue_us"], record["latency_us"]) + _copy_us(
        layer, itemsize, launch)
    return record


def report(batch: int = 256, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True,
           arch: int = 90, every_config: bool = False, layers=None, progress=None,
           scales: bool = False, stationary=frozenset()):
    """One record per (layer, kernel) (per configuration with ``every_config``); ``scales``:
    the kernels with the three per-example scales; ``stationary``: the passes of the backend's
    switch to the experimental Hopper kernels that are on (True: all)."""
    from ..profile import efficientnet_cc_b0_layers
    layers = layers if layers is not None else efficientnet_cc_b0_layers(8)
    itemsize = torch.empty((), dtype=dtype).element_size()
    records, compiled_cache = [], {}
    for layer in layers:
        for launch in layer_launches(layer, batch, dtype, channels_last, scales, stationary):
            if launch.name in STATIONARY_PASSES:
                records.append(_stationary_record(layer, batch, dtype, itemsize, launch, arch,
                                                  compiled_cache))
                continue
            if launch.name in MIX_PASSES:
                records.append(_mix_record(layer, dtype, itemsize, launch, arch,
                                           compiled_cache))
                continue
            if launch.name == POINTWISE_GRAD:
                records.append(_pointwise_grad_record(layer, dtype, itemsize, launch, arch,
                                                      compiled_cache))
                continue
            options = [config_record(layer, batch, itemsize, launch, config, arch,
                                     compiled_cache) for config in configurations(launch)]
            if every_config:
                records += options
            else:
                records.append(min(options, key=lambda r: r["modeled_us"]))
        if progress:
            progress(layer.name)
    return records


def format_table(records) -> str:
    head = ("| layer | shape | kernel | config | B/prog | grid | regs | spill B | shared KiB | "
            "tensor core | async | loop instr / bar / ldg | HBM MB | L2 MB | L2/HBM | smem MB | "
            "issue / latency us | floor us | modeled us | /floor |")
    lines = [head, "|" + "---|" * 20]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['shape']} | {r['kernel']} | {r['config']} | "
                         f"{r['error']} |" + " |" * 15)
            continue
        issue = f"{r['issue_us']:.1f}" if r.get("issue_us") else "-"
        if r.get("latency_us"):
            issue += f" / {r['latency_us']:.1f}"
        smem = f"{r['smem_bytes'] / 1e6:.1f}" if "smem_bytes" in r else "-"
        loop = ("-" if r.get("loop_instructions") is None else
                f"{r['loop_instructions']} / {r['loop_barriers']} / {r['loop_sync_loads']}")
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['kernel']} | {r['config']} | "
            f"{r['examples_per_program']} | {r['grid']} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['tensor_core']} | "
            f"{r['async_copy']} | {loop} | {r['hbm_bytes'] / 1e6:.1f} | "
            f"{r['l2_bytes'] / 1e6:.1f} | "
            f"{r['l2_bytes'] / r['hbm_bytes']:.1f} | {smem} | {issue} | {r['floor_us']:.1f} | "
            f"{r['modeled_us']:.1f} | {r['modeled_us'] / r['floor_us']:.2f} |")
    return "\n".join(lines)


def summary(records) -> str:
    ok = [r for r in records if "error" not in r]
    lines = []
    for kernel in sorted({r["kernel"] for r in ok}):
        rs = [r for r in ok if r["kernel"] == kernel]
        geo = math.exp(sum(math.log(r["modeled_us"] / r["floor_us"]) for r in rs) / len(rs))
        lines.append(f"- {kernel}: {len(rs)} layers, modeled {sum(r['modeled_us'] for r in rs):.0f}"
                     f" us against a floor of {sum(r['floor_us'] for r in rs):.0f} us "
                     f"(geomean {geo:.2f}x the floor); spills in "
                     f"{sum(r['spill_bytes'] > 0 for r in rs)}, L2 > 4x HBM in "
                     f"{sum(r['l2_bytes'] > 4 * r['hbm_bytes'] for r in rs)}")
        waits = sum(bool(r.get("loop_full_waits")) for r in rs)
        if waits:
            lines[-1] += f", copies not pipelined in {waits}"
    forwards = [r for r in ok if r["kernel"].endswith("_fwd")]  # one a layer
    if forwards:
        geo = math.exp(sum(math.log(r["modeled_us"] / r["floor_us"]) for r in forwards)
                       / len(forwards))
        lines.append(f"- static targets: the {len(forwards)} layers' forward {geo:.2f}x the "
                     f"floor (geomean; target 1.5x); L2 > 4x HBM in "
                     f"{sum(r['l2_bytes'] > 4 * r['hbm_bytes'] for r in ok)} of {len(ok)} "
                     f"launches (target 0); spills in "
                     f"{sum(r['spill_bytes'] > 0 for r in ok)} (target 0)")
    return "\n".join(lines)


def compare(before, after) -> str:
    """Per layer and kernel: modeled microseconds before and after, and the floor."""
    old = {(r["layer"], r["kernel"]): r for r in before}
    lines = ["| layer | shape | kernel | floor us | before us | after us | before / floor | "
             "after / floor | after L2/HBM | after spill B |", "|" + "---|" * 10]
    for r in after:
        b = old.get((r["layer"], r["kernel"]))
        if b is None or "error" in r or "error" in b:
            continue
        lines.append(f"| {r['layer']} | {r['shape']} | {r['kernel']} | {r['floor_us']:.1f} | "
                     f"{b['modeled_us']:.1f} | {r['modeled_us']:.1f} | "
                     f"{b['modeled_us'] / b['floor_us']:.2f} | "
                     f"{r['modeled_us'] / r['floor_us']:.2f} | "
                     f"{r['l2_bytes'] / r['hbm_bytes']:.1f} | {r['spill_bytes']} |")
    return "\n".join(lines)


def _efficientnet_layers():
    from ..profile.layers import efficientnet_cc_b0_layers
    return efficientnet_cc_b0_layers(8)


def _resnet_layers():
    from ..profile.layers import resnet_condconv_layers
    return resnet_condconv_layers(8)


# --model: (what the title calls the layers, the layers).
MODELS = {"efficientnet": ("tf_efficientnet_cc_b0_8e", _efficientnet_layers),
          "resnet": ("ResNet-18/34 dense 3x3 (8 experts)", _resnet_layers)}


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--arch", type=int, default=90, help="The compute capability x 10.")
    p.add_argument("--batch", type=int, default=256, help="The batch size of the shapes.")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="The dtype of the kernels.")
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "contiguous"],
                   help="The memory layout of the input.")
    p.add_argument("--all", action="store_true", help="Every configuration, not the best.")
    p.add_argument("--first", type=int, help="Only the first N layers.")
    p.add_argument("--layers", help="Only these layers (comma-separated names).")
    p.add_argument("--json", help="Write the records here.")
    p.add_argument("--before", help="A JSON of an earlier report: print the two side by side.")
    p.add_argument("--scales", action="store_true",
                   help="Give every layer the three per-example scales (ODConv's attentions).")
    p.add_argument("--stationary", nargs="?", const="all", default="0", metavar="PASSES",
                   help="The backend as CONDCONV_TRITON_STATIONARY=1 runs it (or set to PASSES: "
                        "a comma-separated subset of forward, grad_x, routing, kernel_grad, "
                        "mix): the "
                        "1x1 passes the experimental Hopper kernels take, each modeled by its "
                        "rule.")
    p.add_argument("--model", default="efficientnet", choices=sorted(MODELS),
                   help="Whose layers: tf_efficientnet_cc_b0_8e's 24, or a ResNet's dense 3x3.")
    args = p.parse_args(argv)
    if _config.INTERPRET:
        p.error("run without TRITON_INTERPRET=1 (see the module's docstring)")
    from .. import _env
    try:
        passes = _env.stationary_passes(args.stationary)
    except ValueError as error:
        p.error(f"argument --stationary: {error}")
    title, make_layers = MODELS[args.model]
    layers = make_layers()[:args.first]
    if args.layers:
        names = [n.strip() for n in args.layers.split(",") if n.strip()]
        unknown = sorted(set(names) - {layer.name for layer in layers})
        if unknown:
            p.error(f"argument --layers: unknown layer(s) {', '.join(unknown)}; choose from "
                    f"{', '.join(layer.name for layer in layers)}")
        layers = [layer for layer in layers if layer.name in names]
    records = report(args.batch, getattr(torch, args.dtype), args.layout == "channels_last",
                     args.arch, args.all, layers,
                     progress=lambda name: print(f"compiled {name}", file=sys.stderr),
                     scales=args.scales, stationary=passes)
    on = ("" if not passes else " (experts-stationary kernel on)"
          if passes == _env.STATIONARY_PASSES else
          f" (CONDCONV_TRITON_STATIONARY={','.join(sorted(passes))})")
    print(f"triton backend{on}, "
          f"{title} layers"
          f"{' with the three per-example scales' if args.scales else ''}, batch {args.batch}, "
          f"{args.dtype}, {args.layout}, sm_{args.arch} (static model, no GPU)\n")
    print(format_table(records))
    print()
    print(summary(records))
    if args.before:
        with open(args.before) as f:
            print("\n" + compare(json.load(f), records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
