"""Launch configuration: autotuned on the GPU (keys are power-of-two buckets of the shapes and
of the batch), one fixed configuration under TRITON_INTERPRET=1 (the interpreter cannot
autotune).

``CONDCONV_TRITON_AUTOTUNE=0`` launches the first GPU configuration of each table instead of
autotuning: every new shape then compiles one variant instead of six, which is what a test run
over many shapes wants (the tiles are masked, so any configuration computes the same result).
``CONDCONV_TRITON_CONFIG=i`` launches the i-th configuration of each table (modulo its length)
without autotuning. Each compiles exactly the binary the autotuner would compile for that
configuration, so processes run with i = 0, 1, ... side by side fill Triton's cache before an
autotuned run, which then only times the configurations (``bench/warm_triton.py``).
"""
from __future__ import annotations

import functools
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner

from .. import _env

INTERPRET = _env.TRITON_INTERPRET
FORCED_CONFIG = _env.TRITON_CONFIG
AUTOTUNE = _env.TRITON_AUTOTUNE
DIRECT_LAUNCH = _env.TRITON_DIRECT_LAUNCH and not INTERPRET  # (TunedKernel: no driver there)

# The kernels' per-example scale flags: part of every autotune key that takes them (a scaled
# launch holds more registers, and the kernel gradient's table is pruned for it).
SCALE_FLAGS = ("IN_SCALE", "OUT_SCALE", "TAP_SCALE")

# The tile names of the dense forward and grad_x kernels: examples per program, the output tile
# (channels x pixels) and the reduction block.
DENSE_TILES = ("BLOCK_B", "BLOCK_M", "BLOCK_N", "BLOCK_K")
# (examples, channels, pixels, reduction, warps, stages). Registers per program hold the
# accumulators (BLOCK_B x BLOCK_M x BLOCK_N, float32) and the mixed tiles (BLOCK_B x BLOCK_M x
# BLOCK_K); BLOCK_M is 64 or 128 so that Hopper's wgmma takes the mixed tile from registers.
# BLOCK_B (any count: the block is a tuple) = 1 serves small batches (configurations with more
# examples than the batch's bucket are pruned); at batch 256 more examples per program divide
# the reads of the expert tiles, more channels per program the reads of x, but each example
# adds its own work to every K step of the program (condconv_kernels.triton.report's latency
# term). What the H200 measured for every configuration (the third GPU run's autotune
# timings, bench/tuner_timings.py): the fastest on the 7x7 layers is 2 x 64 x 64 with 4 warps,
# two programs an SM; on the 14x14 ones the 128-pixel tiles of 8 warps; blocks of 6 and 8
# examples with K blocks of 16 (in the table until then for their L2 traffic) were 1.4-2.6x
# the fastest on every key at batch 256, 4 x 64 x 64 with K blocks of 16 1.5-2.3x, one example
# in 8 warps 1.5x or more at every batch: out. The 3-example one (255 registers, 2 stages:
# 61 KB of shared memory, two programs an SM as the fastest) reads the experts a third less
# often than it, for the next run to measure.
_GPU_DENSE_CONFIGS = [(2, 64, 64, 32, 4, 3), (1, 64, 64, 32, 4, 3), (4, 64, 64, 32, 8, 3),
                      (2, 128, 64, 32, 8, 3), (2, 64, 128, 32, 8, 3), (4, 128, 64, 16, 8, 4),
                      (4, 64, 128, 16, 8, 3), (3, 64, 64, 32, 4, 2)]
# (block a, block b, block c, warps, stages) for the dense kernel gradient, whose tile of W
# (a output channels x b reduction elements, over c pixels at a time) holds every expert's
# gradient in registers: E x a x b float32, at most 16K with 8 experts. The last takes 128
# pixels a dot: half the loop iterations (and their address arithmetic) an example on the 14x14
# and larger layers (s5.b1.expand's issue time 77 -> 61 us, ResNet's r4.conv 736 -> 618, by
# condconv_kernels.triton.report).
_GPU_CONFIGS = [(64, 32, 64, 8, 3), (32, 64, 64, 8, 3), (32, 32, 64, 4, 3),
                (16, 64, 64, 4, 3), (16, 32, 64, 4, 3), (64, 32, 128, 8, 3)]
