"""Launch configuration: autotuned on the GPU (keys are shape buckets, never the batch), one
fixed configuration under TRITON_INTERPRET=1 (the interpreter cannot autotune).

``CONDCONV_TRITON_AUTOTUNE=0`` launches the first GPU configuration of each table instead of
autotuning: every new shape then compiles one variant instead of six, which is what a test run
over many shapes wants (the tiles are masked, so any configuration computes the same result).
"""
from __future__ import annotations

import os
from typing import Dict, Sequence

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("CONDCONV_TRITON_AUTOTUNE", "1") != "0"

# (block a, block b, block c, warps, stages) for kernels whose three tile sizes are named in
# `shapes`: a and b are the output tile, c the reduction block.
_GPU_CONFIGS = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                (128, 128, 32, 8, 3), (32, 64, 64, 4, 4), (64, 32, 64, 4, 4)]
# (block a, block b, warps, stages) for the depthwise kernels: channels x pixels tiles.
_GPU_DW_CONFIGS = [(32, 64, 4, 2), (64, 64, 4, 2), (16, 128, 4, 2), (32, 128, 8, 2),
                   (64, 32, 4, 2)]
# Under the interpreter: small tiles keep the numpy work per program small.
INTERPRET_BLOCK = 16


def autotune(key: Sequence[str], shapes: Sequence[str], reset_to_zero: Sequence[str] = ()):
    """Wraps a kernel in triton.autotune over tile sizes named ``shapes`` (GPU), or leaves it
    alone (interpreter, or autotuning off: the launcher passes :func:`fixed_blocks`).

    ``reset_to_zero`` names the outputs a kernel adds into (or fills only in part, as the
    partial sums whose row count depends on the tile size): the tuner zeroes them before every
    trial and before the real launch, which otherwise would see the trials' sums."""
    def wrap(kernel):
        if INTERPRET or not AUTOTUNE:
            return kernel
        configs = [triton.Config(blocks, num_warps=warps, num_stages=stages)
                   for blocks, warps, stages in _table(shapes)]
        return triton.autotune(configs=configs, key=list(key),
                               reset_to_zero=list(reset_to_zero) or None)(kernel)
    return wrap


def _table(shapes: Sequence[str]):
    """The GPU configurations of a kernel as (tile sizes by name, warps, stages)."""
    n = len(shapes)
    table = _GPU_CONFIGS if n == 3 else _GPU_DW_CONFIGS
    return [(dict(zip(shapes, c[:n])), c[n], c[n + 1]) for c in table]


def fixed_blocks(shapes: Sequence[str]) -> Dict[str, int]:
    """The launch options the launcher passes itself: the interpreter's tiles, the first GPU
    configuration when autotuning is off, none when autotuned."""
    if INTERPRET:
        return {name: INTERPRET_BLOCK for name in shapes}
    if not AUTOTUNE:
        blocks, warps, stages = _table(shapes)[0]
        return {**blocks, "num_warps": warps, "num_stages": stages}
    return {}


def bucket(n: int) -> int:
    """Autotune key of a size: its power-of-two bucket."""
    return 1 << max(0, int(n) - 1).bit_length()
