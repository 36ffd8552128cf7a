"""Launch grids flattened into axis 0.

CUDA limits a grid's y and z dimensions to 65535 programs: a batch of 65536 examples on the
depthwise kernels' z axis, or ``cdiv(B, BLOCK_B) * groups`` past it on the dense ones, would not
launch. Every kernel here takes a 1-D grid of up to 2**31 - 1 programs (:func:`flat_grid`) and
unravels its program id into the (fastest, middle, slowest) indices it used to read from three
axes (:func:`program_ids`), in the same launch order.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

_MAX_PROGRAMS = 2 ** 31 - 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host integers, b > 0: what a launcher computes for every launch
    (``triton.cdiv`` is a constexpr function, and costs microseconds a call on the host)."""
    return -(-a // b)


def flat_grid(*dims: int) -> tuple:
    """The 1-D grid of ``prod(dims)`` programs (dims fastest first)."""
    n = math.prod(dims)
    if n > _MAX_PROGRAMS:
        raise ValueError(f"condconv2d: argument 'x' is too large for the triton backend: the "
                         f"call needs {n} programs ({' x '.join(map(str, dims))}), more than "
                         f"2**31 - 1; split the batch")
    return (n,)


@triton.jit
def program_ids(N0, N1):
    """(i0, i1, i2) of this program in a grid of N0 x N1 x (any) programs flattened by
    :func:`flat_grid`, i0 fastest."""
    pid = tl.program_id(0)
    return pid % N0, (pid // N0) % N1, pid // (N0 * N1)