# (64, 32, 32, 8, 4) was in the table until the third GPU run's autotune timings: 1.34-1.6x the
# fastest on every layer (half the pixels a dot: twice the loop's iterations, each as long).
# (64, 16, 64, 4, 3) was in the table until the third GPU run forced it on a 7x7 1x1 layer
# (test_gpu_forced_configuration[k1_7-3]): its grad_routing was off by 9x the test's bound, a
# Triton reduction miscompiled (the kernel's comment at grad_routing's sums; fixed there
# since, for every configuration). It stays out: the tuner had picked it on the 7x7 layers
# only, and no GPU run has checked the fix on it.
KGRAD_TILES = ("BLOCK_CO", "BLOCK_K", "BLOCK_P")
# The dense kernel gradient's registers for its tile of every expert, per warp: the gradients
# (float32, or float64) and W's tiles (input dtype), 96 registers a thread; past this, ptxas
# spills (read off the compiled kernels: condconv_kernels.triton.report).
KGRAD_WARP_BYTES = 12 * 1024
# The depthwise kernel gradient: a program per example and tile of channels (BLOCK_C) walks
# its output pixels in blocks of BLOCK_L groups of COLS side by side in a row.
DW_KGRAD_TILES = ("BLOCK_C", "BLOCK_L", "COLS")
# (channels, groups, columns, warps, stages).
# Chosen from the static report's machine code: one-warp programs sum the taps over the pixels
# with shuffles alone; the first (139 registers) does not spill at stride 2 in channels_last,
# where 7 columns reach 17 input columns, the second (240) issues the fewest instructions at
# stride 1 but spills at stride 2, where 4 columns (the third) do not; the fourth, half the
# first's pixels, does not spill in NCHW at stride 2 (every element there a scalar load with
# its own address), where the others do.
_GPU_DW_KGRAD_CONFIGS = [(16, 4, 7, 1, 2), (32, 4, 7, 1, 2), (32, 4, 4, 1, 2), (16, 2, 7, 1, 2),
                         (64, 8, 4, 4, 2)]
# The depthwise forward and grad_x: a program's channels, its groups of output pixels side
# by side in a row, the pixels a group holds (COLS accumulators; grad_x: COLS x the stride's
# input pixels) and its examples (one after another, their taps mixed together: each expert's
# taps loaded once for all of them), and the stages of its loop over the rows of taps (1: each
# row's loads into registers, waited for; more: copied asynchronously that many rows ahead).
DW_TILES = ("BLOCK_C", "BLOCK_Q", "COLS", "EXAMPLES", "ROW_STAGES")
# (channels, groups, columns, examples, row stages, warps, stages). The first covers a 7x7
# plane with 4 examples a program, which read the experts' taps a quarter as often (4608
# programs of one example on the 7x7 layers at batch 256: their taps were 118 of the 235 MB
# the forward moved from L2), on 16-bit channels_last inputs (dw_examples_fit); the second the
# same tile with one example (small batches, and the inputs the first does not take); the
# third a 14x14 plane, one example (two examples there took 50 more registers). The third GPU
# run timed each at 2100-3300 cycles a row of taps per program, whatever its tile
# (condconv_kernels.triton.report's latency term): each row waits for its loads. The last
# three are the fastest of them on the 7x7, the strided and the 14x14 layers with their rows
# pipelined (Triton copies a row's input columns and taps asynchronously two rows ahead: no
# load into registers left in the loop, 24-25 KB of shared memory), for the next run's tuner
# to time against them. (64, 8, 14, 1) was in the table until then: 1.14-1.82x the fastest on
# every key it was timed on.
_GPU_DW_CONFIGS = [(64, 8, 7, 4, 1, 4, 2), (64, 8, 7, 1, 1, 4, 2), (32, 16, 14, 1, 1, 4, 2),
                   (32, 16, 7, 1, 1, 4, 2), (64, 16, 4, 1, 1, 4, 2),
                   (64, 8, 7, 4, 3, 4, 2), (64, 8, 7, 1, 3, 4, 2), (32, 16, 7, 1, 3, 4, 2)]
# The most configurations of any table (bench/warm_triton.py runs that many workers).
MAX_CONFIGS = max(map(len, (_GPU_DENSE_CONFIGS, _GPU_CONFIGS, _GPU_DW_CONFIGS,
                            _GPU_DW_KGRAD_CONFIGS)))
