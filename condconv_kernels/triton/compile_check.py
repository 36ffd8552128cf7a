"""The Triton kernels compiled ahead of time for a GPU architecture, on any machine (Triton's
compiler and its ptxas need no GPU): ``python -m condconv_kernels.triton.compile_check``.

Catches what the interpreter cannot: code that does not lower to the GPU (types, layouts,
tensor-core dots) and tiles whose shared memory exceeds what a block may use. Every kernel is
compiled in every dtype with the configuration ``CONDCONV_TRITON_AUTOTUNE=0`` launches
(``_config.fixed_config``: from the first of its table on), and in float32 and bfloat16 with
each other configuration of its table (with ``--quick``, the largest only). Prints one line
per variant (shared memory, tensor-core instructions) and exits 1 if any variant fails or
does not fit; the dense kernel gradient's sum kernel (no tiles) in every dtype. The
experimental Gluon kernels (``stationary.py``, ``stationary_mix.py``, ``pointwise_grad.py``)
are compiled at their ``COMPILE_CASES`` in float16 and bfloat16.

The tables are H100's: at ``--arch 90`` every configuration must fit. For another GPU
(``--arch 80``: A100; 86 and 89: the RTX 30 and 40 series, A10, L4, L40, with 99 KB a block;
75: T4, 64 KB) the dense forward / grad_x get the stages their launch gets there
(``_config.fitting_stages`` at that GPU's shared memory), a fixed configuration that still
does not fit is compiled again with fewer stages, as its launch is retried (the triton
backend's ``_launch``), and an autotuned one that does not fit is reported and not counted
(the tuner skips it); the Gluon kernels, sm_90 only, are not compiled.

Run it in a process without ``TRITON_INTERPRET=1``: the interpreter patches the compiler's
builder once a kernel has been interpreted.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..cli import parser
from . import _config, dense, depthwise, pointwise_grad, stationary, stationary_mix

# kernel, its tile names (as the launcher passes them), its pointers in the accumulation dtype
# (besides the routing and the scales).
KERNELS = {
    "dense_fwd": (dense.dense_fwd_kernel, _config.DENSE_TILES, ()),
    "dense_bwd_x": (dense.dense_bwd_x_kernel, _config.DENSE_TILES, ()),
    "dense_bwd_w": (dense.dense_bwd_w_kernel, _config.KGRAD_TILES,
                    ("gw_ptr", "part_ptr", "qc_ptr", "qk_ptr")),
    "dw_fwd": (depthwise.dw_fwd_kernel, _config.DW_TILES, ("T_ptr",)),
    "dw_bwd_x": (depthwise.dw_bwd_x_kernel, _config.DW_TILES, ("T_ptr",)),
    "dw_bwd_w": (depthwise.dw_bwd_w_kernel, _config.DW_KGRAD_TILES, ("G_ptr",)),
}
# The kernels that take the per-example scales, compiled again with all three (name + "+scales").
SCALED = ("dense_fwd", "dense_bwd_x", "dense_bwd_w", "dw_fwd", "dw_bwd_x")
# The dense kernel gradient's three loops: where an example's pixels fit one tile (name +
# "+one_tile": one loop over (example, tile) without the fold's branch), over CHAIN tiles
# (+ "+long": nested loops and two-level sums); otherwise every variant has 256 pixels an
# example (several tiles, one loop).
PIXEL_VARIANTS = {"dense_bwd_w": ("+one_tile", "+long")}
# The dense kernels reduce over (tap, channel) for a channels_last input (TAP_MAJOR);
# + "+nchw": over (channel, tap), as for a contiguous one.
LAYOUT_VARIANTS = {"dense_fwd": ("+nchw",), "dense_bwd_x": ("+nchw",), "dense_bwd_w": ("+nchw",)}
# The depthwise kernels at stride 2 (+ "+s2"): the column stride is a compile-time constant
# there (a group's columns reach twice as many input columns), and grad_x's input columns take
# only the taps of their parity; the dense grad_x runs phase by phase (PHASES).
STRIDE_VARIANTS = {"dw_fwd": ("+s2",), "dw_bwd_x": ("+s2",), "dw_bwd_w": ("+s2",),
                   "dense_bwd_x": ("+s2",)}
_SCALE_POINTERS = ("in_s_ptr", "out_s_ptr", "tap_s_ptr")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64"}


def _jit(kernel) -> triton.JITFunction:
    while hasattr(kernel, "fn"):  # under the autotuner or the interpreter
        kernel = kernel.fn
    return triton.JITFunction(kernel)


def compile_variant(name: str, dtype: torch.dtype, config, arch: int = 90):
    """Compiles one kernel (a name of KERNELS, + "+scales" for its variant with the three
    scales, + "+one_tile" / "+long" for one tile of pixels an example / more than CHAIN tiles,
    + "+nchw" for the reduction order of a contiguous input, + "+s2" at stride 2) for
    ``sm_<arch>`` with ``config`` = (tile sizes, warps, stages)."""
    base, *flags = name.split("+")
    kernel, _, acc_pointers = KERNELS[base]
    fn = _jit(kernel)
    blocks, warps, stages = config
    acc = "fp64" if dtype == torch.float64 else "fp32"
    scales = "scales" in flags
    pixels = (blocks["BLOCK_P"] if "one_tile" in flags else
              4 * dense.CHAIN.value * blocks["BLOCK_P"] if "long" in flags else 256)
    constexprs = dict(blocks, E=8, E_POW2=8, KH=3, KW=3, HAS_BIAS=True, KEY_L=pixels,
                      IN_SCALE=scales, OUT_SCALE=scales, TAP_SCALE=scales, SCALE_GRADS=scales,
                      POINTWISE=False, WIDE=False, NEED_W=True, NEED_R=True,
                      STRIDE_H=2 if "s2" in flags else 1, STRIDE_W=2 if "s2" in flags else 1,
                      PAD_L=1, DIL_W=1, KK_POW2=16,
                      TAP_MAJOR="nchw" not in flags, PHASES="s2" in flags,
                      ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                      PRECISION="tf32" if dtype == torch.float32 else "ieee")
    declared = {p.name for p in fn.params if p.is_constexpr}
    constexprs = {k: v for k, v in constexprs.items() if k in declared}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg == "r_ptr" or arg in acc_pointers + _SCALE_POINTERS:
            signature[arg] = f"*{acc}"
        elif arg.endswith("_ptr"):
            signature[arg] = f"*{TYPES[dtype]}"
        else:
            signature[arg] = "i32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()
                                   if k in fn.arg_names})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def compile_sum(dtype: torch.dtype, tap_major: bool, arch: int = 90):
    """Compiles the dense kernel gradient's sum kernel (``dense_kgrad_sum_kernel``: untuned, no
    tiles) with both sums, grad_weight in ``dtype``, for ``sm_<arch>``."""
    fn = _jit(dense.dense_kgrad_sum_kernel)
    acc = "fp64" if dtype == torch.float64 else "fp32"
    constexprs = {"NEED_W": True, "NEED_R": True, "TAP_MAJOR": tap_major}
    signature = {arg: ("constexpr" if arg in constexprs else f"*{TYPES[dtype]}" if arg == "dw_ptr"
                       else f"*{acc}" if arg.endswith("_ptr") else "i32")
                 for arg in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=4, num_stages=3))


def _size(config):
    blocks, _, stages = config
    product = 1
    for value in blocks.values():
        product *= value
    return product, stages


def _quick(configs):
    """The largest tiles of ``configs`` and, if another, the most examples a program."""
    if not configs:
        return []
    chosen = [max(configs, key=_size)]
    if "BLOCK_B" in configs[0][0]:
        most = max(configs, key=lambda c: (c[0]["BLOCK_B"], _size(c)))
        chosen += [most] if most is not chosen[0] else []
    return chosen


def variants(quick: bool = False, arch: int = 90):
    """(kernel, dtype, config, whether it is the configuration launched without autotuning);
    ``quick``: of the other configurations only the largest tiles (most stages on a tie) and,
    where the tiles hold a block of examples, the one with the most examples. The dense
    forward / grad_x configurations get the pipeline stages their launch would get for that
    dtype with 8 experts on ``sm_<arch>`` (_config.fitting_stages). The other variants
    (scales, pixels an example, reduction order) likewise, or with ``quick`` only float32 and
    bfloat16 at the untuned configuration."""
    for name, (_, shapes, _) in KERNELS.items():
        table = _config._table(shapes)
        rest = table[1:]
        for variant in ((name,) + ((name + "+scales",) if name in SCALED else ())
                        + tuple(name + v for v in PIXEL_VARIANTS.get(name, ()))
                        + tuple(name + v for v in LAYOUT_VARIANTS.get(name, ()))
                        + tuple(name + v for v in STRIDE_VARIANTS.get(name, ()))):
            extra = variant != name
            for dtype in ((torch.float32, torch.bfloat16) if quick and extra else TYPES):
                yield variant, dtype, _untuned(variant, shapes, dtype, arch), True
            for dtype in (torch.float32, torch.bfloat16):
                launchable = [c for c in rest if _launchable(c, dtype)]
                for config in [] if quick and extra else (
                        _quick(launchable) if quick else launchable):
                    yield variant, dtype, _staged(config, dtype, arch), False


def _launchable(config, dtype) -> bool:
    """Whether the tuner may launch ``config`` in ``dtype`` with 8 experts
    (_config.examples_fit)."""
    blocks = config[0]
    return "BLOCK_B" not in blocks or _config.examples_fit(
        blocks, config[1], torch.empty((), dtype=dtype).element_size(), 8)


def _untuned(variant: str, shapes, dtype, arch: int = 90):
    """The configuration a launch of ``variant`` in ``dtype`` with 8 experts takes on
    ``sm_<arch>`` with autotuning off (_config.fixed_config; channels_last but for "+nchw")."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return _config.fixed_config(
        shapes, 8, itemsize, 8 if dtype == torch.float64 else 4, scaled="+scales" in variant,
        stride=2 if "+s2" in variant else 1, channels_last="+nchw" not in variant,
        shared=(_config.SHARED_BYTES[arch], arch))


