"""Dense CondConv (Cin/groups > 1) in Triton: the expert mix fused into an implicit GEMM.

Forward: a program owns a (BLOCK_M output channels x BLOCK_N output pixels) tile of one group
for a block of BLOCK_B examples (1 to 4 in the tables). For each K = Cin/g*kh*kw block it loads
each of the E expert tiles of W once (E is a compile-time constant: the K loop has no inner
runtime loop and pipelines), mixes them for every example of the block in registers (float32,
float64 for float64), and runs one 2-D tl.dot per example: the mixed tile is the A operand,
straight from registers (on Hopper, wgmma takes A from registers), the example's input patches
the B operand (im2col on the fly, padding by masks, x read through its strides; 1x1 layers read
x's matrix directly). The expert tiles are read once per block of examples instead of once per
example; the mixed kernels never go to memory. BLOCK_B = 1 is the small-batch path.

Backward:
- grad_x: the transposed convolution, the same way: mixed W^T tiles times gathered grad_out;
  at a stride, phase by phase (a program's input pixels of one phase, its reduction over the
  taps that reach that phase only);
- kernel gradient: a program owns a (BLOCK_CO x BLOCK_K) tile of W for a slice of the batch
  and, example by example, computes that tile of G_b = grad_out_b @ cols_b^T, adds
  routing[b, e] * G_b into the tile of every expert's gradient, which it holds in registers
  until it writes them once, and writes <G_b, W[e]> over the tile (the E expert tiles loaded
  once) as a partial of grad_routing[b, e]. Nothing is shared between programs; the batch
  slices' gradients and the partials are summed afterwards in a fixed order (deterministic).
  An example of at most CHAIN tiles of pixels is walked in one loop over (example, tile),
  which Triton pipelines across examples: the next tiles are copied while one is folded.

All dot dimensions are >= 16, so what runs in the interpreter compiles for the GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import DENSE_TILES, HELD_ROUTING, KGRAD_TILES, SCALE_FLAGS, autotune, untuned
from ._grid import program_ids
from ._scales import scale_factor


@triton.jit
def _route(r_ptr, b, s_rb, s_re, e: tl.constexpr, ACC: tl.constexpr):
    """routing[b, e] as a scalar in the accumulation dtype."""
    return tl.load(r_ptr + b.to(tl.int64) * s_rb + e * s_re).to(ACC)


@triton.jit
def _examples(i_bb, B, BLOCK_B: tl.constexpr):
    """The BLOCK_B examples of block i_bb as a tuple, clamped to the batch (a block past its
    end recomputes the last example and does not store it)."""
    bs = ()
    for j in tl.static_range(BLOCK_B):
        bs = bs + (tl.minimum(i_bb * BLOCK_B + j, B - 1),)
    return bs


@triton.jit
def _scale(ts, p_a, s_a, o_a, p_c, s_c, o_c, bs, mask, HAS_A: tl.constexpr,
           HAS_C: tl.constexpr, ROWS: tl.constexpr, ACC: tl.constexpr):
    """The tuple of tiles ts, each ts[j] times example bs[j]'s factor a[b, o_a] * c[b, o_c]
    (scale_factor) along its rows (ROWS: one factor a row) or its columns; ts itself without
    either scale."""
    if HAS_A or HAS_C:
        scaled = ()
        for j in tl.static_range(len(ts)):
            f = scale_factor(p_a, s_a, o_a, p_c, s_c, o_c, bs[j], mask, HAS_A, HAS_C, ACC)
            scaled = scaled + (ts[j] * (f[:, None] if ROWS else f[None, :]),)
        ts = scaled
    return ts


@triton.jit
def _mix(r_ptr, r_moved, w_ptr, p_w, m_w, bs, s_rb, s_re, N, E: tl.constexpr,
         ACC: tl.constexpr):
    """The mixed tiles W_b = sum_e routing[b, e] W[e] of the examples of the tuple bs, as a
    tuple, where W[e] + p_w - w_ptr addresses the tile in expert e (experts N elements apart).
    Each expert tile is loaded once for all of them, E is unrolled: the loop over K around this
    has no inner runtime loop.

    The routing weights are the same in every K block, so the compiler loads them once, before
    the K loop, and holds them in registers. Past HELD_ROUTING of them (found with blocks of 8
    examples x 8 experts beside 32K float32 accumulators, where ptxas spilled; the tables now
    reach it only past 8 experts) the further examples' are read through
    r_moved instead: r_ptr moved by a runtime zero in each K block (k0 times the launcher's
    s_rk = 0), which the compiler cannot fold, so their loads stay in the loop."""
    HELD: tl.constexpr = HELD_ROUTING // E
    ms = ()
    for e in tl.static_range(E):
        w = tl.load(p_w + e * N, mask=m_w, other=0.0).to(ACC)
        summed = ()
        for j in tl.static_range(len(bs)):
            r = _route(r_ptr if j < HELD else r_moved, bs[j], s_rb, s_re, e, ACC)
            summed = summed + (r * w if e == 0 else ms[j] + r * w,)
        ms = summed
    return ms


@triton.jit
def _dot(accs, ws, base, bs, s_b, off, mask, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """accs[j] + ws[j] @ (example bs[j]'s tile at base + bs[j] * s_b + off) for each example of
    the block, as a tuple: one 2-D dot each, the mixed tile as the A operand."""
    out = ()
    for j in tl.static_range(len(bs)):
        t = tl.load(base + bs[j].to(tl.int64) * s_b + off, mask=mask, other=0.0)
        out = out + (tl.dot(ws[j].to(t.dtype), t, acc=accs[j], input_precision=PRECISION,
                            out_dtype=ACC),)
    return out


@triton.jit
def _store(o_ptr, bs, B, s_b, o_m, m_m, o_n, m_n, s_m, s_n, accs):
    """The block's (rows x pixels) tiles accs[j] of the examples bs[j] that are in the batch
    (the block's first example and those after it; the clamped repeats of the last are not
    stored); the pixels of the output are one strided dimension (it is allocated contiguous or
    channels_last)."""
    for j in tl.static_range(len(accs)):
        if bs[0] + j < B:
            p = (o_ptr + (bs[0] + j).to(tl.int64) * s_b + o_m[:, None].to(tl.int64) * s_m
                 + o_n[None, :].to(tl.int64) * s_n)
            tl.store(p, accs[j].to(o_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@autotune(key=["B_KEY", "COUT_G", "KEY_K", "KEY_L", "E", "KH", "KW", "TAP_MAJOR",
               *SCALE_FLAGS], shapes=DENSE_TILES)
@triton.jit
def dense_fwd_kernel(
    x_ptr, r_ptr, w_ptr, bias_ptr, in_s_ptr, out_s_ptr, tap_s_ptr, out_ptr,
    B, CIN_G, COUT_G, GROUPS, H, W, HO, WO,
    s_xb, s_xc, s_xh, s_xw, s_rb, s_re, s_rk, s_ob, s_oc, s_oh, s_ow,
    s_ib, s_ic, s_jb, s_jc, s_tb, s_tt,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, B_KEY, KEY_K, KEY_L,
    E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, TAP_SCALE: tl.constexpr,
    POINTWISE: tl.constexpr, TAP_MAJOR: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, co, p] for BLOCK_B examples x BLOCK_M output channels x BLOCK_N output pixels of
    one group. Per K block: each expert tile loaded once and mixed for every example of the
    block (_mix; the block's tiles and accumulators are tuples), then one 2-D dot per example
    with the mixed tile as the A operand (in registers) and the example's input patches as B.
    POINTWISE (1x1, stride 1, no padding, H and W mergeable in x): the patches are x's
    (channels x pixels) matrix itself.

    The reduction index k runs over (input channel, tap), or with TAP_MAJOR over (tap, input
    channel), w_ptr then holding the experts as (E, Cout, kh, kw, Cin/groups): a tap's
    channels are contiguous in both the expert tiles and a channels_last x, so their loads are
    vector loads that Triton copies asynchronously.

    The per-example scales, where present (in_scale (B, Cin) strides s_ib, s_ic; out_scale
    (B, Cout) s_jb, s_jc; tap_scale (B, KH * KW) s_tb, s_tt): in and tap multiply the mixed
    tile's columns, out the accumulator's rows after the bias, in float32. s_rk is 0 (see
    _mix)."""
    i_n, i_m, i_bg = program_ids(tl.cdiv(HO * WO, BLOCK_N), tl.cdiv(COUT_G, BLOCK_M))
    i_bb, i_g = i_bg // GROUPS, i_bg % GROUPS
    bs = _examples(i_bb, B, BLOCK_B)
    K = CIN_G * KH * KW
    N = COUT_G * GROUPS * K
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < COUT_G
    o_co = i_g * COUT_G + o_m
    o_p = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_p = o_p < HO * WO
    o_oh, o_ow = o_p // WO, o_p % WO
    x_g = x_ptr + (i_g * CIN_G).to(tl.int64) * s_xc

    accs = ()
    for j in tl.static_range(BLOCK_B):
        accs = accs + (tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC),)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        if TAP_MAJOR:
            o_t, o_ci = o_k // CIN_G, o_k % CIN_G
        else:
            o_ci, o_t = o_k // (KH * KW), o_k % (KH * KW)
        ws = _mix(r_ptr, r_ptr + k0 * s_rk, w_ptr,
                  w_ptr + o_co[:, None].to(tl.int64) * K + o_k[None, :],
                  m_m[:, None] & m_k[None, :], bs, s_rb, s_re, N, E, ACC)
        ws = _scale(ws, in_s_ptr, s_ib, (i_g * CIN_G + o_ci) * s_ic, tap_s_ptr, s_tb,
                    o_t * s_tt, bs, m_k, IN_SCALE, TAP_SCALE, False, ACC)
        if POINTWISE:  # x[b, ci, p]: the pixels are one strided dimension
            off = o_k[:, None].to(tl.int64) * s_xc + o_p[None, :].to(tl.int64) * s_xw
            m_x = m_k[:, None] & m_p[None, :]
        else:  # im2col on the fly; the padding is the mask
            o_ih = o_oh[None, :] * STRIDE_H - PAD_T + (o_t // KW)[:, None] * DIL_H
            o_iw = o_ow[None, :] * STRIDE_W - PAD_L + (o_t % KW)[:, None] * DIL_W
            off = (o_ci[:, None].to(tl.int64) * s_xc + o_ih.to(tl.int64) * s_xh
                   + o_iw.to(tl.int64) * s_xw)
            m_x = (m_k[:, None] & m_p[None, :] & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0)
                   & (o_iw < W))
        accs = _dot(accs, ws, x_g, bs, s_xb, off, m_x, PRECISION, ACC)
    if HAS_BIAS:
        cs = _mix(r_ptr, r_ptr, bias_ptr, bias_ptr + o_co, m_m, bs, s_rb, s_re, COUT_G * GROUPS,
                  E, ACC)
        biased = ()
        for j in tl.static_range(BLOCK_B):
            biased = biased + (accs[j] + cs[j][:, None],)
        accs = biased
    accs = _scale(accs, out_s_ptr, s_jb, o_co * s_jc, out_s_ptr, s_jb, o_co * s_jc, bs, m_m,
                  OUT_SCALE, False, True, ACC)
    _store(out_ptr + (i_g * COUT_G).to(tl.int64) * s_oc, bs, B, s_ob, o_m, m_m, o_p, m_p, s_oc,
           s_ow, accs)


