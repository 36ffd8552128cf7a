"""Launch configuration: autotuned on the GPU (keys are shape buckets, never the batch), one
fixed configuration under TRITON_INTERPRET=1 (the interpreter cannot autotune)."""
from __future__ import annotations

import os
from typing import Dict, Sequence

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (block a, block b, block c, warps, stages) for kernels whose three tile sizes are named in
# `shapes`: a and b are the output tile, c the reduction block.
_GPU_CONFIGS = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                (128, 128, 32, 8, 3), (32, 64, 64, 4, 4), (64, 32, 64, 4, 4)]
# (block a, block b, warps, stages) for the depthwise kernels: channels x pixels tiles.
_GPU_DW_CONFIGS = [(32, 64, 4, 2), (64, 64, 4, 2), (16, 128, 4, 2), (32, 128, 8, 2),
                   (64, 32, 4, 2)]
# Under the interpreter: small tiles keep the numpy work per program small.
INTERPRET_BLOCK = 16


def autotune(key: Sequence[str], shapes: Sequence[str]):
    """Wraps a kernel in triton.autotune over tile sizes named ``shapes`` (GPU), or leaves it
    alone (interpreter: the launcher passes :func:`fixed_blocks`)."""
    def wrap(kernel):
        if INTERPRET:
            return kernel
        table = _GPU_CONFIGS if len(shapes) == 3 else _GPU_DW_CONFIGS
        n = len(shapes)
        configs = [triton.Config(dict(zip(shapes, c[:n])), num_warps=c[n], num_stages=c[n + 1])
                   for c in table]
        return triton.autotune(configs=configs, key=list(key))(kernel)
    return wrap


def fixed_blocks(shapes: Sequence[str]) -> Dict[str, int]:
    """The tile sizes the launcher passes itself (none when autotuned)."""
    return {name: INTERPRET_BLOCK for name in shapes} if INTERPRET else {}


def bucket(n: int) -> int:
    """Autotune key of a size: its power-of-two bucket."""
    return 1 << max(0, int(n) - 1).bit_length()