def _staged(config, dtype, arch: int = 90):
    blocks, warps, stages = config
    if "BLOCK_B" in blocks:
        itemsize = torch.empty((), dtype=dtype).element_size()
        stages = _config.fitting_stages(blocks, stages, 8, itemsize,
                                        _config.SHARED_BYTES[arch], arch)
    return blocks, warps, stages


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--arch", type=int, default=90, choices=sorted(_config.SHARED_BYTES),
                   help="The compute capability x 10 (90: H100 and H200; 80: A100; 86 and 89: "
                        "the RTX 30 and 40 series; 75: T4).")
    p.add_argument("--quick", action="store_true",
                   help="Of the autotuned configurations, compile only the largest.")
    args = p.parse_args(argv)
    if _config.INTERPRET:
        p.error("run without TRITON_INTERPRET=1 (see the module's docstring)")
    from .report import ptxas_usage
    limit = _config.SHARED_BYTES[args.arch]
    tables_arch = args.arch == 90  # the tables' GPU: every configuration must fit there
    failures = 0
    for name, dtype, (blocks, warps, stages), first in variants(args.quick, args.arch):
        label = (f"{name:19s} {TYPES[dtype]} {'x'.join(map(str, blocks.values())):10s} "
                 f"w{warps} s{stages}{' (untuned)' if first else ''}")
        staged = stages
        while True:
            try:
                compiled = compile_variant(name, dtype, (blocks, warps, stages), args.arch)
            except Exception as error:  # noqa: BLE001 -- every failure is reported, then counted
                retried = f" (at s{stages})" if stages != staged else ""
                print(f"{label}{retried}: FAILED {type(error).__name__}: "
                      f"{str(error).splitlines()[-1]}")
                failures += 1
                compiled = None
                break
            # a fixed configuration's launch is retried with fewer stages (the backend's _launch)
            if compiled.metadata.shared <= limit or tables_arch or not first or stages == 1:
                break
            stages -= 1
        if compiled is None:
            continue
        meta, ptx = compiled.metadata, compiled.asm["ptx"]
        fits = meta.shared <= limit
        note = ("" if fits else " (TOO MUCH)" if tables_arch or first
                else " (more than this GPU has: the tuner skips it)")
        failures += not fits and (tables_arch or first)
        retried = f" (launched at s{stages})" if stages != staged else ""
        print(f"{label}: {meta.shared} B shared{note}{retried}, "
              f"{ptx.count('mma.sync') + ptx.count('wgmma.mma_async')} mma instructions")
    for dtype in TYPES:
        for tap_major in (False, True):
            label = f"dense_kgrad_sum     {TYPES[dtype]}{' tap-major' if tap_major else ''}"
            try:
                compiled = compile_sum(dtype, tap_major, args.arch)
            except Exception as error:  # noqa: BLE001 -- as above
                print(f"{label}: FAILED {type(error).__name__}: {str(error).splitlines()[-1]}")
                failures += 1
                continue
            print(f"{label}: {compiled.metadata.shared} B shared")
    # The Gluon kernels (one program an SM: registers are free up to 255, but a spill is a
    # miss): each compiled at its cases in bfloat16 and float16, its shared memory the plan's
    # (which decides the layers it takes; the plan keeps 1 KB for the compiler's scratch).
    gluon = []
    if not tables_arch:
        print(f"(the Gluon kernels are sm_90 only: not compiled for sm_{args.arch})")
    elif stationary.AVAILABLE:
        gluon += [(f"stationary (gluon) {{}} E{e} K{k} P{p}{' transposed' if t else ''}"
                   f"{' routing' if r else ''}{' +scales' if sc else ''}",
                   lambda dtype, e=e, k=k, p=p, t=t, r=r, sc=sc: stationary.compile_for(
                       e, k, p, dtype, args.arch, t, r, scaled=sc),
                   stationary.plan(e, k, p, routing=r)["shared_bytes"])
                  for e, k, p, t, r, sc in stationary.COMPILE_CASES]
        gluon += [(f"stationary_mix (gluon) {{}} E{e} K{k} P{p}{' transposed' if t else ''}",
                   lambda dtype, e=e, k=k, p=p, t=t: stationary_mix.compile_for(
                       e, k, p, dtype, args.arch, t),
                   stationary_mix.plan(e, k, p)["shared_bytes"])
                  for e, k, p, t in stationary_mix.COMPILE_CASES]
        gluon += [(f"pointwise_grad (gluon) {{}} E{e} {ci}->{co} P{p}{'' if nw else ' routing'}"
                   f"{'' if nr else ' weight'}",
                   lambda dtype, e=e, ci=ci, co=co, p=p, nr=nr, nw=nw: pointwise_grad.compile_for(
                       e, ci, co, p, dtype, args.arch, nr, nw),
                   pointwise_grad.plan(e, ci, co, p)["shared_bytes"])
                  for e, ci, co, p, nr, nw in pointwise_grad.COMPILE_CASES]
    for name, compile_case, planned in gluon:
        for dtype in (torch.bfloat16, torch.float16):
            label = name.format(TYPES[dtype])
            try:
                compiled = compile_case(dtype)
            except Exception as error:  # noqa: BLE001 -- as above
                print(f"{label}: FAILED {type(error).__name__}: {str(error).splitlines()[-1]}")
                failures += 1
                continue
            shared = compiled.metadata.shared
            usage = ptxas_usage(compiled.asm["ptx"], args.arch)
            fits = (shared <= limit and planned <= shared <= planned + 1024
                    and usage["spill_bytes"] == 0)
            failures += not fits
            print(f"{label}: {shared} B shared (planned {planned}), {usage['registers']} "
                  f"registers, {usage['spill_bytes']} B spilled"
                  f"{'' if fits else ' (TOO MUCH, NOT AS PLANNED OR SPILLED)'}, "
                  f"{compiled.asm['ptx'].count('wgmma.mma_async')} mma instructions")
    print("all variants compiled and fit" if failures == 0 else f"{failures} variants failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
