"""Dense 1x1 CondConv forward, grad_x and grad_routing with the experts stationary in shared
memory (Hopper, Gluon).

Experimental: used only with ``CONDCONV_TRITON_STATIONARY=1`` (or the passes it names) until a
GPU run has measured it
against the dense kernels (:mod:`condconv_kernels.triton.dense`).

Why: the dense forward re-reads each expert tile from L2 for every block of 1-4 examples, and
on the 7x7 and 14x14 expand layers of EfficientNet-CondConv at batch 256 those reads are the
bound (453 MB for 192 -> 1152 at 7x7, ~97 us on an H200, against ~14 us for the static layer).
Here a persistent program owns 64 output channels and a slice of the batch. It copies the E
experts' (64 x K) slab into shared memory once (E x 64 x K x 2 bytes: 192 KB for E = 8, K =
192), then for each example of its slice mixes the example's kernel tile from shared memory
(float32 FMAs on the CUDA cores) and multiplies it with the example's pixels on the tensor cores
(wgmma; the pixels copied to shared memory with cp.async). L2 then carries the slab once per
program plus x and out; shared memory carries the slab once per example (and pixel tile).

grad_x of the same layer is the same product with W^T (its rows the input channels, its
reduction over Cout): the slab is copied transposed (rows contiguous) and read with
ldmatrix.trans. grad_routing[b, e] = <grad_out_b, W_e x_b> = <W_e, grad_out_b x_b^T> needs no
mix: per example, the (64 x K) product grad_out_b x_b^T over its pixels on the tensor cores,
then its dot product with each expert's slab (W, or W^T against x grad_out_b^T on the project
layers: the same sum) into partial sums per 64 rows (ROUTING_GRAD): the tensor cores do the
static weight gradient's work once, not E times.

Scope: 1x1, stride 1, no padding, groups = 1, float16 / bfloat16, the reduced tensor (x;
grad_out for grad_x) channels_last with its channels a multiple of 16 (and Cin too for grad_x),
ODConv's per-example scales where each is contiguous along its channels, sm_90 (the routing
form: its dual channels_last too, the rows a multiple of 16, K <= 256); every other call takes
the dense kernels. The forward fits on
EfficientNet-CondConv's expand layers (K = Cin <= 192 at E = 8), grad_x on its project layers
(K = Cout). The forward and grad_x take two forms by the pixel count P: P <= 64 (one pixel tile) mixes into registers and
feeds wgmma's A operand from registers; P > 64 mixes once per example into shared memory (the
A operand) and loops over pixel tiles of up to 128.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

try:  # Gluon: Triton's explicit-layout dialect (Triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared,
                                                                  warpgroup_mma)
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False

# The passes of CONDCONV_TRITON_STATIONARY this kernel serves (_env.STATIONARY_PASSES has the
# others' too).
PASSES = frozenset({"forward", "grad_x", "routing"})
BLOCK_M = 64  # one warpgroup's wgmma rows
WARPS = 4  # one warpgroup
SHARED_LIMIT = 227 * 1024
# Pixel tiles: up to 128 pixels (A from registers up to 64), larger planes in tiles of 128.
MAX_BLOCK_N = 128
# The routing-gradient form's accumulators: one per K chunk, at most 4 (K <= 256).
MAX_ROUTING_KC = 4


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def plan(experts: int, k: int, pixels: int, itemsize: int = 2,
         routing: bool = False) -> Optional[dict]:
    """The kernel's compile-time sizes for E experts, a reduction over K channels and P
    pixels, or None where its shared memory (the slab, the pixel tiles and, for the forward
    over more than 64 pixels, the mixed kernel) would not fit in 227 KB. ``routing``: the
    routing-gradient form (no mix; K at most 256; per pixel tile of at most 64 the K x BLOCK_N
    tile and the dual's 64 x BLOCK_N: two buffers of the widest tile or of half its width,
    else one buffer of the widest, half or 16 pixels, the first that fits)."""
    block_k = min((64, 32), key=lambda bk: -(-k // bk) * bk)  # the least padding; 64 on a tie
    if routing and -(-k // block_k) > MAX_ROUTING_KC:
        block_k = 64
    num_kc = -(-k // block_k)
    slab = experts * num_kc * BLOCK_M * block_k
    if routing:
        # One (64 x BLOCK_K) accumulator per K chunk, at most MAX_ROUTING_KC; per pixel tile the
        # K x BLOCK_N tile and the 64 x BLOCK_N tile of the dual: the widest tile, two buffers
        # first, that fits.
        if num_kc > MAX_ROUTING_KC:
            return None
        widest = max(16, min(64, _pow2(pixels)))
        for block_n, nbuf in ((widest, 2), (widest // 2, 2), (widest, 1), (widest // 2, 1),
                              (16, 1)):
            block_n = max(16, block_n)
            shared = (slab + nbuf * (num_kc * block_k + BLOCK_M) * block_n) * itemsize
            if shared <= SHARED_LIMIT - 1024:
                return dict(BLOCK_K=block_k, NUM_KC=num_kc, BLOCK_N=block_n, A_SMEM=False,
                            NBUF=nbuf, shared_bytes=shared)
        return None
    block_n = max(16, min(MAX_BLOCK_N, _pow2(pixels)))
    tile = num_kc * block_k * block_n
    # A from registers beside a 64 x 128 float32 accumulator spills: tiles past 64 pixels mix
    # into shared memory, and double-buffer the pixel tiles.
    a_smem = block_n > 64
    nbuf = 2 if a_smem else 1
    mixed = num_kc * BLOCK_M * block_k if a_smem else 0
    shared = (slab + nbuf * tile + mixed) * itemsize
    if shared > SHARED_LIMIT - 1024:  # the compiler's own scratch
        return None
    return dict(BLOCK_K=block_k, NUM_KC=num_kc, BLOCK_N=block_n, A_SMEM=a_smem, NBUF=nbuf,
                shared_bytes=shared)


if AVAILABLE:
    @gluon.jit
    def _mixed(slab, r_b, s_re, j, E: gl.constexpr, NUM_KC: gl.constexpr,
               layout: gl.constexpr):
        """sum_e r_b[e] slab[e, chunk j] in float32, in ``layout``."""
        m = gl.load(r_b).to(gl.float32) * slab.index(j).load(layout).to(gl.float32)
        for e in gl.static_range(1, E):
            m += (gl.load(r_b + e * s_re).to(gl.float32)
                  * slab.index(e * NUM_KC + j).load(layout).to(gl.float32))
        return m

    @gluon.jit
    def _copy_x(xs, first, x_b, p0, K, P, s_xp, o_kx, o_px, BLOCK_K: gl.constexpr,
                NUM_KC: gl.constexpr, DUAL: gl.constexpr, ds, d_b, o_md, ROWS, s_dp):
        """Starts the asynchronous copies of one example's (K x BLOCK_N) pixel tile at p0 into
        the NUM_KC buffers from ``first`` on (zeros past K and P): rows of K channels, 16 bytes
        at a time; and, DUAL, the same pixels of the example's dual (its rows o_md, contiguous,
        zeros past ROWS: 8 rows a copy) into ds[first // NUM_KC]. One commit group."""
        px = p0 + o_px
        for kc in gl.static_range(NUM_KC):
            kx = kc * BLOCK_K + o_kx
            cp.async_copy_global_to_shared(xs.index(first + kc),
                                           x_b + (kx[:, None] + px[None, :] * s_xp),
                                           mask=(kx[:, None] < K) & (px[None, :] < P))
        if DUAL:
            cp.async_copy_global_to_shared(ds.index(first // NUM_KC),
                                           d_b + (o_md[:, None] + px[None, :] * s_dp),
                                           mask=(o_md[:, None] < ROWS) & (px[None, :] < P))
        cp.commit_group()

    @gluon.jit
    def next_tile(b, p0, P, BLOCK_N: gl.constexpr):
        """(example, first pixel) of the tile after example b's tile at p0 of its P pixels: the
        example's next tile of BLOCK_N pixels, or the next example's first."""
        if p0 + BLOCK_N < P:
            nb = b
            np0 = p0 + BLOCK_N
        else:
            nb = b + 1
            np0 = 0
        return nb, np0

    @gluon.jit
    def _copy_next(xs, first, x_ptr, b, b_end, p0, s_xb, K, P, s_xp, o_kx, o_px,
                   BLOCK_K: gl.constexpr, NUM_KC: gl.constexpr, BLOCK_N: gl.constexpr,
                   DUAL: gl.constexpr, ds, d_ptr, s_db, o_md, ROWS, s_dp):
        """Starts the copy of the tile after (b, p0) into the buffers from ``first`` on: the
        example's next pixel tile, or the next example's first, or none after the slice (with
        the dual's tile, DUAL: see _copy_x)."""
        nb, np0 = next_tile(b, p0, P, BLOCK_N)
        if nb < b_end:
            _copy_x(xs, first, x_ptr + nb.to(gl.int64) * s_xb, np0, K, P, s_xp, o_kx, o_px,
                    BLOCK_K, NUM_KC, DUAL, ds, d_ptr + nb.to(gl.int64) * s_db, o_md, ROWS, s_dp)

    @gluon.jit
    def _against_slab(part, d, slab, j, o_e, f_r, cs_ptr, c_b, o_k, K, E: gl.constexpr,
                      NUM_KC: gl.constexpr, SCALED: gl.constexpr, COL_SCALE: gl.constexpr,
                      layout: gl.constexpr):
        """part[:, e] += the row sums of d * slab[e, chunk j] (float32) for every expert: d
        (64 x BLOCK_K) and part (64 x E_POW2, o_e its columns) in ``layout`` (a row's sum
        stays within the threads that hold the row). SCALED: d times the rows' factors f_r
        and the chunk's column scale (cs_ptr[c_b + column], the chunk's columns o_k) first."""
        if SCALED:
            d = d * f_r[:, None] * _factor(cs_ptr, c_b, j * d.shape[1] + o_k, K, cs_ptr, 0,
                                           COL_SCALE, False)[None, :]
        for e in gl.static_range(E):
            w = slab.index(e * NUM_KC + j).load(layout).to(gl.float32)
            row = gl.sum(d * w, 1)
            part = gl.where(o_e[None, :] == e, part + row[:, None], part)
        return part

    @gluon.jit
    def _factor(s_ptr, s_b, o, n, t_ptr, t_b, HAS_S: gl.constexpr, HAS_T: gl.constexpr):
        """The example's scale s_ptr[s_b + o] (1 past n) times its tap scale t_ptr[t_b], float32,
        in o's layout; 1 where neither is present (HAS_S, HAS_T)."""
        f = gl.full(o.shape, 1.0, gl.float32, o.type.layout)
        if HAS_S:
            f = gl.load(s_ptr + s_b + o, mask=o < n, other=1.0).to(gl.float32)
        if HAS_T:
            f = f * gl.load(t_ptr + t_b).to(gl.float32)
        return f

    @gluon.jit
    def _store_tile(acc, o_b, r_b, s_re, bias_ptr, o_mo, o_po, p0, COUT, P, s_oc, s_op,
                    rs_ptr, rs_b, E: gl.constexpr, HAS_BIAS: gl.constexpr,
                    ROW_SCALE: gl.constexpr, mma: gl.constexpr):
        """The tile plus the mixed bias, times the row scale (after the bias, as the dense
        kernels), stored."""
        if HAS_BIAS:  # sum_e r_b[e] bias[e] for the tile's rows
            bias = gl.zeros([acc.shape[0]], gl.float32, gl.SliceLayout(1, mma))
            for e in gl.static_range(E):
                bias += gl.load(r_b + e * s_re).to(gl.float32) * gl.load(
                    bias_ptr + e * COUT + o_mo, mask=o_mo < COUT, other=0.0).to(gl.float32)
            acc = acc + bias[:, None]
        if ROW_SCALE:
            acc = acc * _factor(rs_ptr, rs_b, o_mo, COUT, rs_ptr, 0, True, False)[:, None]
        po = p0 + o_po
        gl.store(o_b + (o_mo[:, None] * s_oc + po[None, :] * s_op),
                 acc.to(o_b.dtype.element_ty), mask=(o_mo[:, None] < COUT) & (po[None, :] < P))

    @gluon.jit
    def pw_stationary_kernel(
        x_ptr, r_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, cs_ptr, rs_ptr, ts_ptr, B, K, COUT,
        P, PER_PROG, N_CO, s_xb, s_xp, s_rb, s_re, s_we, s_wr, s_wk, s_ob, s_oc, s_op, s_cb,
        s_rsb, s_tb,
        E: gl.constexpr, HAS_BIAS: gl.constexpr, A_SMEM: gl.constexpr, W_T: gl.constexpr,
        ROUTING_GRAD: gl.constexpr, NBUF: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_K: gl.constexpr, NUM_KC: gl.constexpr, BLOCK_N: gl.constexpr,
        E_POW2: gl.constexpr, WARPS: gl.constexpr, COL_SCALE: gl.constexpr,
        ROW_SCALE: gl.constexpr, TAP_SCALE: gl.constexpr,
    ):
        """out[b, co, p] = sum_k (sum_e r[b, e] w[e, co, k]) x[b, k, p] (+ sum_e r[b, e]
        bias[e, co]) for the 64 channels of program % N_CO and the examples
        [program // N_CO * PER_PROG, + PER_PROG). x: (B, K, P) channels_last (a pixel's K
        channels contiguous, pixels s_xp apart); w[e, co, k] at e * s_we + co * s_wr + k * s_wk
        with k contiguous (s_wk = 1), or, W_T (the transposed kernel: grad_x, whose rows are the
        input channels), co contiguous (s_wr = 1); K, COUT (W_T), s_xp and s_xb multiples of 16
        and x and w 16-byte aligned (the copies move 16 bytes); offsets within an example fit in
        int32.

        The next pixel tile's copy is in flight while the current one is mixed (A in registers,
        one tile an example: the next example's tile starts after this one's products) or
        multiplied (A_SMEM: two pixel buffers; the example's mix into shared memory overlaps
        its first tile's copy).

        ROUTING_GRAD: no mix, no output; out (B, COUT, P), the dual, is read (channels_last,
        COUT a multiple of 16: its tiles are copied 8 rows at a time), and part[program % N_CO,
        b, e] = sum over the program's rows and the pixels of out[b] * (w[e] x[b]) (float32):
        the routing gradient's partial sums (out = grad_out, or, W_T, x with x = grad_out).
        Computed as <w[e], D_b> with D_b = out[b] x[b]^T (64 rows x K, over the pixels) on the
        tensor cores, one (64 x BLOCK_K) accumulator per K chunk (NUM_KC <= 4), both tiles
        copied together into NBUF (1 or 2) buffers; then once per example each expert's slab
        against D_b on the CUDA cores (E x 64 x K FMAs: the forward's mix, in cost).

        Per-example scales (ODConv's), where present, contiguous along their channels:
        COL_SCALE cs[b, k] (examples s_cb apart) and TAP_SCALE ts[b] (s_tb apart) multiply the
        mixed kernel's columns in float32 before it is rounded, ROW_SCALE rs[b, row] (s_rsb)
        the output's rows after the bias, as the dense kernels do (the forward: cs = in_scale,
        rs = out_scale; W_T: cs = out_scale, rs = in_scale); in the routing form all three
        multiply D_b."""
        pid = gl.program_id(0)
        i_m = pid % N_CO
        i_s = pid // N_CO
        dtype: gl.constexpr = w_ptr.dtype.element_ty
        # Register layouts of the copies: W's rows and x's (K x pixels) tiles, K contiguous.
        w_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
        x_layout: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, WARPS], [0, 1])
        xs_layout: gl.constexpr = gl.NVMMASharedLayout(  # K-major B operand
            swizzle_byte_width=min(128, 2 * BLOCK_K), element_bitwidth=16, rank=2,
            transposed=True)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        w_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, 2 * BLOCK_K),
                                                    element_bitwidth=16, rank=2)
        if W_T:  # the slab's rows contiguous: copied 8 rows at a time, kept M-major
            wc_layout: gl.constexpr = x_layout
            slab_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=2 * BLOCK_M,
                                                           element_bitwidth=16, rank=2,
                                                           transposed=True)
        else:
            wc_layout: gl.constexpr = w_layout
            slab_smem: gl.constexpr = w_smem
        slab = gl.allocate_shared_memory(dtype, [E * NUM_KC, BLOCK_M, BLOCK_K], slab_smem)
        xs = gl.allocate_shared_memory(dtype, [NBUF * NUM_KC, BLOCK_K, BLOCK_N], xs_layout)
        if A_SMEM:
            ms = gl.allocate_shared_memory(dtype, [NUM_KC, BLOCK_M, BLOCK_K], slab_smem)

        # The slab: every expert's (64 x K) rows, in K chunks; zeros past COUT and K.
        o_m = i_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, wc_layout))
        o_kw = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, wc_layout))
        for kc in gl.static_range(NUM_KC):
            kw = kc * BLOCK_K + o_kw
            m_w = (o_m[:, None] < COUT) & (kw[None, :] < K)
            for e in gl.static_range(E):
                p_w = (w_ptr + e * s_we.to(gl.int64)
                       + (o_m[:, None].to(gl.int64) * s_wr + kw[None, :].to(gl.int64) * s_wk))
                cp.async_copy_global_to_shared(slab.index(e * NUM_KC + kc), p_w, mask=m_w)
        cp.commit_group()

        o_kx = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, x_layout))
        o_px = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, x_layout))
        o_mo = i_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        o_po = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        o_ka = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))  # the mix's columns
        if ROUTING_GRAD:
            # The dual's (64 rows x BLOCK_N pixels) tiles, rows contiguous: wgmma's A operand,
            # M-major; the products (64 x BLOCK_K, one per K chunk) in mma_r.
            ds = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_M, BLOCK_N], gl.NVMMASharedLayout(
                swizzle_byte_width=2 * BLOCK_M, element_bitwidth=16, rank=2, transposed=True))
            o_md = i_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
            mma_r: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_K, 16])
            o_e = gl.arange(0, E_POW2, layout=gl.SliceLayout(0, mma_r))
            o_mr = i_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_r))
            o_kr = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, mma_r))
        else:  # (stand-ins for the dual's arguments, unused)
            ds = xs
            o_md = o_kx
        b_start = i_s * PER_PROG
        b_end = gl.minimum(B, b_start + PER_PROG)
        _copy_x(xs, 0, x_ptr + b_start.to(gl.int64) * s_xb, 0, K, P, s_xp, o_kx, o_px,
                BLOCK_K, NUM_KC, ROUTING_GRAD, ds, out_ptr + b_start.to(gl.int64) * s_ob, o_md,
                COUT, s_op)
        cp.wait_group(1)  # the slab (the first tile may still be in flight)
        gl.thread_barrier()
        buf = 0
        for b in range(b_start, b_end):
            r_b = r_ptr + b.to(gl.int64) * s_rb
            o_b = out_ptr + b.to(gl.int64) * s_ob
            if ROUTING_GRAD:
                # D = dual_b x_b^T over the pixels (64 x K, float32) on the tensor cores, tile
                # after tile; then part[e] = <D, w[e]> from the slab, once per example.
                d0 = gl.zeros([BLOCK_M, BLOCK_K], gl.float32, mma_r)
                d1 = gl.zeros([BLOCK_M, BLOCK_K], gl.float32, mma_r)
                d2 = gl.zeros([BLOCK_M, BLOCK_K], gl.float32, mma_r)
                d3 = gl.zeros([BLOCK_M, BLOCK_K], gl.float32, mma_r)
                for p0 in range(0, P, BLOCK_N):
                    cp.wait_group(0)
                    fence_async_shared()  # the copies visible to the tensor cores
                    gl.thread_barrier()
                    if NBUF == 2:  # the next tiles into the other buffers while these work
                        _copy_next(xs, (1 - buf) * NUM_KC, x_ptr, b, b_end, p0, s_xb, K, P,
                                   s_xp, o_kx, o_px, BLOCK_K, NUM_KC, BLOCK_N, True, ds,
                                   out_ptr, s_ob, o_md, COUT, s_op)
                    a = ds.index(buf)
                    # x's tile (BLOCK_K x pixels, K-major) read as (pixels x BLOCK_K): wgmma's
                    # B operand, N-major.
                    d0 = warpgroup_mma(a, xs.index(buf * NUM_KC).permute((1, 0)), d0)
                    if NUM_KC > 1:
                        d1 = warpgroup_mma(a, xs.index(buf * NUM_KC + 1).permute((1, 0)), d1)
                    if NUM_KC > 2:
                        d2 = warpgroup_mma(a, xs.index(buf * NUM_KC + 2).permute((1, 0)), d2)
                    if NUM_KC > 3:
                        d3 = warpgroup_mma(a, xs.index(buf * NUM_KC + 3).permute((1, 0)), d3)
                    if NBUF == 1:
                        gl.thread_barrier()  # every warp's products have read the tiles
                        _copy_next(xs, 0, x_ptr, b, b_end, p0, s_xb, K, P, s_xp, o_kx, o_px,
                                   BLOCK_K, NUM_KC, BLOCK_N, True, ds, out_ptr, s_ob, o_md,
                                   COUT, s_op)
                    else:
                        buf = 1 - buf
                # The scales (where given) on D: the rows' (with the tap's) and each chunk's
                # columns'.
                SCALED: gl.constexpr = COL_SCALE or ROW_SCALE or TAP_SCALE
                f_r = _factor(rs_ptr, b.to(gl.int64) * s_rsb, o_mr, COUT, ts_ptr,
                              b.to(gl.int64) * s_tb, ROW_SCALE, TAP_SCALE)
                c_b = b.to(gl.int64) * s_cb
                part = gl.zeros([BLOCK_M, E_POW2], gl.float32, mma_r)
                part = _against_slab(part, d0, slab, 0, o_e, f_r, cs_ptr, c_b, o_kr, K, E,
                                     NUM_KC, SCALED, COL_SCALE, mma_r)
                if NUM_KC > 1:
                    part = _against_slab(part, d1, slab, 1, o_e, f_r, cs_ptr, c_b, o_kr, K, E,
                                         NUM_KC, SCALED, COL_SCALE, mma_r)
                if NUM_KC > 2:
                    part = _against_slab(part, d2, slab, 2, o_e, f_r, cs_ptr, c_b, o_kr, K, E,
                                         NUM_KC, SCALED, COL_SCALE, mma_r)
                if NUM_KC > 3:
                    part = _against_slab(part, d3, slab, 3, o_e, f_r, cs_ptr, c_b, o_kr, K, E,
                                         NUM_KC, SCALED, COL_SCALE, mma_r)
                gl.store(part_ptr + (i_m * B + b) * E + o_e, gl.sum(part, 0), mask=o_e < E)
            elif A_SMEM:
                # The example's kernel, mixed once into shared memory while its first tile's
                # copy is in flight (the last example's products are done: barrier below).
                for j in range(NUM_KC):
                    # (in the slab's copy layout: conflict-free reads of its shared layout)
                    m = _mixed(slab, r_b, s_re, j, E, NUM_KC, wc_layout)
                    if COL_SCALE or TAP_SCALE:
                        m = m * _factor(cs_ptr, b.to(gl.int64) * s_cb, j * BLOCK_K + o_kw, K,
                                        ts_ptr, b.to(gl.int64) * s_tb, COL_SCALE,
                                        TAP_SCALE)[None, :]
                    ms.index(j).store(m.to(dtype))
                for p0 in range(0, P, BLOCK_N):
                    cp.wait_group(0)
                    fence_async_shared()  # the copies and the mix visible to the tensor cores
                    gl.thread_barrier()
                    # The next tile into the other buffer while this one is multiplied.
                    _copy_next(xs, (1 - buf) * NUM_KC, x_ptr, b, b_end, p0, s_xb, K, P, s_xp,
                               o_kx, o_px, BLOCK_K, NUM_KC, BLOCK_N, False, xs, x_ptr, s_xb,
                               o_kx, K, s_xp)
                    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
                    for j in range(NUM_KC):
                        acc = warpgroup_mma(ms.index(j), xs.index(buf * NUM_KC + j), acc)
                    _store_tile(acc, o_b, r_b, s_re, bias_ptr, o_mo, o_po, p0, COUT, P, s_oc,
                                s_op, rs_ptr, b.to(gl.int64) * s_rsb, E, HAS_BIAS, ROW_SCALE,
                                mma)
                    buf = 1 - buf
                gl.thread_barrier()  # every warp's products have read ms
            else:
                # One pixel tile an example. Each chunk is mixed into registers and multiplied
                # at once; the first chunk's mix overlaps the tile's copy.
                acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
                for j in range(NUM_KC):
                    mixed = _mixed(slab, r_b, s_re, j, E, NUM_KC, a_layout)
                    if COL_SCALE or TAP_SCALE:
                        mixed = mixed * _factor(cs_ptr, b.to(gl.int64) * s_cb, j * BLOCK_K + o_ka,
                                                K, ts_ptr, b.to(gl.int64) * s_tb, COL_SCALE,
                                                TAP_SCALE)[None, :]
                    mixed = mixed.to(dtype)
                    if j == 0:
                        cp.wait_group(0)
                        fence_async_shared()
                        gl.thread_barrier()
                    acc = warpgroup_mma(mixed, xs.index(j), acc)
                gl.thread_barrier()  # every warp's products have read xs
                if b + 1 < b_end:  # (one tile an example: no _copy_next, whose other branch
                    # costs this form registers)
                    _copy_x(xs, 0, x_ptr + (b + 1).to(gl.int64) * s_xb, 0, K, P, s_xp, o_kx,
                            o_px, BLOCK_K, NUM_KC, False, xs, x_ptr, o_kx, K, s_xp)
                _store_tile(acc, o_b, r_b, s_re, bias_ptr, o_mo, o_po, 0, COUT, P, s_oc, s_op,
                            rs_ptr, b.to(gl.int64) * s_rsb, E, HAS_BIAS, ROW_SCALE, mma)