# Under the interpreter: small tiles keep the numpy work per program small.
INTERPRET_BLOCK = 16
INTERPRET_EXAMPLES = 2
INTERPRET_COLS = 3  # not a divisor of most widths: the tests' rows end in part-filled groups


# The routing weights (examples x experts) a dense forward / grad_x program holds in registers
# across its K loop; those of the block's further examples are loaded again in every K block.
HELD_ROUTING = tl.constexpr(32)

# The most shared memory a block may use (opted in), by compute capability x 10: T4 and the RTX
# 20 series (7.5), A100 (8.0), the GPUs of 8.6 and 8.9 (RTX 30 and 40 series, A10, L4, L40)
# and H100 / H200 (9.0). The tables are H100's; on a GPU with less, the dense forward / grad_x
# take fewer pipeline stages (fitting_stages at device_shared), and a launch of a fixed
# configuration (autotuning off) that still does not fit is retried with fewer (the triton
# backend's _launch).
SHARED_BYTES = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                90: 227 * 1024}
SHARED_LIMIT = SHARED_BYTES[90]  # what the tables and the static report assume


@functools.lru_cache(maxsize=None)
def _cuda_device_shared(index: int) -> Tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return driver.active.utils.get_device_properties(index)["max_shared_mem"], 10 * major + minor


def device_shared(t: Optional[torch.Tensor] = None) -> Tuple[int, int]:
    """(the most shared memory a block may use, compute capability x 10) of the GPU that holds
    ``t`` (the bytes Triton's launch checks against); for a tensor off the GPU, those of the
    architecture a dry run compiles for (dry_run), else (SHARED_LIMIT, 90): the interpreter and
    the static report."""
    if t is not None and t.device.type == "cuda":
        return _cuda_device_shared(t.device.index)
    installed = None if INTERPRET else getattr(driver, "_active", None)
    if not getattr(installed, "dry_run", False):
        return SHARED_LIMIT, 90
    device = installed.get_current_device()
    return (installed.utils.get_device_properties(device)["max_shared_mem"],
            installed.get_current_target().arch)


def dense_shared_bytes(blocks: Dict[str, int], stages: int, experts: int, itemsize: int,
                       arch: int = 90) -> int:
    """A dense forward / grad_x configuration's shared memory at ``stages`` >= 2 pipeline
    stages, as Triton 3.6 allocates it for ``sm_<arch>``: ``stages`` buffers of the BLOCK_B
    input tiles, and of the E expert tiles (stages - 1) x E, plus one on sm_90; past
    HELD_ROUTING routing weights a program (reloaded every K block) up to 512 bytes more. Read
    off every table configuration of both kernels compiled for sm_90 at 4, 8 and 16 experts in
    bfloat16 and float32 (1x1 and 3x3 layers): exact where the routing is held, at most 512
    bytes over otherwise. Before sm_90 an estimate (float32 compiled for sm_86): exact for the
    64-row tiles of 64 pixels, over by 16 KB for those of 128 pixels, under by one or two
    expert tiles for the 128-row tiles (a stage count that does not fit there: the tuner
    skips that configuration); 16-bit configurations take 8-16 KB at any stage count (their
    loads are not pipelined through shared memory)."""
    b, m, n, k = (blocks[name] for name in ("BLOCK_B", "BLOCK_M", "BLOCK_N", "BLOCK_K"))
    routing = 512 if b * experts > HELD_ROUTING else 0
    tiles = (stages - 1) * experts + (1 if arch >= 90 else 0)
    return itemsize * (stages * b * k * n + tiles * m * k) + routing


def fitting_stages(blocks: Dict[str, int], stages: int, experts: int, itemsize: int,
                   limit: int = SHARED_LIMIT, arch: int = 90) -> int:
    """The most pipeline stages, at most ``stages``, whose tiles fit in ``limit`` bytes of
    shared memory on ``sm_<arch>`` (1 if none does: the tiles are then loaded without
    pipelining)."""
    while stages > 1 and dense_shared_bytes(blocks, stages, experts, itemsize, arch) > limit:
        stages -= 1
    return stages


# The most float32 values a thread of a dense forward / grad_x program may hold besides its
# accumulators without ptxas spilling (examples_fit): for 16-bit elements, for wider ones, and
# the factor on it past 8 experts.
EXAMPLE_VALUES, WIDE_EXAMPLE_VALUES, MANY_EXPERTS = 72, 48, 2 / 3


