"""Dense 1x1 CondConv forward and grad_x with the experts stationary in shared memory and the mix
on the tensor cores (Hopper, Gluon).

Experimental: used only with ``CONDCONV_TRITON_STATIONARY=mix`` (or ``all``) until a GPU run has
measured it against the dense kernels and :mod:`condconv_kernels.triton.stationary`.

Why: the experts-stationary kernel (:mod:`.stationary`) mixes each example's (64 x K) kernel
tile on the CUDA cores: E loads, conversions and FMAs per kernel value and example. On the 7x7
layers of EfficientNet-CondConv (a 64-pixel tile an example) that mix is its bound, 8 x 64 x 192
values an example on s6.b1.expand (192 -> 1152), 0.9 of its modeled 1.2 us an example, and it
holds the program's one warpgroup in dependent shared-memory loads. Here the mix is a product
on the tensor cores, shared by a block of NB examples:

    mixed^T (kernel values x NB) = slab^T (kernel values x E) . routing^T (E x NB)

with the slab as wgmma's A operand (64 kernel values a row block) and E the reduction. E = 8
fills half of bf16's k = 16; the slab stores two kernel columns side by side instead of padding:
the reduction index is 8h + e (h: which of two adjacent columns k = 2q + h), and the B operand
is block-diagonal, example b's routing in column 2b + h for half h. One (64 x 16) x (16 x 2NB)
product then mixes 64 rows x 2 columns of NB examples' kernels.

Per program: 64 rows of W (the output channels; grad_x: the input channels, the slab copied from
W's transpose), every expert, all of K, held in shared memory (E padded to 8: K x 64 x 8 x 2
bytes, 192 KB at K = 192), and a slice of the batch in blocks of NB = 4 examples. Per block and
chunk of 16 channels: 8 mix products (m64n8k16, asynchronous, one wait), the mixed (64 x 16)
tiles moved by two rounds of shuffles within each quad of lanes into the layout of wgmma's A
operand in registers (:func:`_operands`; ``REGISTER_A``, where the plan's ``REG_A`` says so;
otherwise stored to shared memory as the A operands), then the NB products with the
examples' (16 x pixels) tiles of x (m64nNk16, asynchronous: they run while the next chunk's
mix is issued; each chunk's tiles are copied with cp.async two chunks ahead, into three
stages, the NB examples' tiles side by side in one copy). The accumulators (NB x 64 x pixels,
float32) are stored with the mixed bias after the last chunk, through shared memory (16 bytes
a thread). Shared memory: the slab, the three stages, the mixed tiles' buffer (the output's
staging) and the routing block: 224 KB at K = 192 and 64-pixel tiles.

Planes of 65 to 256 pixels (the 14x14 layers; ``TILES`` = 4 tiles of 64 an example): per block
the mix of every chunk first (the NB examples' mixed tiles for all of K, 56 KB at K = 112),
then each example's 4 pixel tiles against its own mixed tiles, chunk by chunk (the unit of the
copies is then one example's 16 x 256 tile), its output through a staging buffer of its own.

Precision: the routing weights enter the tensor cores in the layer's dtype (bfloat16 or
float16), the products accumulate in float32 and the mixed kernel is rounded to the dtype, as
in the other kernels; the routing's rounding adds at most one unit in the last place of the
dtype to each mixed value's relative error.

Scope: 1x1, stride 1, no padding, groups = 1, float16 / bfloat16, the reduced tensor (x;
grad_out for grad_x) channels_last with its channels a multiple of 16 (and the rows too for
grad_x), at most 8 experts, planes of at most 256 pixels, K such that the slab fits
(:func:`plan`: K <= 192 up to 64 pixels, K <= 128 past them), no per-example scales, sm_90;
every other call takes the other kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import stationary

if stationary.AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared,
                                                                  warpgroup_mma,
                                                                  warpgroup_mma_wait)

AVAILABLE = stationary.AVAILABLE
BLOCK_M = stationary.BLOCK_M  # one warpgroup's wgmma rows
WARPS = 4  # one warpgroup
CHUNK = 16  # channels of K a step: one k16 product an example
SLOTS = 8  # expert slots of the reduction (two columns x 8 = wgmma's k of 16)
MAX_EXPERTS = SLOTS
NB = 4  # examples a block (the mix's N = 2 NB = 8, wgmma's least)
# Planes of at most 64 pixels: one pixel tile an example, a block of NB examples' products a
# chunk; of at most TILES x 64: TILES tiles of one example's plane (its mixed tiles for every
# chunk made first, for the block).
BLOCK_N_MAX = 64
TILES = NB
MAX_PIXELS = TILES * BLOCK_N_MAX
# Stages of the x tiles: a chunk's copy is issued two chunks ahead (its L2 round trip, ~1 us
# for 8 KB, is longer than one chunk's products) into the stage of the chunk before it (whose
# products are waited for first). (Four stages, which would leave the last chunk's products
# in flight past one tile an example, fit at K <= 112 but took 16 more registers: 254, and
# spilled with a bias.)
STAGES = 3
# One pixel tile an example: the products take the mixed tiles from registers (wgmma's A),
# moved there by shuffles within each quad of lanes (:func:`_operands`), not through shared
# memory (16 KB a chunk and block less on its bandwidth, the 7x7 form's bound; 16 shuffles and
# ~60 selects a thread more; 205 registers, 239 with a bias). False: through shared memory
# (the plan's ``REG_A``; tests/test_gpu.py runs both).
REGISTER_A = True


def plan(experts: int, k: int, pixels: int, itemsize: int = 2) -> Optional[dict]:
    """The compile-time sizes for E experts, a reduction over K channels and P pixels, or None
    outside the kernel's scope: the slab (K x 64 x 8 slots), three stages of the x tiles
    (16 x 4 x 64 pixels), the mixed (64 x 16) tiles (a chunk's NB, or with 4 tiles an example
    every chunk's), past 64 pixels the output's staging buffer (64 x 64) and the routing block
    must fit in 227 KB (K <= 192 at 64 pixels, K <= 128 past them). ``REG_A``: the products
    take the mixed tiles from registers (one pixel tile an example, :data:`REGISTER_A`)."""
    if not (1 <= experts <= MAX_EXPERTS and 0 < pixels <= MAX_PIXELS and k % CHUNK == 0
            and k > 0):
        return None
    # One pixel tile an example (a power of two, at least 16), or TILES of 64.
    tiles = 1 if pixels <= BLOCK_N_MAX else TILES
    block_n = max(16, stationary._pow2(pixels)) if tiles == 1 else BLOCK_N_MAX
    num_c = k // CHUNK
    mixed = NB * BLOCK_M * CHUNK * (1 if tiles == 1 else num_c)
    staging = 0 if tiles == 1 else BLOCK_M * block_n  # (one tile an example: in ms's bytes)
    shared = (num_c * SLOTS * BLOCK_M * CHUNK + STAGES * NB * CHUNK * block_n + mixed
              + staging + CHUNK * 2 * NB) * itemsize
    if shared > stationary.SHARED_LIMIT - 1024:  # the compiler's own scratch
        return None
    return dict(NUM_C=num_c, BLOCK_N=block_n, TILES=tiles, REG_A=REGISTER_A and tiles == 1,
                shared_bytes=shared)


if AVAILABLE:
    @gluon.jit
    def _copy_unit(xs, x_ptr, b_start, b_end, u, K, P, s_xb, s_xp, o_k, o_n,
                   NUM_C: gl.constexpr, EPU: gl.constexpr, PX: gl.constexpr):
        """Starts the copy of the slice's u-th chunk of x: channels [16c, 16c + 16), c = u %
        NUM_C, of the EPU examples from b_start + (u // NUM_C) EPU (the unit: a block of NB
        examples, or one example), their first PX pixels each, side by side in xs (16 x EPU PX;
        zeros past b_end, K and P): one commit group."""
        c = u % NUM_C
        b = b_start + (u // NUM_C) * EPU + o_n // PX
        p = o_n % PX
        k = c * 16 + o_k
        ptrs = x_ptr + (b.to(gl.int64)[None, :] * s_xb + (k[:, None] + p[None, :] * s_xp))
        mask = (b[None, :] < b_end) & (k[:, None] < K) & (p[None, :] < P)
        cp.async_copy_global_to_shared(xs, ptrs, mask=mask)
        cp.commit_group()

    @gluon.jit
    def _fill_slab(slab, w_ptr, i_m, K, ROWS, s_we, s_wr, s_wk, E: gl.constexpr,
                   W_T: gl.constexpr, NUM_C: gl.constexpr):
        """slab[8c + q] (64 rows x 16 slots) = w[e, row, 16c + 2q + h] at slot 8h + e for the
        program's 64 rows (zeros past E and ROWS). A chunk's 16 columns of every expert are
        loaded at once, the next chunk's while this one is stored (the round trips to L2
        overlap), along W's contiguous dimension (the columns, or, W_T, the rows), each thread
        holding all 16 columns of its share, then put in the slab's order and split into the
        chunk's 8 tiles in registers."""
        if W_T:  # (e, k, row): rows contiguous, 4 a thread
            ld: gl.constexpr = gl.BlockedLayout([1, 16, 4], [2, 1, 16], [4, 1, 1], [2, 1, 0])
            o_e = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, ld)))
            o_k = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, ld)))
            o_r = i_m * 64 + gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, ld)))
            base = (o_e[:, None, None].to(gl.int64) * s_we
                    + (o_k[None, :, None] * s_wk + o_r[None, None, :]))
            valid = (o_e[:, None, None] < E) & (o_r[None, None, :] < ROWS)
        else:  # (e, row, k): the 16 columns contiguous
            ld: gl.constexpr = gl.BlockedLayout([1, 1, 16], [1, 32, 1], [2, 2, 1], [2, 1, 0])
            o_e = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, ld)))
            o_r = i_m * 64 + gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(2, ld)))
            o_k = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, ld)))
            base = (o_e[:, None, None].to(gl.int64) * s_we
                    + (o_r[None, :, None] * s_wr + o_k[None, None, :]))
            valid = (o_e[:, None, None] < E) & (o_r[None, :, None] < ROWS)
        ahead = gl.load(w_ptr + base, mask=valid, other=0.0)
        for c in range(NUM_C):
            # (the next chunk's loads in flight while this one is stored)
            t = ahead
            ahead = gl.load(w_ptr + base + (16 * (c + 1)) * s_wk, mask=valid & (c + 1 < NUM_C),
                            other=0.0)
            if W_T:
                t = gl.permute(t, (0, 2, 1))  # (e, row, k)
            # (e, row, k = 2q + h) -> (row, 8h + e, q), q = 4 q2 + 2 q1 + q0 in registers
            t = gl.permute(gl.reshape(t, [8, 64, 8, 2]), (1, 3, 0, 2))
            t = gl.reshape(t, [64, 16, 2, 2, 2])
            t0, t1 = gl.split(t)  # q0
            t00, t01 = gl.split(t0)  # q1
            t10, t11 = gl.split(t1)
            q0, q4 = gl.split(t00)  # q2
            q2, q6 = gl.split(t01)
            q1, q5 = gl.split(t10)
            q3, q7 = gl.split(t11)
            slab.index(8 * c).store(q0)
            slab.index(8 * c + 1).store(q1)
            slab.index(8 * c + 2).store(q2)
            slab.index(8 * c + 3).store(q3)
            slab.index(8 * c + 4).store(q4)
            slab.index(8 * c + 5).store(q5)
            slab.index(8 * c + 6).store(q6)
            slab.index(8 * c + 7).store(q7)

    @gluon.jit
    def _stack8(m0, m1, m2, m3, m4, m5, m6, m7, NB: gl.constexpr):
        """The 8 mix products of a chunk, each (64 rows x (2b + h)) for k = 2q + h, as the NB
        examples' (64 x 16) tiles: (b, row, 2q + h)."""
        t = gl.join(gl.join(gl.join(m0, m1), gl.join(m2, m3)),
                    gl.join(gl.join(m4, m5), gl.join(m6, m7)))  # (row, n, q0, q1, q2)
        t = gl.reshape(t, [64, NB, 2, 2, 2, 2])  # (row, b, h, q0, q1, q2)
        t = gl.permute(t, (1, 0, 5, 4, 3, 2))  # (b, row, q2, q1, q0, h)
        return gl.reshape(t, [NB, 64, 16])

    # One step of a 4 x 4 transpose between the 4 lanes of a quad (lane bit s) and a register
    # bit (the pair r0, r1: the elements whose index along the split axis is 0 and 1), for
    # 16-bit pairs packed in 32-bit registers: the lane whose bit s is 1 sends r0, the other r1
    # (the elements off the diagonal), and each puts what its partner sent in their place.
    # (``%laneid`` and the predicate depend on the lane alone: ptxas computes them once. The
    # results are written last, from registers of the block's own, so that an output sharing
    # a register with an input cannot clobber it.)
    _BFLY_ASM = """{{
        .reg .pred p;
        .reg .b32 l, s, r, a, b;
        mov.u32 l, %laneid;
        and.b32 l, l, {mask};
        setp.ne.u32 p, l, 0;
        selp.b32 s, $2, $3, p;
        shfl.sync.bfly.b32 r, s, {mask}, 31, -1;
        selp.b32 a, r, $2, p;
        selp.b32 b, $3, r, p;
        mov.b32 $0, a;
        mov.b32 $1, b;
    }}"""
    _BFLY_LANE1 = gl.constexpr(_BFLY_ASM.format(mask=1))
    _BFLY_LANE2 = gl.constexpr(_BFLY_ASM.format(mask=2))

    @gluon.jit
    def _exchange(r0, r1, ASM: gl.constexpr):
        """:data:`_BFLY_ASM` on the pairs (r0, r1), two 16-bit elements a register. Not pure:
        a shuffle needs every lane of the warp, so the compiler must not move it into a branch
        (as a pure call it could)."""
        return gl.inline_asm_elementwise(ASM, "=r,=r,r,r", [r0, r1], dtype=(r0.dtype, r1.dtype),
                                         is_pure=False, pack=2)

    @gluon.jit
    def _operands(m0, m1, m2, m3, m4, m5, m6, m7, op_l: gl.constexpr, dtype: gl.constexpr):
        """The 8 mix products of a chunk as the 4 examples' (64 x 16) A operands in registers
        (``op_l``: wgmma's A layout), without shared memory. After :func:`_stack8` a quad's
        lane c holds example c's 16 columns of its rows; wgmma's A wants each lane to hold
        columns 2c, 2c + 1, 2c + 8, 2c + 9 of every example. Two butterfly steps
        (:func:`_exchange`; lane bit s against column bit s + 1) move the values there, so that
        the tensor then holds, at the logical place (example b, row, column k), the value of
        example k[2:1] at column (k with bits 2:1 replaced by b): a permutation of its axes
        names each value by its own indices again, with the columns' bits 2:1 now on the
        lanes and the examples in registers (a relabeling: no data moves). 16 shuffles a
        thread for 4 examples, where the tiles' trip through shared memory (16-byte stores,
        then wgmma's reads) put 16 KB a chunk on its bandwidth."""
        t = _stack8(m0, m1, m2, m3, m4, m5, m6, m7, 4).to(dtype)  # (b, row, k): lane bits 0, 1 = b
        t = gl.reshape(t, [4, 64, 2, 2, 2, 2])  # (b, row, k3, k2, k1, k0)
        t = gl.permute(t, (0, 1, 2, 3, 5, 4))  # (b, row, k3, k2, k0, k1)
        r0, r1 = gl.split(t)
        r0, r1 = _exchange(r0, r1, _BFLY_LANE1)  # lane bit 0 <-> k1
        t = gl.permute(gl.join(r0, r1), (0, 1, 2, 4, 5, 3))  # (b, row, k3, k0, k1, k2)
        r0, r1 = gl.split(t)
        r0, r1 = _exchange(r0, r1, _BFLY_LANE2)  # lane bit 1 <-> k2
        t = gl.reshape(gl.join(r0, r1), [2, 2, 64, 2, 2, 2, 2])  # (b1, b0, row, k3, k0, k1, k2)
        # The value at (b1, b0, ., ., ., k1, k2) is example (k2, k1)'s at k2 = b1, k1 = b0.
        t = gl.permute(t, (6, 5, 2, 3, 0, 1, 4))  # (B1, B0, row, K3, K2, K1, K0): its own
        t = gl.permute(gl.reshape(t, [2, 2, 64, 16]), (2, 3, 1, 0))  # (row, k, b0, b1)
        t0, t1 = gl.split(t)  # (the last axis) b1
        a0, a1 = gl.split(t0)  # b0
        a2, a3 = gl.split(t1)
        return (gl.convert_layout(a0, op_l), gl.convert_layout(a1, op_l),
                gl.convert_layout(a2, op_l), gl.convert_layout(a3, op_l))

    @gluon.jit
    def _mix_issue(slab, rs, zm, c):
        """The 8 mix products of chunk c (asynchronous): (64 rows x 2NB) for k = 16c + 2q + h,
        q = 0..7."""
        m0 = warpgroup_mma(slab.index(8 * c), rs, zm, use_acc=False, is_async=True)
        m1 = warpgroup_mma(slab.index(8 * c + 1), rs, zm, use_acc=False, is_async=True)
        m2 = warpgroup_mma(slab.index(8 * c + 2), rs, zm, use_acc=False, is_async=True)
        m3 = warpgroup_mma(slab.index(8 * c + 3), rs, zm, use_acc=False, is_async=True)
        m4 = warpgroup_mma(slab.index(8 * c + 4), rs, zm, use_acc=False, is_async=True)
        m5 = warpgroup_mma(slab.index(8 * c + 5), rs, zm, use_acc=False, is_async=True)
        m6 = warpgroup_mma(slab.index(8 * c + 6), rs, zm, use_acc=False, is_async=True)
        m7 = warpgroup_mma(slab.index(8 * c + 7), rs, zm, use_acc=False, is_async=True)
        return m0, m1, m2, m3, m4, m5, m6, m7

    @gluon.jit
    def _products(a0, a1, a2, a3, m0, m1, m2, m3, xs, t, x_ptr, b_start, b_end, K, P, s_xb,
                  s_xp, o_k, o_n, NUM_C: gl.constexpr, EPU: gl.constexpr, PX: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr):
        """The slice's t-th chunk's products, its x tiles in xs[t % STAGES]: this chunk's copy
        waited for (the next one may still be in flight), a barrier, a_i += m_i times the i-th
        64-column slice of the stage (m_i: four A operands, in shared memory or registers),
        left in flight (the loop carries the accumulators as tensors), and the copy two chunks
        ahead (the
        slice's (t + 2)-th chunk, none past b_end) started into the stage of chunk t - 1: before
        the products where the caller has waited for that chunk's, or, OVERLAP, after them,
        once that chunk's products are done (every warp's: a barrier), so that the tensor
        cores have this chunk's queued behind them."""
        cp.wait_group(1)
        fence_async_shared()  # the mixed tiles and the copies, to the tensor cores
        gl.thread_barrier()
        if not OVERLAP:
            _copy_unit(xs.index((t + 2) % STAGES), x_ptr, b_start, b_end, t + 2, K, P, s_xb,
                       s_xp, o_k, o_n, NUM_C, EPU, PX)
        xc = xs.index(t % STAGES)
        a0 = warpgroup_mma(m0, xc.slice(0, BLOCK_N, 1), a0, is_async=True)
        a1 = warpgroup_mma(m1, xc.slice(BLOCK_N, BLOCK_N, 1), a1, is_async=True)
        a2 = warpgroup_mma(m2, xc.slice(2 * BLOCK_N, BLOCK_N, 1), a2, is_async=True)
        a3 = warpgroup_mma(m3, xc.slice(3 * BLOCK_N, BLOCK_N, 1), a3, is_async=True)
        a0, a1, a2, a3 = warpgroup_mma_wait(4, deps=[a0, a1, a2, a3])
        if OVERLAP:
            gl.thread_barrier()  # every warp's products of chunk t - 1 are done
            _copy_unit(xs.index((t + 2) % STAGES), x_ptr, b_start, b_end, t + 2, K, P, s_xb,
                       s_xp, o_k, o_n, NUM_C, EPU, PX)
        return a0, a1, a2, a3

    @gluon.jit
    def _chunk(a0, a1, a2, a3, slab, rs, zm, ms, ms3, xs, c, t, x_ptr, b_start, b_end, K, P,
               s_xb, s_xp, o_k, o_n, NUM_C: gl.constexpr, NB: gl.constexpr,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, REG_A: gl.constexpr,
               op_l: gl.constexpr):
        """Chunk c (16 channels) of a block of NB examples with one pixel tile each, the
        slice's t-th: the 8 mix products (issued while the last chunk's products finish), one
        wait (both), the mixed tiles stored to ms (or, REG_A, moved into wgmma's A layout in
        registers: :func:`_operands`), then the NB products (:func:`_products`)."""
        m0, m1, m2, m3, m4, m5, m6, m7 = _mix_issue(slab, rs, zm, c)
        if REG_A:
            # (no barrier here: the stage of the last chunk is waited for in _products)
            m0, m1, m2, m3, m4, m5, m6, m7, a0, a1, a2, a3 = warpgroup_mma_wait(
                0, deps=[m0, m1, m2, m3, m4, m5, m6, m7, a0, a1, a2, a3])
            o0, o1, o2, o3 = _operands(m0, m1, m2, m3, m4, m5, m6, m7, op_l, ms3.dtype)
            return _products(a0, a1, a2, a3, o0, o1, o2, o3, xs, t, x_ptr, b_start, b_end, K,
                             P, s_xb, s_xp, o_k, o_n, NUM_C, NB, BLOCK_N, BLOCK_N, STAGES,
                             False)
        # The mix and the last chunk's products done (every warp's: the barrier), ms and the
        # last chunk's stage free.
        m0, m1, m2, m3, m4, m5, m6, m7, a0, a1, a2, a3 = warpgroup_mma_wait(
            0, deps=[m0, m1, m2, m3, m4, m5, m6, m7, a0, a1, a2, a3])
        gl.thread_barrier()
        ms3.store(_stack8(m0, m1, m2, m3, m4, m5, m6, m7, NB).to(ms3.dtype))
        return _products(a0, a1, a2, a3, ms.index(0), ms.index(1), ms.index(2), ms.index(3), xs,
                         t, x_ptr, b_start, b_end, K, P, s_xb, s_xp, o_k, o_n, NUM_C, NB,
                         BLOCK_N, BLOCK_N, STAGES, False)

    @gluon.jit
    def _routing_block(r_ptr, blk, b_end, o_s, o_c, s_rb, s_re, E: gl.constexpr):
        """The routing block of the examples [blk, blk + NB) (float32; zeros past b_end):
        slot 8h + e (o_s) x column 2b + h' (o_c), r[blk + b, e] where h = h' and e < E."""
        b = blk + o_c // 2
        return gl.load(r_ptr + b[None, :].to(gl.int64) * s_rb + (o_s % 8)[:, None] * s_re,
                       mask=((o_s % 8)[:, None] < E) & ((o_s // 8)[:, None] == (o_c % 2)[None, :])
                       & (b[None, :] < b_end), other=0.0)

    @gluon.jit
    def _bias(bm_ptr, b, b_end, o_mo, ROWS, s_bb, HAS_BIAS: gl.constexpr):
        """Example b's mixed bias bm[b, row] (float32) for the program's rows (zeros past ROWS
        and b_end; zeros without a bias), loaded at its block's start (past one tile an
        example, at the example's): the load's round trip is over by the epilogue."""
        if HAS_BIAS:
            bias = gl.load(bm_ptr + b.to(gl.int64) * s_bb + o_mo,
                           mask=(o_mo < ROWS) & (b < b_end), other=0.0)
        else:
            bias = gl.full(o_mo.shape, 0.0, gl.float32, o_mo.type.layout)
        return bias

    @gluon.jit
    def _store_example(acc, bias, b, b_end, p0, out_ptr, stage, o_ro, o_po, ROWS, P, s_ob,
                       s_op, HAS_BIAS: gl.constexpr, st_l: gl.constexpr):
        """Example b's tile (64 rows x BLOCK_N pixels from p0, float32 in the accumulators'
        layout) plus its mixed bias (:func:`_bias`), rounded and stored through ``stage``
        (shared memory, rows contiguous) so that each thread writes 8 adjacent channels (16
        bytes); nothing past b_end and P."""
        if b < b_end:
            if HAS_BIAS:
                acc = acc + bias[:, None]
            stage.store(acc.to(stage.dtype))
            gl.thread_barrier()
            t = stage.load(st_l)
            po = p0 + o_po
            gl.store(out_ptr + b.to(gl.int64) * s_ob + (o_ro[:, None] + po[None, :] * s_op),
                     t, mask=(o_ro[:, None] < ROWS) & (po[None, :] < P))
            gl.thread_barrier()  # every thread has read the stage

    @gluon.jit
    def pw_mix_kernel(
        x_ptr, r_ptr, w_ptr, bm_ptr, out_ptr, B, K, ROWS, P, PER_PROG, N_CO,
        s_xb, s_xp, s_rb, s_re, s_we, s_wr, s_wk, s_ob, s_op, s_bb,
        E: gl.constexpr, HAS_BIAS: gl.constexpr, W_T: gl.constexpr, NUM_C: gl.constexpr,
        BLOCK_N: gl.constexpr, NB: gl.constexpr, TILES: gl.constexpr, STAGES: gl.constexpr,
        REG_A: gl.constexpr,
    ):
        """out[b, row, p] = sum_k (sum_e r[b, e] w[e, row, k]) x[b, k, p] (+ bm[b, row], the
        mixed bias, float32) for the 64 rows of program % N_CO and the examples [program //
        N_CO * PER_PROG, + PER_PROG), in blocks of NB = 4. x: (B, K, P) channels_last (a
        pixel's K channels contiguous, pixels s_xp apart); w[e, row, k] at e * s_we + row *
        s_wr + k * s_wk (W_T, grad_x: rows contiguous); out channels_last (rows contiguous,
        pixels s_op apart); K, s_xp and s_xb multiples of 16 and x 16-byte aligned (the copies
        move 16 bytes); offsets within an example fit in int32.

        TILES == 1 (one pixel tile an example), per block of NB examples and chunk of 16
        channels (:func:`_chunk`): the 8 mix products, one wait, the mixed tiles shuffled
        into registers (REG_A) or stored to ms, the NB products left in flight, the copy two
        chunks ahead; after the block's last chunk its tiles stored through ms. TILES == 4:
        per block the mix of every chunk into ms first, then per example its 4 pixel tiles
        chunk by chunk (:func:`_products`), stored through st."""
        pid = gl.program_id(0)
        i_m = pid % N_CO
        i_s = pid // N_CO
        dtype: gl.constexpr = w_ptr.dtype.element_ty
        # Shared layouts: the slab's (64 x 16 slots) tiles M-major (A of the mix); the routing
        # block (16 slots x 2 NB) K-major (B of the mix); the mixed (64 x 16) tiles K-major (A
        # of the products); x's (16 x pixels) tiles K-major (B of the products).
        slab_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                    rank=2, transposed=True)
        k_major_b: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32,
                                                       element_bitwidth=16, rank=2,
                                                       transposed=True)
        k_major_a: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32,
                                                       element_bitwidth=16, rank=2)
        slab = gl.allocate_shared_memory(dtype, [NUM_C * 8, 64, 16], slab_l)
        rs = gl.allocate_shared_memory(dtype, [16, 2 * NB], k_major_b)
        # The mixed tiles: the block's NB for one chunk (one pixel tile an example), or for
        # every chunk (TILES pixel tiles: chunk c's at [c NB, c NB + NB)); stored through a
        # rank-3 view of the same bytes, chunk by chunk.
        MS_C: gl.constexpr = 1 if TILES == 1 else NUM_C
        ms = gl.allocate_shared_memory(dtype, [MS_C * NB, 64, 16], k_major_a)
        ms4 = ms._reinterpret(dtype, [MS_C, NB, 64, 16], gl.NVMMASharedLayout(
            swizzle_byte_width=32, element_bitwidth=16, rank=3))
        xs = gl.allocate_shared_memory(dtype, [STAGES, 16, NB * BLOCK_N], k_major_b)
        mix_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, 2 * NB, 16])
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        # The copies: 16 channels x (example or pixel tile, pixel), 8 channels (16 bytes) a
        # thread; a unit of the copies is a block of NB examples (one tile each) or one example
        # (TILES tiles).
        EPU: gl.constexpr = NB // TILES
        PX: gl.constexpr = TILES * BLOCK_N
        x_l: gl.constexpr = gl.BlockedLayout([8, 1], [2, 16], [1, 4], [0, 1])
        o_k = gl.arange(0, 16, layout=gl.SliceLayout(1, x_l))
        o_n = gl.arange(0, NB * BLOCK_N, layout=gl.SliceLayout(0, x_l))
        # The routing block: slot (8h + e) x column (2b + h').
        r_l: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [4, 1], [1, 0])
        o_s = gl.arange(0, 16, layout=gl.SliceLayout(1, r_l))
        o_rc = gl.arange(0, 2 * NB, layout=gl.SliceLayout(0, r_l))
        o_mo = i_m * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
        # The output through shared memory (64 rows x BLOCK_N pixels), rows contiguous, 8 rows
        # (16 bytes) a thread: ms's bytes, free after a block's last product (one tile an
        # example), or a buffer of its own (the block's mixed tiles serve all its examples).
        st_l: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])
        st_s: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8,
                                                     order=[0, 1])
        if TILES == 1:
            st = ms._reinterpret(dtype, [64, BLOCK_N], st_s)
        else:
            st = gl.allocate_shared_memory(dtype, [64, BLOCK_N], st_s)
        o_ro = i_m * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, st_l))
        o_po = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, st_l))

        b_start = i_s * PER_PROG
        b_end = gl.minimum(B, b_start + PER_PROG)
        # The slice's first two chunks' copies.
        _copy_unit(xs.index(0), x_ptr, b_start, b_end, 0, K, P, s_xb, s_xp, o_k, o_n, NUM_C,
                   EPU, PX)
        _copy_unit(xs.index(1), x_ptr, b_start, b_end, 1, K, P, s_xb, s_xp, o_k, o_n, NUM_C,
                   EPU, PX)
        _fill_slab(slab, w_ptr, i_m, K, ROWS, s_we, s_wr, s_wk, E, W_T, NUM_C)
        zm = gl.zeros([64, 2 * NB], gl.float32, mix_l)
        t = 0  # the slice's chunks done: chunk t's tiles are in stage t % STAGES
        rv = _routing_block(r_ptr, b_start, b_end, o_s, o_rc, s_rb, s_re, E)
        for blk in range(b_start, b_end, NB):
            # Every product of the last block is done (waited below): the routing block in,
            # the next block's loaded (its round trip over by then).
            rs.store(rv.to(dtype))
            fence_async_shared()  # the slab (first block) and the routing block
            gl.thread_barrier()
            rv = _routing_block(r_ptr, blk + NB, b_end, o_s, o_rc, s_rb, s_re, E)
            if TILES == 1:
                bias0 = _bias(bm_ptr, blk, b_end, o_mo, ROWS, s_bb, HAS_BIAS)
                bias1 = _bias(bm_ptr, blk + 1, b_end, o_mo, ROWS, s_bb, HAS_BIAS)
                bias2 = _bias(bm_ptr, blk + 2, b_end, o_mo, ROWS, s_bb, HAS_BIAS)
                bias3 = _bias(bm_ptr, blk + 3, b_end, o_mo, ROWS, s_bb, HAS_BIAS)
                a0 = gl.zeros([64, BLOCK_N], gl.float32, mma)
                a1 = gl.zeros([64, BLOCK_N], gl.float32, mma)
                a2 = gl.zeros([64, BLOCK_N], gl.float32, mma)
                a3 = gl.zeros([64, BLOCK_N], gl.float32, mma)
                for c in range(NUM_C):
                    a0, a1, a2, a3 = _chunk(a0, a1, a2, a3, slab, rs, zm, ms, ms4.index(0), xs,
                                            c, t, x_ptr, b_start, b_end, K, P, s_xb, s_xp, o_k,
                                            o_n, NUM_C, NB, BLOCK_N, STAGES, REG_A, op_l)
                    t += 1
                a0, a1, a2, a3 = warpgroup_mma_wait(0, deps=[a0, a1, a2, a3])
                gl.thread_barrier()  # (every warp's last products are done: ms is free)
                _store_example(a0, bias0, blk, b_end, 0, out_ptr, st, o_ro, o_po, ROWS, P,
                               s_ob, s_op, HAS_BIAS, st_l)
                _store_example(a1, bias1, blk + 1, b_end, 0, out_ptr, st, o_ro, o_po, ROWS, P,
                               s_ob, s_op, HAS_BIAS, st_l)
                _store_example(a2, bias2, blk + 2, b_end, 0, out_ptr, st, o_ro, o_po, ROWS, P,
                               s_ob, s_op, HAS_BIAS, st_l)
                _store_example(a3, bias3, blk + 3, b_end, 0, out_ptr, st, o_ro, o_po, ROWS, P,
                               s_ob, s_op, HAS_BIAS, st_l)
            else:
                # The block's mix, every chunk's mixed tiles at once (the last block's products
                # are done: ms is free).
                for c in range(NUM_C):
                    m0, m1, m2, m3, m4, m5, m6, m7 = _mix_issue(slab, rs, zm, c)
                    m0, m1, m2, m3, m4, m5, m6, m7 = warpgroup_mma_wait(
                        0, deps=[m0, m1, m2, m3, m4, m5, m6, m7])
                    ms4.index(c).store(_stack8(m0, m1, m2, m3, m4, m5, m6, m7, NB).to(dtype))
                # Then each example's TILES pixel tiles against its mixed tiles, chunk by chunk
                # (the fence and barrier in _products make the mixed tiles visible).
                for i in range(NB):
                    if blk + i < b_end:
                        bias = _bias(bm_ptr, blk + i, b_end, o_mo, ROWS, s_bb, HAS_BIAS)
                        a0 = gl.zeros([64, BLOCK_N], gl.float32, mma)
                        a1 = gl.zeros([64, BLOCK_N], gl.float32, mma)
                        a2 = gl.zeros([64, BLOCK_N], gl.float32, mma)
                        a3 = gl.zeros([64, BLOCK_N], gl.float32, mma)
                        for c in range(NUM_C):
                            m = ms.index(c * NB + i)
                            a0, a1, a2, a3 = _products(a0, a1, a2, a3, m, m, m, m, xs, t, x_ptr,
                                                       b_start, b_end, K, P, s_xb, s_xp, o_k,
                                                       o_n, NUM_C, EPU, PX, BLOCK_N, STAGES,
                                                       True)
                            t += 1
                        a0, a1, a2, a3 = warpgroup_mma_wait(0, deps=[a0, a1, a2, a3])
                        gl.thread_barrier()
                        _store_example(a0, bias, blk + i, b_end, 0, out_ptr, st, o_ro, o_po,
                                       ROWS, P, s_ob, s_op, HAS_BIAS, st_l)
                        _store_example(a1, bias, blk + i, b_end, BLOCK_N, out_ptr, st, o_ro,
                                       o_po, ROWS, P, s_ob, s_op, HAS_BIAS, st_l)
                        _store_example(a2, bias, blk + i, b_end, 2 * BLOCK_N, out_ptr, st,
                                       o_ro, o_po, ROWS, P, s_ob, s_op, HAS_BIAS, st_l)
                        _store_example(a3, bias, blk + i, b_end, 3 * BLOCK_N, out_ptr, st,
                                       o_ro, o_po, ROWS, P, s_ob, s_op, HAS_BIAS, st_l)
                gl.thread_barrier()  # every warp's products have read ms
        cp.wait_group(0)  # (the copies issued past the slice's last chunk: none reads them)


