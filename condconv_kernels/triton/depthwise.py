"""Depthwise CondConv (Cin/groups == 1, any channel multiplier) in Triton: direct convolution
on CUDA cores, each input element loaded and converted once per row of taps.

Forward: a program owns BLOCK_C output channels x BLOCK_Q groups of COLS output pixels side by
side in a row, of EXAMPLES examples (one after another). It first mixes its channels' kh x kw
taps over the E experts once for its examples (each expert's taps loaded once, times each
example's routing) and stores them in a buffer of mixed taps (float32, channels contiguous),
from which each row of taps reads its taps back in the layout the accumulators need. Then,
example by example, per row of taps it loads each input column the group reaches once
and adds it, times the tap that joins them, into every output column that reads it (COLS
accumulators); the loop over the rows of taps waits for each row's loads, or with ROW_STAGES >
1 Triton copies them asynchronously that many rows ahead (shared memory; the tuner times both).
The per-example scales, where present: tap_scale multiplies each mixed tap,
in_scale (per input channel) and out_scale (per output channel, after the bias) the
accumulator. Offsets within an example are 32-bit where the example's extent allows (WIDE
otherwise).
Backward: grad_x likewise over groups of input pixels (each grad_out column they reach loaded
once a row of taps; at stride 2 an input column takes only the taps of its parity); the kernel
gradient in two steps: a program per (example, channel tile) computes the example's tap
gradients G[b, c, t] = sum over pixels of grad_out * shifted x, then two matrix products on the
host give grad_weight = routing^T G and grad_routing = G W^T over the whole batch (no atomics:
deterministic); with scales, the host's epilogue also gives their gradients from G (small: B x
C x taps).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import DW_KGRAD_TILES, DW_TILES, SCALE_FLAGS, autotune
from ._grid import program_ids
from ._scales import scale_factor


@triton.jit
def _routing(r_ptr, b, s_rb, s_re, E: tl.constexpr, E_POW2: tl.constexpr, ACC: tl.constexpr):
    """Example b's routing weights as a vector of E_POW2 (zeros past E)."""
    o_e = tl.arange(0, E_POW2)
    return tl.load(r_ptr + tl.cast(b, tl.int64) * s_rb + o_e * s_re, mask=o_e < E,
                   other=0.0).to(ACC)


@triton.jit
def _mixed_taps(r, w_ptr, o_w, m_w, N, E: tl.constexpr, E_POW2: tl.constexpr,
                ACC: tl.constexpr):
    """sum_e r[e] * w[e * N + o_w] for a vector of taps: the E experts' values in one 2-D load
    (their latencies overlap), then a sum over the experts."""
    o_e = tl.arange(0, E_POW2)
    w = tl.load(w_ptr + o_e[:, None] * N + o_w[None, :], mask=(o_e < E)[:, None] & m_w[None, :],
                other=0.0).to(ACC)
    return tl.sum(r[:, None] * w, axis=0)