def examples_fit(blocks: Dict[str, int], warps: int, itemsize: int, experts: int) -> bool:
    """Whether a dense forward / grad_x program of ``warps`` warps may serve its block of
    examples (``blocks``: the configuration's tiles) with ``experts`` experts on elements of
    ``itemsize`` bytes: one example always; more where a thread's share of their mixed tiles
    (float32: BLOCK_B x BLOCK_M x BLOCK_K over the threads) and of the routing weights it holds
    (HELD_ROUTING at most) stays within EXAMPLE_VALUES, or WIDE_EXAMPLE_VALUES for wider
    elements (two thirds of it past 8 experts). From every table configuration of both kernels
    compiled at 4, 8 and 16 experts in bfloat16 and float32 on layers whose channels are
    multiples of 16, at the stages fitting_stages gives them: those it keeps do not spill (3 x
    64 x 64 x 32 in 4 warps, 72 values at 8 experts in bfloat16, holds 255 registers; float32
    spills from 60); the four fastest on an H200 (two examples of 64 x 64 in 4 warps, of 128 x
    64 or 64 x 128 in 8, four of 64 x 64 in 8) are kept at 8 experts in bfloat16. Channels not
    a multiple of 16, per-example scales and contiguous (NCHW) inputs take more registers than
    this counts."""
    b = blocks["BLOCK_B"]
    if b == 1:
        return True
    values = b * blocks["BLOCK_M"] * blocks["BLOCK_K"] // (32 * warps) + min(
        b * experts, HELD_ROUTING.value)
    budget = ((EXAMPLE_VALUES if itemsize <= 2 else WIDE_EXAMPLE_VALUES)
              * (MANY_EXPERTS if experts > 8 else 1))
    return values <= budget


def _prune_examples(configs, named_args, **kwargs):
    """Drops the configurations whose block of examples exceeds the batch's bucket (B_KEY), or
    would not fit in registers (examples_fit), and lowers the pipeline stages of the others
    until their tiles fit in the GPU's shared memory."""
    limit = named_args.get("B_KEY", 1 << 30)
    experts = kwargs.get("E", 8)
    x = named_args.get("x_ptr", named_args.get("g_ptr"))
    tensor = hasattr(x, "element_size")
    itemsize = x.element_size() if tensor else 4
    shared, arch = device_shared(x) if tensor else (SHARED_LIMIT, 90)
    fewest = min(c.kwargs["BLOCK_B"] for c in configs)
    kept = []
    for c in configs:
        examples = c.kwargs["BLOCK_B"]
        if examples <= max(limit, fewest) and (
                examples_fit(c.kwargs, c.num_warps, itemsize, experts) or examples == fewest):
            stages = fitting_stages(c.kwargs, c.num_stages, experts, itemsize, shared, arch)
            kept.append(c if stages == c.num_stages else
                        triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=stages))
    return kept


def kgrad_bytes(blocks: Dict[str, int], experts_pow2: int, acc_bytes: int, itemsize: int,
                scaled: bool = False) -> int:
    """Register bytes of a kernel gradient's per-expert tiles (see KGRAD_WARP_BYTES), and where
    it computes the scales' gradients (``scaled``) its two more tiles in the accumulation dtype
    (the example's mixed tile and its product with G: past the budget without them, ptxas
    spills)."""
    tile = blocks["BLOCK_CO"] * blocks["BLOCK_K"]
    return tile * (experts_pow2 * (acc_bytes + itemsize) + (2 * acc_bytes if scaled else 0))


def _kgrad_fit(configs, experts_pow2: int, acc_bytes: int, itemsize: int,
               scaled: bool = False):
    """Of (tile, warps, anything) triples, those whose expert tiles fit in their warps'
    registers; the one needing the fewest bytes a warp if none does."""
    def per_warp(c):
        return kgrad_bytes(c[0], experts_pow2, acc_bytes, itemsize, scaled) / c[1]
    kept = [c for c in configs if per_warp(c) <= KGRAD_WARP_BYTES]
    return kept or [min(configs, key=per_warp)]