def fits(inp: torch.Tensor, experts: int, rows: int, groups: int, pointwise: bool,
         wide: bool, transposed: bool = False, out: Optional[torch.Tensor] = None,
         scales=stationary.NO_SCALES) -> Optional[dict]:
    """The plan (:func:`plan`) where the call's shapes, strides and dtype suit this kernel,
    whatever the device (the static report asks on meta tensors): the arguments as
    :func:`condconv_kernels.triton.stationary.fits`' (``inp`` the reduced tensor, ``rows`` the
    channels written, a multiple of 16 for grad_x), ``out`` (when given) channels_last with its
    address and pixel stride multiples of 8 elements (the stores move 16 bytes), no per-example
    scales."""
    if any(t is not None for t in scales):
        return None
    if not (pointwise and groups == 1 and not wide
            and inp.dtype in (torch.float16, torch.bfloat16) and stationary._copyable(inp)
            and (rows % 16 == 0 or not transposed)):
        return None
    if out is not None:
        s0, s1, s2, s3 = stationary.packed_strides(out)
        if not (s1 == 1 and s3 % 8 == 0 and s2 == out.shape[3] * s3 and s0 % 8 == 0
                and out.data_ptr() % 16 == 0):
            return None
    B, k, H, W = inp.shape
    return plan(experts, k, H * W, inp.element_size())