@triton.jit
def _stage_taps(r_ptr, w_ptr, tap_s_ptr, out_s_ptr, T_ptr, b0, B, o_c, m_c, C, s_rb, s_re,
                s_tb, s_tt, s_jb, s_jc, E: tl.constexpr, KK: tl.constexpr,
                KK_POW2: tl.constexpr, TAP_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr,
                ACC: tl.constexpr, EXAMPLES: tl.constexpr):
    """The mixed taps of the channels o_c for the examples [b0, b0 + EXAMPLES) below B,
    sum_e r[b, e] w[e, c, t] (times tap_scale[b, t] and out_scale[b, c] where given), stored in
    T[b, t, c] (T: (B, KK, C) in ACC, channels contiguous), then a barrier: the tap loop reads
    a tap's vector of channels back in the layout its accumulator rows need (each thread its
    own channels, no conversion), where the mix of one tap at a time cost a conversion through
    shared memory (two barriers) and a sum across lanes per tap. Each expert's taps are loaded
    once for the block's examples. Programs of the same (examples, channels) store the same
    values."""
    o_t = tl.arange(0, KK_POW2)
    m_tc = (o_t < KK)[:, None] & m_c[None, :]
    o_w = o_c[None, :] * KK + o_t[:, None]
    mixes = (tl.zeros((KK_POW2, o_c.shape[0]), dtype=ACC),) * EXAMPLES
    for e in tl.static_range(E):
        w_e = tl.load(w_ptr + e * C * KK + o_w, mask=m_tc, other=0.0).to(ACC)
        for j in tl.static_range(EXAMPLES):
            bb = tl.cast(b0 + j, tl.int64)
            r_e = tl.load(r_ptr + bb * s_rb + e * s_re, mask=b0 + j < B, other=0.0).to(ACC)
            mixes = _add_at(mixes, j, r_e * w_e)
    for j in tl.static_range(EXAMPLES):
        b = b0 + j
        bb = tl.cast(b, tl.int64)
        mix = mixes[j]
        if TAP_SCALE:
            mix *= tl.load(tap_s_ptr + bb * s_tb + o_t * s_tt, mask=(o_t < KK) & (b < B),
                           other=0.0).to(ACC)[:, None]
        if OUT_SCALE:
            mix *= scale_factor(out_s_ptr, s_jb, o_c * s_jc, out_s_ptr, s_jb, 0, b,
                                m_c & (b < B), True, False, ACC)[None, :]
        tl.store(T_ptr + bb * (KK * C) + o_t[:, None] * C + o_c[None, :], mix,
                 mask=m_tc & (b < B))
    tl.debug_barrier()


@triton.constexpr_function
def _tap_of(k, u, stride, dilation, taps):
    """The tap through which output column u of a group reads the group's input column k
    (both counted from the group's first), -1 if it does not read it."""
    d = k - u * stride
    return d // dilation if d >= 0 and d % dilation == 0 and d // dilation < taps else -1


@triton.constexpr_function
def _first_reader(k, cols, stride, dilation, taps):
    """The first of a group's ``cols`` output columns that reads its input column k (``cols``
    if none does)."""
    return next((u for u in range(cols) if _tap_of(k, u, stride, dilation, taps) >= 0), cols)


@triton.jit
def _add_at(t, i: tl.constexpr, v):
    """The tuple of tensors t with v added to its entry i (a compile-time index)."""
    return t[:i] + (t[i] + v,) + t[i + 1:]


@triton.jit
def _store_columns(p, acc, f, shift, o_c, m_c, s_c, o_h, s_h, o_w, s_w, width, m_q,
                   IDX: tl.constexpr):
    """Stores a group's accumulators (the tuple acc: pixel (o_h, o_w + u) in acc[u], channels
    o_c), each times f plus shift (per channel), past ``width`` masked."""
    p = p + o_c[:, None].to(IDX) * s_c
    for u in tl.static_range(len(acc)):
        off = o_h.to(IDX) * s_h + (o_w + u).to(IDX) * s_w
        tl.store(p + off[None, :], (acc[u] * f[:, None] + shift[:, None]).to(p.dtype.element_ty),
                 mask=m_c[:, None] & (m_q & (o_w + u < width))[None, :])