def _prune_kernel_grad(configs, named_args, **kwargs):
    """Drops the dense kernel-gradient configurations whose expert tiles would spill
    (_kgrad_fit), and those whose pixel tiles pass both 64 and the pixels' bucket (KEY_L: an
    example of 49 pixels gains nothing from tiles of 128, whose registers spill in float32)."""
    x = named_args.get("x_ptr")
    itemsize = x.element_size() if hasattr(x, "element_size") else 4
    acc_bytes = 8 if kwargs.get("ACC") == tl.float64 else 4
    scaled = bool(kwargs.get("SCALE_GRADS"))
    pixels = named_args.get("KEY_L", kwargs.get("KEY_L", 1 << 30))
    configs = [c for c in configs if c.kwargs["BLOCK_P"] <= max(pixels, 64)] or configs
    triples = [(c.kwargs, c.num_warps, c) for c in configs]
    return [c for _, _, c in _kgrad_fit(triples, kwargs.get("E_POW2", 8), acc_bytes, itemsize,
                                        scaled)]


# The most accumulator values a thread of the depthwise forward or grad_x may hold (float32; a
# float64 counts two): COLS of them (grad_x: COLS x the stride), each BLOCK_C x BLOCK_Q over the
# program's threads. Read off the report's compiled kernels: 56 (14 columns of 32 x 16 in four
# warps, or 7 at stride 2) do not spill at EfficientNet's layers, 112 do.
DW_ACC_VALUES = 56


def dw_accumulators(blocks: Dict[str, int], warps: int, stride: int = 1,
                    acc_bytes: int = 4) -> int:
    """A depthwise forward / grad_x configuration's accumulator values a thread, in float32
    values (see DW_ACC_VALUES); ``stride``: grad_x's column stride (1 for the forward)."""
    per_thread = blocks["COLS"] * stride * blocks["BLOCK_C"] * blocks["BLOCK_Q"] // (32 * warps)
    return per_thread * acc_bytes // 4


def _dw_fit(configs, stride: int, acc_bytes: int):
    """Of (tile, warps, anything) triples, those whose accumulators fit DW_ACC_VALUES; the one
    with the fewest if none does."""
    def values(c):
        return dw_accumulators(c[0], c[1], stride, acc_bytes)
    kept = [c for c in configs if values(c) <= DW_ACC_VALUES]
    return kept or [min(configs, key=values)]


def dw_examples_fit(examples: int, itemsize: int, channels_last: bool, acc_bytes: int,
                    batch: int = 1 << 30) -> bool:
    """Whether a depthwise forward / grad_x program may serve ``examples`` examples: one always;
    more only on 16-bit channels_last inputs with float32 accumulators (elsewhere the 4-example
    7x7 tile spilled 80-276 bytes: wider loads, NCHW's scalar addresses, float64) and at most
    the batch's bucket."""
    return examples == 1 or (itemsize <= 2 and channels_last and acc_bytes == 4
                             and examples <= batch)


def _prune_depthwise(configs, named_args, **kwargs):
    """Drops the depthwise forward / grad_x configurations whose accumulators would spill
    (_dw_fit: 14 columns a group in float64, or at stride 2 in grad_x, 28 input columns) or
    whose examples do not fit (dw_examples_fit)."""
    grad_x = "dx_ptr" in named_args
    stride = kwargs.get("STRIDE_W", 1) if grad_x else 1
    acc_bytes = 8 if kwargs.get("ACC") == tl.float64 else 4
    x = named_args.get("g_ptr" if grad_x else "x_ptr")
    itemsize = x.element_size() if hasattr(x, "element_size") else 4
    channels_last = named_args.get("s_gc" if grad_x else "s_xc") == 1
    batch = named_args.get("B_KEY", 1 << 30)
    fitting = [c for c in configs if dw_examples_fit(c.kwargs["EXAMPLES"], itemsize,
                                                     channels_last, acc_bytes, batch)]
    return [c for _, _, c in _dw_fit([(c.kwargs, c.num_warps, c) for c in fitting], stride,
                                     acc_bytes)]