def eligible(inp: torch.Tensor, experts: int, rows: int, groups: int, pointwise: bool,
             wide: bool, transposed: bool = False, out: Optional[torch.Tensor] = None,
             scales=stationary.NO_SCALES) -> Optional[dict]:
    """The plan where this kernel computes the call, else None: on an sm_90 GPU with Gluon,
    where :func:`fits` accepts it."""
    if not (AVAILABLE and inp.is_cuda
            and torch.cuda.get_device_capability(inp.device) == (9, 0)):
        return None
    return fits(inp, experts, rows, groups, pointwise, wide, transposed, out, scales)


def programs(batch: int, rows: int, sms: int) -> tuple:
    """(row blocks, examples a program, programs) of a launch: as the stationary kernel's
    (:func:`condconv_kernels.triton.stationary.programs`), one program an SM."""
    return stationary.programs(batch, rows, sms)


def mixed_bias(routing: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """sum_e routing[b, e] bias[e, :] (B, Cout), float32, or None without a bias: one small
    product on the host's stream, one load a row in the kernel."""
    if bias is None:
        return None
    return torch.mm(routing.float(), bias.reshape(bias.shape[0], -1).float())


def run(inp: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
        bias: Optional[torch.Tensor], out: torch.Tensor, config: dict,
        transposed: bool = False, launches: Optional[list] = None) -> torch.Tensor:
    """Fills ``out`` for a call :func:`eligible` accepted: the forward of a 1x1 layer (``inp``
    x (B, Cin, H, W), ``out`` (B, Cout, H, W)) or, ``transposed``, its grad_x (``inp``
    grad_out, ``out`` grad_x (B, Cin, H, W); no bias). ``routing`` (B, E) float32, ``weight``
    (E, Cout, Cin, 1, 1), ``bias`` (E, Cout) or None. ``launches``: a list the launch is added
    to, as (kernel, grid, args, kwargs, the compiled kernel) (``_replay.keep``)."""
    B, k, H, W = inp.shape
    E, cout, cin = weight.shape[:3]
    if B == 0:
        return out
    # (weight itself where contiguous: the kernel reads it through the strides below, and a
    # replay finds the call's own tensor in the launch)
    w = weight if weight.is_contiguous() else weight.reshape(E, cout, cin).contiguous()
    rows = cin if transposed else cout
    bm = mixed_bias(routing, bias)
    # w[e, row, k]: W[e, co, ci] at e * cout * cin + co * cin + ci.
    s_we, s_wr, s_wk = (cout * cin, 1, cin) if transposed else (cout * cin, cin, 1)
    sms = torch.cuda.get_device_properties(inp.device).multi_processor_count
    n_co, per, count = programs(B, rows, sms)
    s_in, s_out = stationary.packed_strides(inp), stationary.packed_strides(out)
    args = (inp, routing, w, bm if bm is not None else routing, out, B, k, rows, H * W, per,
            n_co, s_in[0], s_in[3], routing.stride(0), routing.stride(1), s_we, s_wr, s_wk,
            s_out[0], s_out[3], bm.stride(0) if bm is not None else 0)
    kwargs = dict(E=E, HAS_BIAS=bm is not None, W_T=transposed, NUM_C=config["NUM_C"],
                  BLOCK_N=config["BLOCK_N"], NB=NB, TILES=config["TILES"], STAGES=STAGES,
                  REG_A=config["REG_A"], num_warps=WARPS)
    compiled = pw_mix_kernel[(count,)](*args, **kwargs)
    if launches is not None:
        launches.append((pw_mix_kernel, (count,), args, kwargs, compiled))
    return out


# Specializations compile_check builds: (experts, K, pixels, transposed): the 7x7 expand layers'
# forward (K = 192, the largest slab), grad_x of the 7x7 project layers (W^T, K = Cout = 192),
# 4 experts at an odd chunk count (K = 112), a 4x4 plane (16-pixel tiles) at K = 48; the 14x14
# layers (four pixel tiles an example): the forward at K = 112 and 80, grad_x at K = 112.
COMPILE_CASES = [(8, 192, 49, False), (8, 192, 49, True), (4, 112, 49, False),
                 (8, 48, 16, True), (8, 112, 196, False), (8, 80, 196, False),
                 (8, 112, 196, True)]


def compile_for(experts: int, k: int, pixels: int, dtype: torch.dtype, arch: int = 90,
                transposed: bool = False, has_bias: Optional[bool] = None):
    """The kernel compiled ahead of time for ``sm_<arch>`` (no GPU needed) at the plan of
    (E, K, P), ``transposed`` as for grad_x, with the integer specializations a launch gets;
    ``has_bias`` (default: the forward has one) as the launch's."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    config = plan(experts, k, pixels)
    if config is None:
        raise ValueError(f"no plan for E={experts}, K={k}, P={pixels}")
    fn = pw_mix_kernel
    if has_bias is None:
        has_bias = not transposed
    const = dict(E=experts, HAS_BIAS=bool(has_bias), W_T=transposed, NUM_C=config["NUM_C"],
                 BLOCK_N=config["BLOCK_N"], NB=NB, TILES=config["TILES"], STAGES=STAGES,
                 REG_A=config["REG_A"])
    # Strides of 1 a launch makes constants: the contiguous dimension of w, the routing's
    # experts.
    const.update({"s_wr" if transposed else "s_wk": 1, "s_re": 1})
    kind = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    signature = {n: "constexpr" if n in const else "*fp32" if n in ("r_ptr", "bm_ptr") else
                 f"*{kind}" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    # (ROWS: a launch specializes it where it is a multiple of 16, as on every layer of the
    # model; the stores then move 16 bytes)
    divisible = ["x_ptr", "w_ptr", "out_ptr", "K", "ROWS", "s_xb", "s_xp", "s_we", "s_ob",
                 "s_op"] + (["s_wk"] if transposed else ["s_wr"])
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = GluonASTSource(fn, signature,
                            {(fn.arg_names.index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=WARPS))