@triton.jit
def _fwd_example(x_ptr, r_ptr, bias_ptr, in_s_ptr, out_s_ptr, T_ptr, out_ptr, i_b, C_OUT, MULT,
                 H, W, WO, s_xb, s_xc, s_xh, s_xw, s_rb, s_re, s_ob, s_oc, s_oh, s_ow, s_ib,
                 s_ic, s_jb, s_jc, STRIDE_H, STRIDE_W: tl.constexpr, PAD_T, DIL_H,
                 DIL_W: tl.constexpr, E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                 HAS_BIAS: tl.constexpr, IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr,
                 IDX: tl.constexpr, ACC: tl.constexpr, E_POW2: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, COLS: tl.constexpr,
                 NCOLS: tl.constexpr, ROW_STAGES: tl.constexpr, o_c, m_c, m_q, o_oh, o_ow,
                 o_iw0, off_c):
    """dw_fwd_kernel's work for example i_b: its row loop and epilogue."""
    p_x = x_ptr + tl.cast(i_b, tl.int64) * s_xb
    p_T = T_ptr + tl.cast(i_b, tl.int64) * (KH * KW * C_OUT) + o_c
    acc = (tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC),) * COLS
    # rows of taps in a loop (pipelined where ROW_STAGES > 1), a row's columns unrolled
    for i in tl.range(0, KH, num_stages=ROW_STAGES):
        o_ih = o_oh * STRIDE_H - PAD_T + i * DIL_H
        m_h = m_q & (o_ih >= 0) & (o_ih < H)
        off_h = off_c[:, None] + (o_ih.to(IDX) * s_xh)[None, :]
        taps = ()
        for j in tl.static_range(KW):
            taps = taps + (tl.load(p_T + (i * KW + j) * C_OUT, mask=m_c,
                                   other=0.0)[:, None],)
        for k in tl.static_range(NCOLS):  # input column o_iw0 + k
            o_iw = o_iw0 + k
            m_x = m_h & (o_iw >= 0) & (o_iw < W)
            b_x = tl.load(p_x + off_h + (o_iw.to(IDX) * s_xw)[None, :],
                          mask=m_c[:, None] & m_x[None, :], other=0.0).to(ACC)
            for u in tl.static_range(COLS):  # output column o_ow + u reads it via a tap
                if _tap_of(k, u, STRIDE_W, DIL_W, KW) >= 0:
                    acc = _add_at(acc, u, taps[_tap_of(k, u, STRIDE_W, DIL_W, KW)] * b_x)
    # the epilogue as one affine map: (acc in_scale + bias) out_scale
    f = tl.full((BLOCK_C,), 1.0, ACC)
    shift = tl.zeros((BLOCK_C,), ACC)
    if IN_SCALE:
        f *= scale_factor(in_s_ptr, s_ib, (o_c // MULT) * s_ic, in_s_ptr, s_ib, 0, i_b,
                          m_c, True, False, ACC)
    if HAS_BIAS:
        shift = _mixed_taps(_routing(r_ptr, i_b, s_rb, s_re, E, E_POW2, ACC), bias_ptr,
                            o_c, m_c, C_OUT, E, E_POW2, ACC)
    if OUT_SCALE:
        f_out = scale_factor(out_s_ptr, s_jb, o_c * s_jc, out_s_ptr, s_jb, 0, i_b, m_c,
                             True, False, ACC)
        f *= f_out
        shift *= f_out
    _store_columns(out_ptr + tl.cast(i_b, tl.int64) * s_ob, acc, f, shift, o_c, m_c, s_oc, o_oh,
                   s_oh, o_ow, s_ow, WO, m_q, IDX)


# (s_xc, s_gc: the layout, 1 where channels_last, which the pruning reads: _prune_depthwise)
@autotune(key=["B_KEY", "C_OUT", "KEY_L", "E", "KH", "KW", "STRIDE_W", "DIL_W", "s_xc",
               *SCALE_FLAGS],
          shapes=DW_TILES)
@triton.jit
def dw_fwd_kernel(
    x_ptr, r_ptr, w_ptr, bias_ptr, in_s_ptr, out_s_ptr, tap_s_ptr, T_ptr, out_ptr,
    B, C_OUT, MULT, H, W, HO, WO,
    s_xb, s_xc, s_xh, s_xw, s_rb, s_re, s_ob, s_oc, s_oh, s_ow, s_ib, s_ic, s_jb, s_jc, s_tb,
    s_tt, STRIDE_H, STRIDE_W: tl.constexpr, PAD_T, PAD_L, DIL_H, DIL_W: tl.constexpr, B_KEY,
    KEY_L, E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, TAP_SCALE: tl.constexpr,
    WIDE: tl.constexpr, ACC: tl.constexpr, E_POW2: tl.constexpr, KK_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, COLS: tl.constexpr, EXAMPLES: tl.constexpr,
    ROW_STAGES: tl.constexpr = 1,
):
    """out[b, c, oh, ow] for BLOCK_C channels x BLOCK_Q groups of COLS output pixels side by
    side in a row (a group: COLS accumulators) of each of EXAMPLES examples in turn. Per row of
    taps the group's input columns, (COLS - 1) STRIDE_W + (KW - 1) DIL_W + 1 of them, are
    loaded and converted once each and every one serves each (output column, tap) pair that
    reads it: at 7 columns and 5 taps, 11 loads for 35 products, where a tap-by-tap loop
    reloads the shifted tile for each. The taps come from T (_stage_taps), mixed once per
    program for its examples (each expert's taps loaded once for all of them). Offsets within
    an example are 32-bit unless WIDE; the scales and the bias as in the module's docstring."""
    GW = tl.cdiv(WO, COLS)  # groups a row
    i_q, i_c, i_bb = program_ids(tl.cdiv(HO * GW, BLOCK_Q), tl.cdiv(C_OUT, BLOCK_C))
    IDX: tl.constexpr = tl.int64 if WIDE else tl.int32
    NCOLS: tl.constexpr = (COLS - 1) * STRIDE_W + (KW - 1) * DIL_W + 1
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C_OUT
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < HO * GW
    o_oh, o_ow = o_q // GW, (o_q % GW) * COLS  # the group's row and first column
    o_iw0 = o_ow * STRIDE_W - PAD_L
    off_c = (o_c // MULT).to(IDX) * s_xc
    b0 = i_bb * EXAMPLES
    _stage_taps(r_ptr, w_ptr, tap_s_ptr, out_s_ptr, T_ptr, b0, B, o_c, m_c, C_OUT, s_rb, s_re,
                s_tb, s_tt, s_jb, s_jc, E, KH * KW, KK_POW2, TAP_SCALE, False, ACC, EXAMPLES)
    if EXAMPLES == 1:  # no loop: a runtime loop around the example took ~50 more registers
        _fwd_example(x_ptr, r_ptr, bias_ptr, in_s_ptr, out_s_ptr, T_ptr, out_ptr, b0, C_OUT,
                     MULT, H, W, WO, s_xb, s_xc, s_xh, s_xw, s_rb, s_re, s_ob, s_oc, s_oh, s_ow,
                     s_ib, s_ic, s_jb, s_jc, STRIDE_H, STRIDE_W, PAD_T, DIL_H, DIL_W, E, KH, KW,
                     HAS_BIAS, IN_SCALE, OUT_SCALE, IDX, ACC, E_POW2, BLOCK_C, BLOCK_Q, COLS,
                     NCOLS, ROW_STAGES, o_c, m_c, m_q, o_oh, o_ow, o_iw0, off_c)
    else:
        for i_b in range(b0, tl.minimum(b0 + EXAMPLES, B)):
            _fwd_example(x_ptr, r_ptr, bias_ptr, in_s_ptr, out_s_ptr, T_ptr, out_ptr, i_b,
                         C_OUT, MULT, H, W, WO, s_xb, s_xc, s_xh, s_xw, s_rb, s_re, s_ob, s_oc,
                         s_oh, s_ow, s_ib, s_ic, s_jb, s_jc, STRIDE_H, STRIDE_W, PAD_T, DIL_H,
                         DIL_W, E, KH, KW, HAS_BIAS, IN_SCALE, OUT_SCALE, IDX, ACC, E_POW2,
                         BLOCK_C, BLOCK_Q, COLS, NCOLS, ROW_STAGES, o_c, m_c, m_q, o_oh, o_ow,
                         o_iw0, off_c)


@triton.jit
def _bwd_x_example(g_ptr, in_s_ptr, T_ptr, dx_ptr, i_b, C_IN, MULT, W, HO, WO, s_gb, s_gc,
                   s_gh, s_gw, s_db, s_dc, s_dh, s_dw, s_ib, s_ic, STRIDE_H: tl.constexpr,
                   STRIDE_W: tl.constexpr, PAD_T, PAD_L: tl.constexpr, DIL_H,
                   DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   IN_SCALE: tl.constexpr, IDX: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, U: tl.constexpr,
                   K0: tl.constexpr, K1: tl.constexpr, ROW_STAGES: tl.constexpr, o_ci, m_c,
                   m_q, o_ih, o_iw, o_ow0):
    """dw_bwd_x_kernel's work for example i_b: its loops and epilogue."""
    p_g = g_ptr + tl.cast(i_b, tl.int64) * s_gb
    acc = (tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC),) * U
    for m in range(MULT):
        o_co = o_ci * MULT + m
        off_c = o_co.to(IDX) * s_gc
        p_T = T_ptr + tl.cast(i_b, tl.int64) * (KH * KW * C_IN * MULT) + o_co
        # as in the forward: rows in a loop (pipelined where ROW_STAGES > 1), a row's
        # columns unrolled
        for i in tl.range(0, KH, num_stages=ROW_STAGES):
            o_nh = o_ih + PAD_T - i * DIL_H
            o_oh = o_nh // STRIDE_H
            m_h = m_q & (o_nh >= 0) & (o_nh % STRIDE_H == 0) & (o_oh < HO)
            off_h = off_c[:, None] + (o_oh.to(IDX) * s_gh)[None, :]
            taps = ()
            for j in tl.static_range(KW):
                taps = taps + (tl.load(p_T + (i * KW + j) * C_IN * MULT, mask=m_c,
                                       other=0.0)[:, None],)
            for k in tl.static_range(K0, K1 + 1):
                o_ow = o_ow0 + k
                m_g = m_h & (o_ow >= 0) & (o_ow < WO)
                b_g = tl.load(p_g + off_h + (o_ow.to(IDX) * s_gw)[None, :],
                              mask=m_c[:, None] & m_g[None, :], other=0.0).to(ACC)
                for u in tl.static_range(U):  # input column o_iw + u, through tap j
                    for j in tl.static_range(KW):
                        if (u + PAD_L - j * DIL_W) % STRIDE_W == 0:
                            if (u + PAD_L - j * DIL_W) // STRIDE_W == k:
                                acc = _add_at(acc, u, taps[j] * b_g)
    f = tl.full((BLOCK_C,), 1.0, ACC)
    if IN_SCALE:
        f *= scale_factor(in_s_ptr, s_ib, o_ci * s_ic, in_s_ptr, s_ib, 0, i_b, m_c, True,
                          False, ACC)
    _store_columns(dx_ptr + tl.cast(i_b, tl.int64) * s_db, acc, f, tl.zeros((BLOCK_C,), ACC),
                   o_ci, m_c, s_dc, o_ih, s_dh, o_iw, s_dw, W, m_q, IDX)


@autotune(key=["B_KEY", "C_IN", "KEY_L", "E", "KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_L",
               "DIL_W", "s_gc", *SCALE_FLAGS],
          shapes=DW_TILES)
@triton.jit
def dw_bwd_x_kernel(
    g_ptr, r_ptr, w_ptr, in_s_ptr, out_s_ptr, tap_s_ptr, T_ptr, dx_ptr,
    B, C_IN, MULT, H, W, HO, WO,
    s_gb, s_gc, s_gh, s_gw, s_rb, s_re, s_db, s_dc, s_dh, s_dw, s_ib, s_ic, s_jb, s_jc, s_tb,
    s_tt, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_T, PAD_L: tl.constexpr, DIL_H,
    DIL_W: tl.constexpr, B_KEY, KEY_L, E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, TAP_SCALE: tl.constexpr,
    WIDE: tl.constexpr, ACC: tl.constexpr, KK_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, COLS: tl.constexpr, EXAMPLES: tl.constexpr,
    ROW_STAGES: tl.constexpr = 1,
):
    """grad_x[b, ci, ih, iw] = sum over the channel multiplier m and taps of the mixed tap
    times grad_out at the output pixel the (input pixel, tap) fed, for BLOCK_C input channels x
    BLOCK_Q groups of COLS x STRIDE_W input pixels side by side in a row (the first a multiple
    of the stride) of each of EXAMPLES examples in turn (their taps mixed first, each expert's
    loaded once for all of them); the scales as in the forward (out_scale and tap_scale
    folded into the staged taps, in_scale on the accumulator).

    As in the forward, per row of taps each grad_out column the group reaches is loaded once
    and serves every (input column, tap) pair that reads it. The strides, the left padding and
    the column dilation are compile-time constants, so which taps reach which input column is
    known to the compiler: at stride 2 an input column takes only the taps of its parity (the
    others are never issued), and no offset is divided at run time. Rows: a runtime loop, an
    input row taking the rows of taps whose output row is whole."""
    U: tl.constexpr = COLS * STRIDE_W  # input columns a group
    # grad_out columns o_ow0 + k, k in [K0, K1], that a group's input columns reach
    K0: tl.constexpr = (PAD_L - (KW - 1) * DIL_W) // STRIDE_W
    K1: tl.constexpr = (U - 1 + PAD_L) // STRIDE_W
    GW = tl.cdiv(W, U)
    i_q, i_c, i_bb = program_ids(tl.cdiv(H * GW, BLOCK_Q), tl.cdiv(C_IN, BLOCK_C))
    IDX: tl.constexpr = tl.int64 if WIDE else tl.int32
    o_ci = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_ci < C_IN
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < H * GW
    o_ih, o_iw = o_q // GW, (o_q % GW) * U
    o_ow0 = o_iw // STRIDE_W
    b0 = i_bb * EXAMPLES
    for m in range(MULT):
        _stage_taps(r_ptr, w_ptr, tap_s_ptr, out_s_ptr, T_ptr, b0, B, o_ci * MULT + m, m_c,
                    C_IN * MULT, s_rb, s_re, s_tb, s_tt, s_jb, s_jc, E, KH * KW, KK_POW2,
                    TAP_SCALE, OUT_SCALE, ACC, EXAMPLES)
    if EXAMPLES == 1:  # no loop: a runtime loop around the example took ~50 more registers
        _bwd_x_example(g_ptr, in_s_ptr, T_ptr, dx_ptr, b0, C_IN, MULT, W, HO, WO, s_gb, s_gc,
                       s_gh, s_gw, s_db, s_dc, s_dh, s_dw, s_ib, s_ic, STRIDE_H, STRIDE_W,
                       PAD_T, PAD_L, DIL_H, DIL_W, KH, KW, IN_SCALE, IDX, ACC, BLOCK_C,
                       BLOCK_Q, U, K0, K1, ROW_STAGES, o_ci, m_c, m_q, o_ih, o_iw, o_ow0)
    else:
        for i_b in range(b0, tl.minimum(b0 + EXAMPLES, B)):
            _bwd_x_example(g_ptr, in_s_ptr, T_ptr, dx_ptr, i_b, C_IN, MULT, W, HO, WO, s_gb,
                           s_gc, s_gh, s_gw, s_db, s_dc, s_dh, s_dw, s_ib, s_ic, STRIDE_H,
                           STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, KH, KW, IN_SCALE, IDX, ACC,
                           BLOCK_C, BLOCK_Q, U, K0, K1, ROW_STAGES, o_ci, m_c, m_q, o_ih,
                           o_iw, o_ow0)


@autotune(key=["B_KEY", "C_OUT", "KEY_L", "KH", "KW", "STRIDE_W", "DIL_W"],
          shapes=DW_KGRAD_TILES)
@triton.jit
def dw_bwd_w_kernel(
    x_ptr, g_ptr, G_ptr,
    B, C_OUT, MULT, H, W, HO, WO,
    s_xb, s_xc, s_xh, s_xw, s_gb, s_gc, s_gh, s_gw,
    STRIDE_H, STRIDE_W: tl.constexpr, PAD_T, PAD_L, DIL_H, DIL_W: tl.constexpr, B_KEY, KEY_L,
    KH: tl.constexpr, KW: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, COLS: tl.constexpr,
):
    """G[b, c, t] = sum over the output pixels p of grad_out[b, c, p] times x[b, c // MULT] at
    the input pixel tap t of p reads: example b's kernel gradient for BLOCK_C channels and every
    tap (G is (B, C_OUT, KH * KW), contiguous, in the accumulation dtype). A program per
    (example, channel tile): the grid has B x C_OUT / BLOCK_C programs.

    The program walks its example's output pixels in blocks of BLOCK_L groups of COLS pixels
    side by side in a row, as the forward does. Per block it loads the group's COLS grad_out
    columns once; per row of taps, each input column the group reaches once, multiplied by
    every grad_out column that reads it and added to that tap's accumulator (KH x KW of them,
    a tuple, kept across the blocks). The sums over the pixels, and G's stores, come once, after
    the last block: no partial sums through memory and no barrier between blocks
    (deterministic). The rows of taps are unrolled: a tap's accumulator is a compile-time
    index."""
    GW = tl.cdiv(WO, COLS)  # groups a row
    NCOLS: tl.constexpr = (COLS - 1) * STRIDE_W + (KW - 1) * DIL_W + 1
    i_b, i_c, _ = program_ids(B, tl.cdiv(C_OUT, BLOCK_C))
    IDX: tl.constexpr = tl.int64 if WIDE else tl.int32
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C_OUT
    p_x = x_ptr + tl.cast(i_b, tl.int64) * s_xb
    p_g = g_ptr + tl.cast(i_b, tl.int64) * s_gb
    off_xc = (o_c // MULT).to(IDX) * s_xc
    off_gc = o_c.to(IDX) * s_gc
    acc = (tl.zeros((BLOCK_C, BLOCK_L), dtype=ACC),) * (KH * KW)
    for q0 in range(0, HO * GW, BLOCK_L):
        o_q = q0 + tl.arange(0, BLOCK_L)
        m_q = o_q < HO * GW
        o_oh, o_ow = o_q // GW, (o_q % GW) * COLS
        off_g = off_gc[:, None] + (o_oh.to(IDX) * s_gh)[None, :]
        gs = ()
        for u in tl.static_range(COLS):  # the group's grad_out columns (0 past the row's end)
            m_g = m_q & (o_ow + u < WO)
            gs = gs + (tl.load(p_g + off_g + ((o_ow + u).to(IDX) * s_gw)[None, :],
                               mask=m_c[:, None] & m_g[None, :], other=0.0).to(ACC),)
        o_iw0 = o_ow * STRIDE_W - PAD_L
        for i in tl.static_range(KH):
            o_ih = o_oh * STRIDE_H - PAD_T + i * DIL_H
            m_h = m_q & (o_ih >= 0) & (o_ih < H)
            off_h = off_xc[:, None] + (o_ih.to(IDX) * s_xh)[None, :]
            for k in tl.static_range(NCOLS):  # input column o_iw0 + k
                if _first_reader(k, COLS, STRIDE_W, DIL_W, KW) < COLS:
                    # loaded where an output column of the row reads it: a column that only
                    # the part of a row's last group past WO reaches (its grad_out zeros) is
                    # not, so that a non-finite value there adds no 0 x inf = NaN to G
                    o_iw = o_iw0 + k
                    m_x = (m_h & (o_iw >= 0) & (o_iw < W)
                           & (o_ow + _first_reader(k, COLS, STRIDE_W, DIL_W, KW) < WO))
                    b_x = tl.load(p_x + off_h + (o_iw.to(IDX) * s_xw)[None, :],
                                  mask=m_c[:, None] & m_x[None, :], other=0.0).to(ACC)
                    for u in tl.static_range(COLS):  # output column o_ow + u reads it
                        if _tap_of(k, u, STRIDE_W, DIL_W, KW) >= 0:
                            acc = _add_at(acc, i * KW + _tap_of(k, u, STRIDE_W, DIL_W, KW),
                                          gs[u] * b_x)
    p_G = G_ptr + (tl.cast(i_b, tl.int64) * C_OUT + o_c) * (KH * KW)
    for t in tl.static_range(KH * KW):
        tl.store(p_G + t, tl.sum(acc[t], axis=1), mask=m_c)