# The per-example scales as the triton backend passes them: (in_scale (B, Cin), out_scale
# (B, Cout), tap_scale (B, 1, 1)), each possibly None.
NO_SCALES = (None, None, None)


def _oriented(scales, transposed: bool):
    """(column scale, row scale, tap scale) of the kernel's product: in_scale over the forward's
    reduction (Cin) and out_scale over its rows (Cout); the other way round transposed."""
    in_s, out_s, tap_s = scales
    return (out_s, in_s, tap_s) if transposed else (in_s, out_s, tap_s)


def eligible(inp: torch.Tensor, experts: int, rows: int, groups: int, pointwise: bool,
             wide: bool, transposed: bool = False, routing: bool = False,
             dual: Optional[torch.Tensor] = None, scales=NO_SCALES) -> Optional[dict]:
    """The plan (:func:`plan`) where this kernel computes the call, else None: on an sm_90 GPU
    with Gluon, where :func:`fits` accepts the call."""
    if not (AVAILABLE and inp.is_cuda
            and torch.cuda.get_device_capability(inp.device) == (9, 0)):
        return None
    return fits(inp, experts, rows, groups, pointwise, wide, transposed, routing, dual, scales)


def packed_strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """The strides of ``t`` (B, C, H, W) as these kernels read it: those of its dimensions of
    size 1 (which any stride reads alike) replaced by the ones a packed channels_last tensor
    has there. PyTorch leaves such strides as it finds them: a channels_last (B, C, 1, 1)
    tensor may say (C, 1, 1, 1), whose pixel stride of 1 is no stride between pixels."""
    B, C, H, W = t.shape
    s0, s1, s2, s3 = t.stride()
    if C == 1:
        s1 = 1
    if W == 1:
        s3 = s2 if H > 1 else C * s1
    if H == 1:
        s2 = W * s3
    if B == 1:
        s0 = H * s2
    return s0, s1, s2, s3