def autotune(key: Sequence[str], shapes: Sequence[str], reset_to_zero: Sequence[str] = ()):
    """Wraps a kernel in triton.autotune over tile sizes named ``shapes`` (GPU), or leaves it
    alone (interpreter, or autotuning off: the launcher passes :func:`fixed_blocks`).

    ``reset_to_zero`` names the outputs a kernel adds into (or fills only in part, as the
    partial sums whose row count depends on the tile size): the tuner zeroes them before every
    trial and before the real launch, which otherwise would see the trials' sums. Tuning
    results are cached on disk with the compiled kernels (Triton's ``cache_results``), so other
    processes reuse them."""
    def wrap(kernel):
        if INTERPRET or not AUTOTUNE:
            return kernel
        configs = [triton.Config(blocks, num_warps=warps, num_stages=stages)
                   for blocks, warps, stages in _table(shapes)]
        prune = {DENSE_TILES: _prune_examples, KGRAD_TILES: _prune_kernel_grad,
                 DW_TILES: _prune_depthwise}.get(tuple(shapes))
        prune = {"early_config_prune": prune} if prune else None
        return TunedKernel(kernel, configs, list(key), list(reset_to_zero) or None,
                           prune_configs_by=prune, cache_results=True)
    return wrap


def untuned(num_warps: int = 4, num_stages: int = 3):
    """Wraps a kernel without tile sizes to tune in a TunedKernel of one configuration, for the
    direct launch (on the GPU, or launched dry); leaves it alone under the interpreter. Its
    launches pass no ``num_warps`` / ``num_stages``: they are these."""
    def wrap(kernel):
        if INTERPRET:
            return kernel
        return TunedKernel(kernel, [triton.Config({}, num_warps=num_warps,
                                                  num_stages=num_stages)], [])
    return wrap


# The most launch keys a tuned kernel keeps its compiled kernel under (TunedKernel): one per
# layer geometry, batch size and alignment met; past it the keys start over.
LAUNCH_KEYS = 4096