@triton.jit
def _phase_taps(phase, pad, dil, stride, TAPS: tl.constexpr):
    """The taps (of TAPS along one dimension) through which the input positions phase, phase +
    stride, phase + 2 stride, ... (phase < stride) feed an output position of a strided
    convolution: those with phase + pad - tap * dil a multiple of the stride, as (first,
    count, step). Any two of them differ by a multiple of stride / gcd(stride, dil), so they
    run from the first in steps of that (the difference of the first two); count 0 where no
    output position reads these inputs."""
    first = phase * 0
    count = phase * 0
    step = phase * 0 + 1
    for t in tl.static_range(TAPS):
        hit = (phase + pad - t * dil) % stride == 0
        step = tl.where(hit & (count == 1), t - first, step)
        first = tl.where(hit & (count == 0), t, first)
        count += hit.to(count.dtype)
    return first, count, step


@autotune(key=["B_KEY", "CIN_G", "KEY_K", "KEY_L", "E", "KH", "KW", "TAP_MAJOR",
               "PHASES", *SCALE_FLAGS], shapes=DENSE_TILES)
@triton.jit
def dense_bwd_x_kernel(
    g_ptr, r_ptr, w_ptr, in_s_ptr, out_s_ptr, tap_s_ptr, dx_ptr,
    B, CIN_G, COUT_G, GROUPS, H, W, HO, WO,
    s_gb, s_gc, s_gh, s_gw, s_rb, s_re, s_rk, s_db, s_dc, s_dh, s_dw,
    s_ib, s_ic, s_jb, s_jc, s_tb, s_tt,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, B_KEY, KEY_K, KEY_L,
    E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, IN_SCALE: tl.constexpr,
    OUT_SCALE: tl.constexpr, TAP_SCALE: tl.constexpr, POINTWISE: tl.constexpr,
    TAP_MAJOR: tl.constexpr, PHASES: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x[b, ci, ih, iw] = sum_{co, i, j} W_b[co, ci, i, j] grad_out[b, co, oh, ow] over
    the (oh, ow) with ih = oh * stride - pad + i * dilation (likewise w), for BLOCK_B examples x
    BLOCK_M input channels x BLOCK_N input pixels, the mixed W^T tiles made as in the forward.
    POINTWISE: grad_out's (channels x pixels) matrix itself. The scales (as in the forward): out
    and tap multiply the mixed tile's columns, in the accumulator's rows. The reduction index
    runs over (output channel, tap), or with TAP_MAJOR over (tap, output channel), w_ptr then
    holding the experts as (E, kh, kw, Cout, Cin/groups): the W^T tile contiguous along its
    input channels, the grad_out tile of a channels_last grad_out along its output channels
    (vector loads, copied asynchronously).

    PHASES (a stride above 1): a program's input pixels are of one phase (ih mod stride_h, iw
    mod stride_w), the grid's pixel axis running over the phases' pixel tiles; only some taps
    reach a phase (_phase_taps: at stride 2 a quarter of them on average), and the reduction
    runs over those alone, where over every tap the masks would zero the rest of the products
    and of the mix (4x the work of the forward at stride 2 in both dimensions)."""
    if PHASES:
        HC, WC = tl.cdiv(H, STRIDE_H), tl.cdiv(W, STRIDE_W)  # a phase's rows and columns, at most
        NQ = tl.cdiv(HC * WC, BLOCK_N)  # pixel tiles a phase
        PW = tl.minimum(STRIDE_W, W)  # the phases that hold pixels (a stride past the plane:
        # as many as its rows and columns)
        i_n, i_m, i_bg = program_ids(tl.minimum(STRIDE_H, H) * PW * NQ,
                                     tl.cdiv(CIN_G, BLOCK_M))
        ph_h, ph_w = (i_n // NQ) // PW, (i_n // NQ) % PW
        o_q = (i_n % NQ) * BLOCK_N + tl.arange(0, BLOCK_N)  # the phase's pixels
        o_ih, o_iw = ph_h + (o_q // WC) * STRIDE_H, ph_w + (o_q % WC) * STRIDE_W
        m_q = (o_q < HC * WC) & (o_ih < H) & (o_iw < W)
        o_px = o_ih * W + o_iw
        i0, ni, si = _phase_taps(ph_h, PAD_T, DIL_H, STRIDE_H, KH)
        j0, nj, sj = _phase_taps(ph_w, PAD_L, DIL_W, STRIDE_W, KW)
        NT = ni * nj  # 0: nothing reaches these pixels, whose gradient is 0
    else:
        i_n, i_m, i_bg = program_ids(tl.cdiv(H * W, BLOCK_N), tl.cdiv(CIN_G, BLOCK_M))
        o_q = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_q = o_q < H * W
        o_ih, o_iw = o_q // W, o_q % W
        o_px = o_q
        NT: tl.constexpr = KH * KW
    i_bb, i_g = i_bg // GROUPS, i_bg % GROUPS
    bs = _examples(i_bb, B, BLOCK_B)
    K2 = COUT_G * NT
    N = COUT_G * GROUPS * CIN_G * KH * KW
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < CIN_G
    g_g = g_ptr + (i_g * COUT_G).to(tl.int64) * s_gc

    accs = ()
    for j in tl.static_range(BLOCK_B):
        accs = accs + (tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC),)
    for k0 in range(0, K2, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K2
        if TAP_MAJOR:  # (tap, co): the tap's index among those the reduction runs over
            o_u, o_co = o_k // COUT_G, o_k % COUT_G
        else:  # (co, tap)
            o_co, o_u = o_k // NT, o_k % NT
        if PHASES:  # the phase's taps, row after row
            o_t = (i0 + (o_u // nj) * si) * KW + j0 + (o_u % nj) * sj
        else:
            o_t = o_u
        if TAP_MAJOR:  # Mixed W^T tile: (ci, (t, co)) of W[e, t, g * COUT_G + co, ci].
            p_w = (w_ptr + ((o_t[None, :] * GROUPS + i_g) * COUT_G + o_co[None, :]).to(tl.int64)
                   * CIN_G + o_m[:, None])
        else:  # Mixed W^T tile: (ci, (co, t)) of W[e, g * COUT_G + co, ci, t].
            p_w = (w_ptr + ((i_g * COUT_G + o_co[None, :]).to(tl.int64) * CIN_G + o_m[:, None])
                   * (KH * KW) + o_t[None, :])
        ws = _mix(r_ptr, r_ptr + k0 * s_rk, w_ptr, p_w,
                  m_m[:, None] & m_k[None, :], bs, s_rb, s_re, N, E, ACC)
        ws = _scale(ws, out_s_ptr, s_jb, (i_g * COUT_G + o_co) * s_jc, tap_s_ptr, s_tb,
                    o_t * s_tt, bs, m_k, OUT_SCALE, TAP_SCALE, False, ACC)
        if POINTWISE:
            off = o_k[:, None].to(tl.int64) * s_gc + o_q[None, :].to(tl.int64) * s_gw
            m_g = m_k[:, None] & m_q[None, :]
        else:  # grad_out at the output pixel each (input pixel, tap) came from, if any
            o_nh = o_ih[None, :] + PAD_T - (o_t // KW)[:, None] * DIL_H
            o_nw = o_iw[None, :] + PAD_L - (o_t % KW)[:, None] * DIL_W
            o_oh, o_ow = o_nh // STRIDE_H, o_nw // STRIDE_W
            if PHASES:  # (a phase's taps divide by the strides)
                m_g = (m_k[:, None] & m_q[None, :] & (o_nh >= 0) & (o_nw >= 0) & (o_oh < HO)
                       & (o_ow < WO))
            else:
                m_g = (m_k[:, None] & m_q[None, :] & (o_nh >= 0) & (o_nw >= 0)
                       & (o_nh % STRIDE_H == 0) & (o_nw % STRIDE_W == 0) & (o_oh < HO)
                       & (o_ow < WO))
            off = (o_co[:, None].to(tl.int64) * s_gc + o_oh.to(tl.int64) * s_gh
                   + o_ow.to(tl.int64) * s_gw)
        accs = _dot(accs, ws, g_g, bs, s_gb, off, m_g, PRECISION, ACC)
    accs = _scale(accs, in_s_ptr, s_ib, (i_g * CIN_G + o_m) * s_ic, in_s_ptr, s_ib,
                  (i_g * CIN_G + o_m) * s_ic, bs, m_m, IN_SCALE, False, True, ACC)
    _store(dx_ptr + (i_g * CIN_G).to(tl.int64) * s_dc, bs, B, s_db, o_m, m_m, o_px, m_q, s_dc,
           s_dw, accs)


# The kernel gradient's longest chain of tensor-core dots into one float32 accumulator
# (dense_bwd_w_kernel): tensor cores do not round their float32 sums to nearest, and over a
# single chain of millions of dots (one example of 2.7e8 pixels) G drifts toward zero by tens
# of percent; longer sums are added in chunks of CHAIN tiles on the CUDA cores.
CHAIN = tl.constexpr(64)


@triton.jit
def _g_tile(p_x0, p_g0, p0, L, WO, H, W, o_co, m_co, o_ci, o_t, m_k, s_xc, s_xh, s_xw, s_gc,
            s_gh, s_gw, STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, KW: tl.constexpr,
            POINTWISE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_P: tl.constexpr):
    """One example's grad_out tile (channels o_co) times its input patches (columns o_ci, o_t)
    over the pixels p0 ... p0 + BLOCK_P of its L output pixels: a (BLOCK_CO x BLOCK_K) tile of
    G_b's sum, one dot. POINTWISE (1x1, stride 1, unpadded, the rows of x and grad_out at one
    stride): output pixel p reads input pixel p, both addressed as p times the pixel stride,
    without dividing p into a row and a column (a third of the loop's instructions)."""
    o_p = p0 + tl.arange(0, BLOCK_P)
    m_p = o_p < L
    if POINTWISE:
        p_g = (p_g0 + o_co[:, None].to(tl.int64) * s_gc + o_p[None, :].to(tl.int64) * s_gw)
        m_x = m_p[:, None] & m_k[None, :]
        p_x = p_x0 + o_ci[None, :].to(tl.int64) * s_xc + o_p[:, None].to(tl.int64) * s_xw
    else:
        o_oh, o_ow = o_p // WO, o_p % WO
        p_g = (p_g0 + o_co[:, None].to(tl.int64) * s_gc
               + o_oh[None, :].to(tl.int64) * s_gh + o_ow[None, :].to(tl.int64) * s_gw)
        o_ih = o_oh[:, None] * STRIDE_H - PAD_T + (o_t // KW)[None, :] * DIL_H
        o_iw = o_ow[:, None] * STRIDE_W - PAD_L + (o_t % KW)[None, :] * DIL_W
        m_x = m_p[:, None] & m_k[None, :] & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0) & (o_iw < W)
        p_x = (p_x0 + o_ci[None, :].to(tl.int64) * s_xc + o_ih.to(tl.int64) * s_xh
               + o_iw.to(tl.int64) * s_xw)
    b_g = tl.load(p_g, mask=m_co[:, None] & m_p[None, :], other=0.0)
    b_x = tl.load(p_x, mask=m_x, other=0.0)
    return tl.dot(b_g, b_x, input_precision=PRECISION, out_dtype=ACC)


@autotune(key=["B_KEY", "COUT_G", "KEY_K", "KEY_L", "E", "KH", "KW", "NEED_W", "NEED_R",
               "SCALE_GRADS", "POINTWISE", "TAP_MAJOR", *SCALE_FLAGS], shapes=KGRAD_TILES,
          reset_to_zero=("qc_ptr", "qk_ptr"))
@triton.jit
def dense_bwd_w_kernel(
    x_ptr, g_ptr, r_ptr, w_ptr, in_s_ptr, out_s_ptr, tap_s_ptr, gw_ptr, part_ptr, qc_ptr, qk_ptr,
    B, CIN_G, COUT_G, GROUPS, H, W, HO, WO, B_PER_SPLIT,
    s_xb, s_xc, s_xh, s_xw, s_gb, s_gc, s_gh, s_gw, s_rb, s_re,
    s_ib, s_ic, s_jb, s_jc, s_tb, s_tt,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, B_KEY, KEY_K, KEY_L: tl.constexpr,
    E: tl.constexpr, E_POW2: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    NEED_W: tl.constexpr, NEED_R: tl.constexpr, IN_SCALE: tl.constexpr,
    OUT_SCALE: tl.constexpr, TAP_SCALE: tl.constexpr, SCALE_GRADS: tl.constexpr,
    POINTWISE: tl.constexpr, TAP_MAJOR: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """gw[split, e, tile] = sum over the split's examples b of routing[b, e] G_b[tile], and
    part[tile, b, e] = <G_b, W[e]>[tile]. G_b's tile is one dot over the pixels; the E
    experts' gradients of the tile stay in registers (E_POW2 x BLOCK_CO x BLOCK_K, float32)
    across the examples and are written once at the end, and the E expert tiles for
    grad_routing are loaded once: no per-example read-modify-write of global memory.

    With per-example scales (s_b = out_scale x in_scale x tap_scale over the tile, strides as in
    the forward) the folds take s_b G_b, and where SCALE_GRADS, with Q_b = G_b M_b (M_b the
    example's mixed tile), the program writes the tile's share of the scales' gradients:
    qc[i_k, b, co] = sum over the tile's k of Q_b in_scale tap_scale (out_scale's),
    qk[i_co, b, g, k] = sum over its co of Q_b out_scale (in_scale's and tap_scale's, once
    multiplied by the other and summed on the host).

    The reduction index k (W's columns) runs over (input channel, tap), or with TAP_MAJOR over
    (tap, input channel): x channels_last, so that the x tile is contiguous along a tap's
    channels; w_ptr then holds W in that order, and gw and qk come out in it (the launcher puts
    them back). POINTWISE: see _g_tile."""
    K = CIN_G * KH * KW
    n_k, n_co = tl.cdiv(K, BLOCK_K), tl.cdiv(COUT_G, BLOCK_CO)
    i_k, i_co, i_gs = program_ids(n_k, n_co)
    i_g, i_s = i_gs % GROUPS, i_gs // GROUPS
    N = COUT_G * GROUPS * K
    L = HO * WO
    o_co = i_g * COUT_G + i_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    m_co = i_co * BLOCK_CO + tl.arange(0, BLOCK_CO) < COUT_G
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < K
    if TAP_MAJOR:  # K runs over (tap, channel): W, gw and qk in that order too
        o_t, o_ci = o_k // CIN_G, o_k % CIN_G
    else:
        o_ci, o_t = o_k // (KH * KW), o_k % (KH * KW)
    o_e = tl.arange(0, E_POW2)
    m_e = o_e < E
    m_tile = m_e[:, None, None] & (m_co[:, None] & m_k[None, :])[None, :, :]
    o_tile = (o_e[:, None, None].to(tl.int64) * N
              + (o_co[:, None].to(tl.int64) * K + o_k[None, :])[None, :, :])
    tile = (i_g * n_co + i_co) * n_k + i_k
    if NEED_R or SCALE_GRADS:  # every expert's tile, loaded once
        b_w = tl.load(w_ptr + o_tile, mask=m_tile, other=0.0)
        # Zeros derived from b_w (0 where masked, and in the mask): the gradients' tiles then
        # keep b_w's layout, and an example's G_b is converted from the dot's layout once for
        # both folds, not once for each.
        b_gw = tl.where(m_tile, 0.0, b_w.to(ACC))
    else:
        b_gw = tl.zeros((E_POW2, BLOCK_CO, BLOCK_K), dtype=ACC)

    # An example of at most CHAIN tiles of pixels (KEY_L <= CHAIN x BLOCK_P) is walked a tile
    # an iteration of a single loop over (example, tile), which Triton pipelines: the next
    # tiles are copied while one is multiplied or an example folded. Nested loops would restart
    # the pipeline at every example and wait for its first loads (a 7x7 example is one tile).
    FLAT: tl.constexpr = KEY_L <= CHAIN * BLOCK_P
    # One iteration an example: one tile, or its pixels in nested loops.
    AN_EXAMPLE: tl.constexpr = not (FLAT and KEY_L > BLOCK_P)
    if AN_EXAMPLE:
        TILES = 1
    else:
        TILES = tl.cdiv(L, BLOCK_P)
    b_G = tl.zeros((BLOCK_CO, BLOCK_K), dtype=ACC)
    b_lo = i_s * B_PER_SPLIT  # the slice's examples (its iterations < 2**31: _splits)
    b = b_lo
    t = 0  # (example, tile) counted along, not divided out of the iteration
    for it in range(0, (tl.minimum(B, b_lo + B_PER_SPLIT) - b_lo) * TILES):
        if AN_EXAMPLE:
            b = b_lo + it
        p_x0 = x_ptr + tl.cast(b, tl.int64) * s_xb + (i_g * CIN_G).to(tl.int64) * s_xc
        p_g0 = g_ptr + tl.cast(b, tl.int64) * s_gb
        if FLAT:
            b_G += _g_tile(p_x0, p_g0, t * BLOCK_P, L, WO, H, W, o_co, m_co, o_ci, o_t, m_k,
                           s_xc, s_xh, s_xw, s_gc, s_gh, s_gw, STRIDE_H, STRIDE_W, PAD_T, PAD_L,
                           DIL_H, DIL_W, KW, POINTWISE, ACC, PRECISION, BLOCK_P)
        else:
            # Two levels of sums: chains of CHAIN dots on the tensor cores, added on the CUDA
            # cores.
            CHUNK_P: tl.constexpr = CHAIN * BLOCK_P
            for c0 in range(0, L, CHUNK_P):
                b_C = tl.zeros((BLOCK_CO, BLOCK_K), dtype=ACC)
                for p0 in range(c0, c0 + tl.minimum(L - c0, CHUNK_P), BLOCK_P):
                    b_C += _g_tile(p_x0, p_g0, p0, L, WO, H, W, o_co, m_co, o_ci, o_t, m_k,
                                   s_xc, s_xh, s_xw, s_gc, s_gh, s_gw, STRIDE_H, STRIDE_W,
                                   PAD_T, PAD_L, DIL_H, DIL_W, KW, POINTWISE, ACC, PRECISION,
                                   BLOCK_P)
                b_G += b_C
        if t == TILES - 1:  # the example's last tile: fold its G_b
            b_r = tl.load(r_ptr + tl.cast(b, tl.int64) * s_rb + o_e * s_re, mask=m_e,
                          other=0.0).to(ACC)
            if IN_SCALE or OUT_SCALE or TAP_SCALE:
                if SCALE_GRADS:
                    b_Q = b_G * tl.sum(b_r[:, None, None] * b_w.to(ACC), axis=0)
                    b_Qc = b_Q  # Q_b times out_scale: in_scale's and tap_scale's share
                    b_Qk = b_Q  # Q_b times in_scale and tap_scale: out_scale's share
                if OUT_SCALE:
                    f_c = scale_factor(out_s_ptr, s_jb, o_co * s_jc, out_s_ptr, s_jb,
                                       o_co * s_jc, b, m_co, True, False, ACC)
                    if SCALE_GRADS:
                        b_Qc = b_Q * f_c[:, None]
                    b_G = b_G * f_c[:, None]
                if IN_SCALE or TAP_SCALE:
                    f_k = scale_factor(in_s_ptr, s_ib, (i_g * CIN_G + o_ci) * s_ic, tap_s_ptr,
                                       s_tb, o_t * s_tt, b, m_k, IN_SCALE, TAP_SCALE, ACC)
                    b_G = b_G * f_k[None, :]
                    if SCALE_GRADS:
                        b_Qk = b_Q * f_k[None, :]
                        tl.store(qk_ptr + ((i_co.to(tl.int64) * B + b) * GROUPS + i_g) * K + o_k,
                                 tl.sum(b_Qc, axis=0), mask=m_k)
                if OUT_SCALE and SCALE_GRADS:
                    tl.store(qc_ptr + (i_k.to(tl.int64) * B + b) * (COUT_G * GROUPS) + o_co,
                             tl.sum(b_Qk, axis=1), mask=m_co)
            if NEED_R:
                # Over the tile's columns, then its rows. Not one reduction over the tile
                # reshaped to (E_POW2, BLOCK_CO * BLOCK_K): Triton 3.6 lowers that one to warp
                # shuffles over the wrong lanes where the lanes it sums are not the lowest
                # (16-bit W tiles of 16 columns at 8 experts, most tiles at 2 or 4), adding
                # each expert's sum into its neighbour's (the third GPU run's grad_routing
                # failure; read off the compiled code: tests/test_triton_compile.py).
                b_part = tl.sum(tl.sum(b_w.to(ACC) * b_G[None, :, :], axis=2), axis=1)
                tl.store(part_ptr + (tile.to(tl.int64) * B + b) * E + o_e, b_part, mask=m_e)
            if NEED_W:
                b_gw += b_r[:, None, None] * b_G[None, :, :]
            b_G = tl.zeros((BLOCK_CO, BLOCK_K), dtype=ACC)
        if not AN_EXAMPLE:  # (selects, not a branch: Triton pipelines the loop only so)
            b = tl.where(t == TILES - 1, b + 1, b)
            t = tl.where(t == TILES - 1, 0, t + 1)
    if NEED_W:
        tl.store(gw_ptr + (i_s * E).to(tl.int64) * N + o_tile, b_gw, mask=m_tile)


# The sum kernel's tiles: elements of the expert gradients a program sums over the slices, and
# (rows, columns) of grad_routing's partial sums a program adds per iteration.
SUM_BLOCK_W = tl.constexpr(1024)
SUM_BLOCK_R = tl.constexpr(32)
SUM_BLOCK_C = tl.constexpr(128)


@untuned(num_warps=4)
@triton.jit
def dense_kgrad_sum_kernel(
    gw_ptr, part_ptr, dw_ptr, dr_ptr, S, EN, N_W, ROWS, BE, CIN_G, TAPS,
    NEED_W: tl.constexpr, NEED_R: tl.constexpr, TAP_MAJOR: tl.constexpr,
):
    """The kernel gradient's last step, one launch for both sums (dense_bwd_w_kernel's outputs):
    grad_weight[e, n] = sum over the S slices of gw[s, e, n], in grad_weight's dtype and W's
    order (with TAP_MAJOR gw's K runs over (tap, channel): put back to (channel, tap)), and
    grad_routing[b, e] = sum over the first ROWS rows of part[row, b, e] (the rows the launched
    configuration's tiles wrote; those past them are never read, so part needs no fill).
    EN = E x Cout x K elements of gw per slice, BE = B x E partials per row. The first N_W =
    cdiv(EN, SUM_BLOCK_W) programs (where NEED_W, else 0; from the host, which counts past
    2^31) sum gw, the rest part; every sum in a fixed order (deterministic)."""
    pid = tl.program_id(0)
    n_w = N_W
    if pid < n_w:
        o = pid.to(tl.int64) * SUM_BLOCK_W + tl.arange(0, SUM_BLOCK_W)
        m = o < EN
        acc = tl.load(gw_ptr + o, mask=m, other=0.0)
        for s in range(1, S):
            acc += tl.load(gw_ptr + tl.cast(s, tl.int64) * EN + o, mask=m, other=0.0)
        if TAP_MAJOR:  # n = (e, co, tap, ci) -> (e, co, ci, tap)
            K = CIN_G * TAPS
            k = o % K
            o = o - k + (k % CIN_G) * TAPS + k // CIN_G
        tl.store(dw_ptr + o, acc.to(dw_ptr.dtype.element_ty), mask=m)
    elif NEED_R:
        o_c = (pid - n_w).to(tl.int64) * SUM_BLOCK_C + tl.arange(0, SUM_BLOCK_C)
        m_c = o_c < BE
        rows = tl.zeros((SUM_BLOCK_R, SUM_BLOCK_C), dtype=dr_ptr.dtype.element_ty)
        for r0 in range(0, ROWS, SUM_BLOCK_R):
            o_r = r0 + tl.arange(0, SUM_BLOCK_R)
            rows += tl.load(part_ptr + o_r.to(tl.int64)[:, None] * BE + o_c[None, :],
                            mask=(o_r < ROWS)[:, None] & m_c[None, :], other=0.0)
        tl.store(dr_ptr + o_c, tl.sum(rows, axis=0), mask=m_c)