def _copyable(t: torch.Tensor) -> bool:
    """Whether the kernel's 16-byte copies can read ``t`` (B, C, H, W): channels_last with its
    channels, strides and address multiples of 16 (elements; bytes for the address), its pixels
    at one stride (:func:`packed_strides`)."""
    s0, s1, s2, s3 = packed_strides(t)
    return (s1 == 1 and t.shape[1] % 16 == 0 and s0 % 16 == 0 and s3 % 16 == 0
            and s2 == t.shape[3] * s3 and t.data_ptr() % 16 == 0)


def _readable_scale(t: Optional[torch.Tensor], batch: int, channels: int) -> bool:
    """Whether the kernel reads this per-example scale: absent, or floating with ``batch`` x
    ``channels`` elements, contiguous along its channels (any stride between examples)."""
    return t is None or (t.is_floating_point() and t.shape[0] == batch
                         and t.numel() == batch * channels
                         and (channels == 1 or t.reshape(batch, channels).stride(1) == 1))


def fits(inp: torch.Tensor, experts: int, rows: int, groups: int, pointwise: bool,
         wide: bool, transposed: bool = False, routing: bool = False,
         dual: Optional[torch.Tensor] = None, scales=NO_SCALES) -> Optional[dict]:
    """The plan (:func:`plan`) where the call's shapes, strides and dtype suit this kernel,
    whatever the device (the static report asks on meta tensors). ``inp``: the tensor whose
    channels the kernel reduces (x; grad_out for grad_x, ``transposed``), ``rows`` the channels
    it writes (Cout; Cin for grad_x). ``pointwise``: 1x1, stride 1, unpadded; ``wide``:
    offsets within an example may pass int32. ``inp`` must be readable by the copies
    (:func:`_copyable`), and, transposed, ``rows`` a multiple of 16 too. ``routing``: the
    routing-gradient form (the plan's ``routing``), whose ``dual`` (B, rows, H, W) (grad_out
    over x; x over grad_out, transposed) the copies read alike. ``scales``: (in_scale,
    out_scale, tap_scale), each None or contiguous along its channels."""
    if not (pointwise and groups == 1 and not wide
            and inp.dtype in (torch.float16, torch.bfloat16) and _copyable(inp)
            and (rows % 16 == 0 or not (transposed or routing))):
        return None
    B, k, H, W = inp.shape
    if H * W == 0:
        return None
    cs, rs, ts = _oriented(scales, transposed)
    if not (_readable_scale(cs, B, k) and _readable_scale(rs, B, rows)
            and _readable_scale(ts, B, 1)):
        return None
    if routing and (dual is None or dual.shape != (B, rows, H, W) or dual.dtype != inp.dtype
                    or not _copyable(dual)):
        return None
    return plan(experts, k, H * W, inp.element_size(), routing=routing)