class TunedKernel(Autotuner):
    """``triton.autotune``'s Autotuner with a cheaper launch once a key is tuned.

    Triton's ``run`` builds two dictionaries of all ~50 arguments and tests each name against
    the list of argument names on every launch: ~20 us of host time a launch, more than the
    rest of Triton's launch path. Here the key comes from the key arguments' positions and the
    tensors' dtypes (the same tuple as Triton's, in the same order: the tuned configuration is
    looked up in the same cache), and a key seen before launches its configuration straight
    away; a new key (tuning, or the disk cache of results) and configurations with pre-hooks
    go through Triton's ``run``.

    Past that, a launch whose arguments Triton has compiled for before skips Triton's binder
    and kernel cache too (~25 us a launch of its ~45, measured launched dry): the compiled
    kernel is kept under a key that holds every argument as Triton specializes on it or finer
    (:meth:`launch_key`: each tensor by dtype and whether its address is a multiple of 16, the
    alignment Triton specializes pointers on; the rest by value), and launched through
    ``CompiledKernel[grid]`` with the arguments in the kernel's order, as Triton's
    ``run`` launches it (``tests/test_triton_compile.py`` compares the two launches' arguments,
    launched dry). The key also fixes the tuned configuration (the tuning key is part of
    it). What the direct launch assumes of a kernel and its launches, true of this package's:
    a grid callable reads only the launch options and the arguments passed by name (Triton's
    hands it every argument); the module globals a kernel reads are never rebound (Triton
    checks them every launch); no pre-run hooks (a kernel with some is never kept); clearing
    ``cache`` to tune again needs ``_launch`` and ``_compiled`` cleared too, and the plans that
    replay a whole call's launches (``_replay.PLANS``).

    The tuned configurations are kept per device (Triton's Autotuner keeps one ``cache`` for
    all): ``cache`` is the current device's, so that a process with two kinds of GPU (an H100
    and an A100, say) tunes on each; Triton's disk cache of results is per architecture.
    Everything but the direct launch of a known launch key holds the kernel's lock: Triton's
    Autotuner keeps a launch's arguments on the object while it tunes (``nargs``), and threads
    calling at once (one per GPU under DataParallel, autograd's device threads) would tune
    with each other's tensors, or zero them."""

    def __init__(self, fn, configs, key, reset_to_zero=None, **kwargs):
        super().__init__(fn, fn.arg_names, configs, key, reset_to_zero, None, **kwargs)
        self._arg_set = frozenset(self.arg_names)
        self._key_at = tuple((name, self.arg_names.index(name)) for name in self.keys
                             if name in self._arg_set)  # Triton ignores the other names
        self._launch: Dict[tuple, tuple] = {}  # (device, key) -> (config, launch options)
        self._caches: Dict[int, dict] = {}  # device -> its tuned configurations (``cache``)
        self._cache_device: Optional[int] = None
        self._lock = threading.RLock()
        # launch key -> (compiled kernel, config, launch options, the names after the
        # positional arguments in the kernel's order)
        self._compiled: Dict[tuple, tuple] = {}

    def tuning_key(self, args: tuple, kwargs: dict) -> tuple:
        """Triton's autotuning key of a launch: the key arguments present (positional or by
        name), then the dtype of each argument that has one, positional ones first."""
        n = len(args)
        key = [args[at] if at < n else kwargs[name] for name, at in self._key_at
               if at < n or name in kwargs]
        key += [str(a.dtype) for a in args if hasattr(a, "dtype")]
        key += [str(v.dtype) for k, v in kwargs.items() if k in self._arg_set
                and hasattr(v, "dtype")]
        return tuple(key)

    def _on_device(self) -> int:
        """Makes ``cache`` the current device's tuned configurations; returns the device."""
        device = driver.active.get_current_device()
        if device != self._cache_device:
            if self._cache_device is None:  # the configurations tuned so far: this device's
                self._caches[device] = self.cache
            self.cache = self._caches.setdefault(device, {})
            self._cache_device = device
        return device

    @staticmethod
    def launch_key(args: tuple, kwargs: dict) -> tuple:
        """What a compiled kernel is kept under (see the class): every argument but the grid,
        tensors by (dtype, 16-byte alignment) whatever their type (as Triton specializes them),
        ints by value, the rest by type and value (True, 1 and 1.0 compile differently), then
        the current device, whose kernel cache Triton's launch uses, and the two runtime
        switches Triton adds to its options (debug, and the instrumentation mode that Proton
        and the sanitizer set). No tensor is kept in a key: it would live as long as the key."""
        tensor = torch.Tensor
        key = [a if type(a) is int else (a.dtype, not a.data_ptr() & 15)
               if isinstance(a, tensor) else (type(a), a) for a in args]
        key += [(k, (v.dtype, not v.data_ptr() & 15)) if isinstance(v, tensor) else (k, v)
                for k, v in kwargs.items() if k != "grid"]
        key += (driver.active.get_current_device(), knobs.runtime.debug,
                knobs.compilation.instrumentation_mode)
        return tuple(key)

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            if not DIRECT_LAUNCH:
                return self._tuned_run(args, kwargs, None)
            fast = self.launch_key(args, kwargs)
            try:
                known = self._compiled.get(fast)
            except TypeError:  # an argument that cannot be a key: Triton's launch
                return self._triton_run(args, kwargs)
            if known is not None:
                kernel, self.best_config, options, names = known
                named = {**kwargs, **options}
                grid = named["grid"]
                grid = tuple(grid(named) if callable(grid) else grid) + (1, 1)
                kernel[grid[:3]](*args, *[named[name] for name in names])
                return kernel
            return self._tuned_run(args, kwargs, fast)
        return self._triton_run(args, kwargs)

    def _triton_run(self, args: tuple, kwargs: dict):
        """Triton's Autotuner.run (tuning where the key is new) with the current device's
        tuned configurations, under the kernel's lock."""
        with self._lock:
            self._on_device()
            return super().run(*args, **kwargs)

    def _tuned_run(self, args: tuple, kwargs: dict, fast: Optional[tuple]):
        """A launch through Triton: the tuned configuration straight away where the tuning key
        is known, else Triton's Autotuner.run; with a launch key ``fast``, the compiled kernel
        kept under it for the direct launch; under the kernel's lock."""
        with self._lock:
            key = (self._on_device(), *self.tuning_key(args, kwargs))
            hit = self._launch.get(key)
            if hit is None:  # (one configuration: never tuned, always that one)
                config = self.cache.get(key[1:]) if len(self.configs) > 1 else self.configs[0]
                if config is None or config.pre_hook is not None:
                    return super().run(*args, **kwargs)
                hit = self._launch[key] = (config, config.all_kwargs())
            self.best_config, options = hit
            kernel = self.fn.run(*args, **kwargs, **options)
            names = self.fn.arg_names[len(args):]
            if fast is not None and isinstance(kernel, CompiledKernel) and all(
                    name in kwargs or name in options for name in names) and (
                    not self.fn.pre_run_hooks):
                if len(self._compiled) >= LAUNCH_KEYS:  # many shapes: start over
                    self._compiled.clear()
                self._compiled[fast] = (kernel, self.best_config, options, names)
            return kernel