def programs(batch: int, rows: int, sms: int) -> tuple:
    """(row blocks, examples a program, programs) of a launch over ``rows`` rows on ``sms``
    SMs: one program per SM (shared memory allows no more), the batch sliced evenly."""
    n_co = -(-rows // BLOCK_M)
    per = -(-batch // max(1, sms // n_co))
    return n_co, per, n_co * -(-batch // per)


def _launch(inp, routing, weight, bias, out, part, config, transposed, routing_grad, scales):
    """One launch of the kernel; see :func:`run` and :func:`routing_grad`."""
    B, k, H, W = inp.shape
    E, cout, cin = weight.shape[:3]
    w = weight.reshape(E, cout, cin).contiguous()
    if w.data_ptr() % 16:  # a view into a larger buffer: the slab's 16-byte copies need this
        w = w.clone()
    bias = bias.contiguous() if bias is not None else None  # read as (E, Cout) rows
    rows = cin if transposed else cout
    # w[e, row, k]: W[e, co, ci] is at e * cout * cin + co * cin + ci.
    w_strides = (cout * cin, 1, cin) if transposed else (cout * cin, cin, 1)
    # The scales as (B, channels) rows (tap_scale (B, 1)); w stands in for an absent one.
    cs, rs, ts = _oriented(scales, transposed)
    cs, rs, ts = (None if t is None else t.reshape(B, n)
                  for t, n in ((cs, k), (rs, rows), (ts, 1)))
    sms = torch.cuda.get_device_properties(inp.device).multi_processor_count
    n_co, per, count = programs(B, rows, sms)
    grid = (count,)
    s_in, s_out = packed_strides(inp), packed_strides(out)
    pw_stationary_kernel[grid](
        inp, routing, w, bias if bias is not None else w, out, part if part is not None else w,
        *(w if t is None else t for t in (cs, rs, ts)),
        B, k, rows, H * W, per, n_co, s_in[0], s_in[3], routing.stride(0),
        routing.stride(1), *w_strides, s_out[0], s_out[1], s_out[3],
        *(0 if t is None else t.stride(0) for t in (cs, rs, ts)),
        E=E, HAS_BIAS=bias is not None, A_SMEM=config["A_SMEM"], W_T=transposed,
        ROUTING_GRAD=routing_grad, NBUF=config["NBUF"], BLOCK_M=BLOCK_M,
        BLOCK_K=config["BLOCK_K"], NUM_KC=config["NUM_KC"], BLOCK_N=config["BLOCK_N"],
        E_POW2=_pow2(E), WARPS=WARPS, COL_SCALE=cs is not None, ROW_SCALE=rs is not None,
        TAP_SCALE=ts is not None, num_warps=WARPS)
    return n_co


def run(inp: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
        bias: Optional[torch.Tensor], out: torch.Tensor, config: dict,
        transposed: bool = False, scales=NO_SCALES) -> torch.Tensor:
    """Fills ``out`` for a call :func:`eligible` accepted: the forward of a 1x1 layer (x,
    (B, Cout, H, W)) or, ``transposed``, its grad_x (grad_out, (B, Cin, H, W); no bias), with
    the per-example ``scales`` (in_scale, out_scale, tap_scale) where given."""
    _launch(inp, routing, weight, bias, out, None, config, transposed, False, scales)
    return out


def routing_grad(inp: torch.Tensor, dual: torch.Tensor, weight: torch.Tensor, config: dict,
                 transposed: bool = False, scales=NO_SCALES) -> torch.Tensor:
    """grad_routing[b, e] = sum over (co, p) of grad_out[b, co, p] (W[e] x[b])[co, p] of a 1x1
    layer, (B, E) float32, for a call :func:`eligible` accepted with ``routing=True``: ``inp``
    x and ``dual`` grad_out (the slab W, rows Cout), or, ``transposed``, ``inp`` grad_out and
    ``dual`` x (the slab W^T, rows Cin: the same sum); W[e] scaled by the per-example
    ``scales`` where given. Partial sums per 64 rows, added in a fixed order
    (deterministic)."""
    B = inp.shape[0]
    E, cout, cin = weight.shape[:3]
    rows = cin if transposed else cout
    part = torch.empty((-(-rows // BLOCK_M), B, E), dtype=torch.float32, device=inp.device)
    routing = torch.empty((B, E), dtype=torch.float32, device=inp.device)  # unread
    _launch(inp, routing, weight, None, dual, part, config, transposed, True, scales)
    return part.sum(0)


# Specializations compile_check builds: (experts, K, pixels, transposed, routing, scaled) for
# each form of the forward (A from registers at 7x7 with three K chunks, A from shared memory
# over two pixel tiles, K chunks of 32), grad_x of the 7x7 and 14x14 project layers
# (transposed: K = their Cout) and the routing gradient (tiles of 32 pixels at K = 192, of 64 at
# 112, K chunks of 32, four K chunks, one buffer of 16-pixel tiles); then the forms with the
# three per-example scales.
COMPILE_CASES = [(8, 192, 49, False, False, False), (8, 112, 196, False, False, False),
                 (8, 80, 196, False, False, False), (8, 192, 49, True, False, False),
                 (8, 112, 196, True, False, False), (8, 80, 196, True, False, False),
                 (8, 192, 49, False, True, False), (8, 112, 196, False, True, False),
                 (8, 192, 49, True, True, False), (8, 80, 196, False, True, False),
                 (2, 208, 49, False, True, False), (9, 192, 196, False, True, False),
                 (8, 192, 49, False, False, True), (8, 112, 196, False, False, True),
                 (8, 192, 49, True, False, True), (8, 112, 196, True, False, True),
                 (8, 192, 49, False, True, True), (8, 112, 196, True, True, True)]


def compile_for(experts: int, k: int, pixels: int, dtype: torch.dtype, arch: int = 90,
                transposed: bool = False, routing: bool = False,
                has_bias: Optional[bool] = None, scaled: bool = False):
    """The kernel compiled ahead of time for ``sm_<arch>`` (no GPU needed) at the plan of
    (E, K, P), ``transposed`` as for grad_x, with the integer specializations a launch gets
    (sizes and strides divisible by 16, the contiguous dimension's stride 1); ``has_bias``
    (default: the forward's form has one) as the launch's; ``scaled``: with the three
    per-example scales (float32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    config = plan(experts, k, pixels, routing=routing)
    if config is None:
        raise ValueError(f"no plan for E={experts}, K={k}, P={pixels}: the slab does not fit")
    fn = pw_stationary_kernel
    if has_bias is None:
        has_bias = not (transposed or routing)
    const = dict(E=experts, HAS_BIAS=bool(has_bias), A_SMEM=config["A_SMEM"],
                 W_T=transposed, ROUTING_GRAD=routing, NBUF=config["NBUF"], BLOCK_M=BLOCK_M,
                 BLOCK_K=config["BLOCK_K"], NUM_KC=config["NUM_KC"],
                 BLOCK_N=config["BLOCK_N"], E_POW2=_pow2(experts), WARPS=WARPS,
                 COL_SCALE=scaled, ROW_SCALE=scaled, TAP_SCALE=scaled)
    # Strides of 1 a launch makes constants: the contiguous dimension of w, the routing's
    # experts, and the output's channels (channels_last).
    const.update({"s_wr" if transposed else "s_wk": 1, "s_re": 1, "s_oc": 1})
    kind = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    signature = {n: "constexpr" if n in const else
                 "*fp32" if n in ("r_ptr", "part_ptr", "cs_ptr", "rs_ptr", "ts_ptr") else
                 f"*{kind}" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    divisible = ["x_ptr", "w_ptr", "bias_ptr", "out_ptr", "part_ptr", "K", "s_xb", "s_xp",
                 "s_we", "s_ob", "s_op"] + (["COUT", "s_wk"] if transposed else ["s_wr"])
    if routing and not transposed:  # the dual's rows, copied 8 at a time
        divisible.append("COUT")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = GluonASTSource(fn, signature,
                            {(fn.arg_names.index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=WARPS))