def _table(shapes: Sequence[str]):
    """The GPU configurations of a kernel as (tile sizes by name, warps, stages)."""
    n = len(shapes)
    table = {DENSE_TILES: _GPU_DENSE_CONFIGS, KGRAD_TILES: _GPU_CONFIGS,
             DW_TILES: _GPU_DW_CONFIGS, DW_KGRAD_TILES: _GPU_DW_KGRAD_CONFIGS}[tuple(shapes)]
    return [(dict(zip(shapes, c[:n])), c[n], c[n + 1]) for c in table]


def fixed_config(shapes: Sequence[str], experts: int = 8, itemsize: int = 4,
                 acc_bytes: int = 4, scaled: bool = False, stride: int = 1,
                 channels_last: bool = False, shared: Tuple[int, int] = (SHARED_LIMIT, 90),
                 forced: Optional[int] = None) -> Tuple[Dict[str, int], int, int]:
    """The configuration (tiles, warps, stages) a launch without autotuning takes: from the
    ``forced``-th entry of the table of ``shapes`` (the first by default) on, for the dense
    forward / grad_x that entry with its pipeline stages lowered until its tiles of
    ``experts`` experts in ``itemsize``-byte elements fit in ``shared`` = (bytes, compute
    capability x 10: device_shared), for the dense kernel gradient the first whose expert tiles
    (and, ``scaled``: computing the scales' gradients, their two tiles) fit in registers, for
    the depthwise forward / grad_x (``stride``: grad_x's column stride) the first whose
    accumulators of ``acc_bytes`` do and whose examples may serve ``itemsize``-byte inputs,
    ``channels_last`` or not (dw_examples_fit); for the other tables that entry."""
    table = _table(shapes)
    first = (forced or 0) % len(table)
    blocks, warps, stages = table[first]
    # from the first (or forced) configuration on, as (tile, warps, configuration)
    triples = [(b, w, (b, w, st)) for b, w, st in table[first:] + table[:first]]
    if tuple(shapes) == DENSE_TILES:
        stages = fitting_stages(blocks, stages, experts, itemsize, *shared)
    elif tuple(shapes) == KGRAD_TILES:
        pow2 = 1 << max(0, experts - 1).bit_length()
        blocks, warps, stages = _kgrad_fit(triples, pow2, acc_bytes, itemsize, scaled)[0][2]
    elif tuple(shapes) == DW_TILES:
        fitting = [t for t in triples if dw_examples_fit(t[0]["EXAMPLES"], itemsize,
                                                         channels_last, acc_bytes)]
        blocks, warps, stages = _dw_fit(fitting, stride, acc_bytes)[0][2]
    return blocks, warps, stages


def fixed_blocks(shapes: Sequence[str], experts: int = 8, itemsize: int = 4,
                 acc_bytes: int = 4, scaled: bool = False, stride: int = 1,
                 channels_last: bool = False, like: Optional[torch.Tensor] = None
                 ) -> Dict[str, int]:
    """The launch options the launcher passes itself: the interpreter's tiles, the first (or
    the forced, ``CONDCONV_TRITON_CONFIG``) GPU configuration when autotuning is off as
    :func:`fixed_config` makes it for the GPU that holds ``like``, none when autotuned."""
    if INTERPRET:
        special = {"BLOCK_B": INTERPRET_EXAMPLES, "EXAMPLES": INTERPRET_EXAMPLES,
                   "COLS": INTERPRET_COLS, "ROW_STAGES": 1}
        return {name: special.get(name, INTERPRET_BLOCK) for name in shapes}
    if not AUTOTUNE:
        shared = device_shared(like) if tuple(shapes) == DENSE_TILES else (SHARED_LIMIT, 90)
        blocks, warps, stages = fixed_config(shapes, experts, itemsize, acc_bytes, scaled,
                                             stride, channels_last, shared, FORCED_CONFIG)
        return {**blocks, "num_warps": warps, "num_stages": stages}
    return {}


def smallest_block(shapes: Sequence[str], name: str) -> int:
    """The smallest size tile ``name`` takes in the table of ``shapes`` or under the
    interpreter: what buffers sized per tile (the dense kernel gradient's partial sums) must
    allow."""
    return min([blocks[name] for blocks, _, _ in _table(shapes)] + [INTERPRET_BLOCK])


def bucket(n: int) -> int:
    """Autotune key of a size: its power-of-two bucket (the next power of two, 1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
