"""Depthwise CondConv (Cin/groups == 1, any channel multiplier) in Triton: direct convolution
with each example's mixed kh x kw taps held in registers.

Forward: a program owns (BLOCK_C output channels x BLOCK_P output pixels) of one example; per
tap it mixes the BLOCK_C taps of the E experts in one (E x BLOCK_C) load and a sum over the
experts (the example's routing loaded once), and accumulates tap * x over the pixels. The
per-example scales, where present: tap_scale multiplies each mixed tap, in_scale (per input
channel) and out_scale (per output channel, after the bias) the accumulator. Offsets
within an example are 32-bit where the example's extent allows (WIDE otherwise), which keeps the
unrolled taps' addresses in few registers.
Backward: grad_x likewise over input pixels (taps from the output pixels they feed); the kernel
gradient in two steps: a program per (example, channel tile) computes the example's tap
gradients G[b, c, t] = sum over pixels of grad_out * shifted x, then two matrix products on the
host give grad_weight = routing^T G and grad_routing = G W^T over the whole batch (no atomics:
deterministic); with scales, the host's epilogue also gives their gradients from G (small: B x
C x taps).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import DW_KGRAD_TILES, SCALE_FLAGS, autotune
from ._grid import program_ids
from ._scales import scale_factor


@triton.jit
def _routing(r_ptr, b, s_rb, s_re, E: tl.constexpr, E_POW2: tl.constexpr, ACC: tl.constexpr):
    """Example b's routing weights as a vector of E_POW2 (zeros past E)."""
    o_e = tl.arange(0, E_POW2)
    return tl.load(r_ptr + b.to(tl.int64) * s_rb + o_e * s_re, mask=o_e < E, other=0.0).to(ACC)


@triton.jit
def _mixed_taps(r, w_ptr, o_w, m_w, N, E: tl.constexpr, E_POW2: tl.constexpr,
                ACC: tl.constexpr):
    """sum_e r[e] * w[e * N + o_w] for a vector of taps: the E experts' values in one 2-D load
    (their latencies overlap), then a sum over the experts."""
    o_e = tl.arange(0, E_POW2)
    w = tl.load(w_ptr + o_e[:, None] * N + o_w[None, :], mask=(o_e < E)[:, None] & m_w[None, :],
                other=0.0).to(ACC)
    return tl.sum(r[:, None] * w, axis=0)


@autotune(key=["B_KEY", "C_OUT", "KEY_L", "E", "KH", "KW", *SCALE_FLAGS],
          shapes=("BLOCK_C", "BLOCK_P"))
@triton.jit
def dw_fwd_kernel(
    x_ptr, r_ptr, w_ptr, bias_ptr, in_s_ptr, out_s_ptr, tap_s_ptr, out_ptr,
    C_OUT, MULT, H, W, HO, WO,
    s_xb, s_xc, s_xh, s_xw, s_rb, s_re, s_ob, s_oc, s_oh, s_ow, s_ib, s_ic, s_jb, s_jc, s_tb,
    s_tt, STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, B_KEY, KEY_L,
    E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, TAP_SCALE: tl.constexpr,
    WIDE: tl.constexpr, ACC: tl.constexpr, E_POW2: tl.constexpr, FLAT_IN: tl.constexpr,
    FLAT_OUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[b, c, p] for BLOCK_C channels x BLOCK_P output pixels of one example: per tap, the
    BLOCK_C taps mixed over the E experts, times the shifted input tile (reloads of the tile
    tap after tap hit L1). Offsets within an example are 32-bit unless WIDE. FLAT_OUT, FLAT_IN:
    out's and x's pixels addressed as one index (as in dw_bwd_w_kernel's FLAT_G, FLAT_X)."""
    i_p, i_c, i_b = program_ids(tl.cdiv(HO * WO, BLOCK_P), tl.cdiv(C_OUT, BLOCK_C))
    IDX: tl.constexpr = tl.int64 if WIDE else tl.int32
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C_OUT
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < HO * WO
    o_oh, o_ow = o_p // WO, o_p % WO
    p_x = x_ptr + i_b.to(tl.int64) * s_xb
    off_c = (o_c // MULT).to(IDX) * s_xc
    r = _routing(r_ptr, i_b, s_rb, s_re, E, E_POW2, ACC)
    b_acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for i in range(KH):  # rows of taps in a loop, a row's taps unrolled
        o_ih = o_oh * STRIDE_H - PAD_T + i * DIL_H
        m_h = m_p & (o_ih >= 0) & (o_ih < H)
        for j in tl.static_range(KW):
            b_tap = _mixed_taps(r, w_ptr, o_c * (KH * KW) + i * KW + j, m_c, C_OUT * KH * KW,
                                E, E_POW2, ACC)
            if TAP_SCALE:
                b_tap *= tl.load(tap_s_ptr + i_b.to(tl.int64) * s_tb + (i * KW + j) * s_tt).to(ACC)
            o_iw = o_ow * STRIDE_W - PAD_L + j * DIL_W
            m_x = m_h & (o_iw >= 0) & (o_iw < W)
            if FLAT_IN:  # the tap's input pixel of p: p + (i D - PAD_T) W + j D - PAD_L
                o_s = o_p + (i * DIL_H - PAD_T) * W + (j * DIL_W - PAD_L)
                off = off_c[:, None] + (o_s.to(IDX) * s_xw)[None, :]
            else:
                off = off_c[:, None] + (o_ih.to(IDX) * s_xh + o_iw.to(IDX) * s_xw)[None, :]
            b_acc += b_tap[:, None] * tl.load(p_x + off, mask=m_c[:, None] & m_x[None, :],
                                              other=0.0).to(ACC)
    if IN_SCALE:
        b_acc *= scale_factor(in_s_ptr, s_ib, (o_c // MULT) * s_ic, in_s_ptr, s_ib, 0, i_b, m_c,
                              True, False, ACC)[:, None]
    if HAS_BIAS:
        b_acc += _mixed_taps(r, bias_ptr, o_c, m_c, C_OUT, E, E_POW2, ACC)[:, None]
    if OUT_SCALE:
        b_acc *= scale_factor(out_s_ptr, s_jb, o_c * s_jc, out_s_ptr, s_jb, 0, i_b, m_c, True,
                              False, ACC)[:, None]
    p_o = out_ptr + i_b.to(tl.int64) * s_ob
    if FLAT_OUT:
        off_o = o_c[:, None].to(IDX) * s_oc + (o_p.to(IDX) * s_ow)[None, :]
    else:
        off_o = (o_c[:, None].to(IDX) * s_oc
                 + (o_oh.to(IDX) * s_oh + o_ow.to(IDX) * s_ow)[None, :])
    tl.store(p_o + off_o, b_acc.to(out_ptr.dtype.element_ty), mask=m_c[:, None] & m_p[None, :])


@autotune(key=["B_KEY", "C_IN", "KEY_L", "E", "KH", "KW", "STRIDE_H", "STRIDE_W",
                *SCALE_FLAGS],
          shapes=("BLOCK_C", "BLOCK_P"))
@triton.jit
def dw_bwd_x_kernel(
    g_ptr, r_ptr, w_ptr, in_s_ptr, out_s_ptr, tap_s_ptr, dx_ptr,
    C_IN, MULT, H, W, HO, WO,
    s_gb, s_gc, s_gh, s_gw, s_rb, s_re, s_db, s_dc, s_dh, s_dw, s_ib, s_ic, s_jb, s_jc, s_tb,
    s_tt, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_T, PAD_L, DIL_H, DIL_W,
    B_KEY, KEY_L, E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, IN_SCALE: tl.constexpr,
    OUT_SCALE: tl.constexpr, TAP_SCALE: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr, E_POW2: tl.constexpr, FLAT_IN: tl.constexpr, FLAT_OUT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_x[b, ci, q] = sum over the channel multiplier m and taps of the mixed tap times
    grad_out at the output pixel the (input pixel, tap) fed, for BLOCK_C input channels x
    BLOCK_P input pixels of one example; the scales as in the forward (out_scale and tap_scale
    on the mixed taps, in_scale on the accumulator). FLAT_OUT: grad_x's pixels addressed as one
    index; FLAT_IN: grad_out's too, at stride 1 with W = WO (the pixel a tap of q reads: q +
    (PAD_T - i D) W + PAD_L - j D), as in dw_bwd_w_kernel. The strides are compile-time
    constants: an output pixel is an input pixel's offset divided by them, for every tap and
    pixel (a runtime divisor costs a stride-2 layer a third of its instructions)."""
    i_q, i_c, i_b = program_ids(tl.cdiv(H * W, BLOCK_P), tl.cdiv(C_IN, BLOCK_C))
    IDX: tl.constexpr = tl.int64 if WIDE else tl.int32
    o_ci = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_ci < C_IN
    o_q = i_q * BLOCK_P + tl.arange(0, BLOCK_P)
    m_q = o_q < H * W
    o_ih, o_iw = o_q // W, o_q % W
    p_g = g_ptr + i_b.to(tl.int64) * s_gb
    r = _routing(r_ptr, i_b, s_rb, s_re, E, E_POW2, ACC)
    b_acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for m in range(MULT):
        o_co = o_ci * MULT + m
        off_c = o_co.to(IDX) * s_gc
        if OUT_SCALE:
            f_co = scale_factor(out_s_ptr, s_jb, o_co * s_jc, out_s_ptr, s_jb, 0, i_b, m_c, True,
                                False, ACC)
        for i in range(KH):  # as in the forward: rows in a loop, a row's taps unrolled
            o_nh = o_ih + PAD_T - i * DIL_H
            o_oh = o_nh // STRIDE_H
            m_h = m_q & (o_nh >= 0) & (o_nh % STRIDE_H == 0) & (o_oh < HO)
            for j in tl.static_range(KW):
                b_tap = _mixed_taps(r, w_ptr, o_co * (KH * KW) + i * KW + j, m_c,
                                    C_IN * MULT * KH * KW, E, E_POW2, ACC)
                if OUT_SCALE:
                    b_tap *= f_co
                if TAP_SCALE:
                    b_tap *= tl.load(tap_s_ptr + i_b.to(tl.int64) * s_tb
                                     + (i * KW + j) * s_tt).to(ACC)
                o_nw = o_iw + PAD_L - j * DIL_W
                o_ow = o_nw // STRIDE_W
                m_g = m_h & (o_nw >= 0) & (o_nw % STRIDE_W == 0) & (o_ow < WO)
                if FLAT_IN:
                    o_s = o_q + (PAD_T - i * DIL_H) * W + (PAD_L - j * DIL_W)
                    off = off_c[:, None] + (o_s.to(IDX) * s_gw)[None, :]
                else:
                    off = (off_c[:, None]
                           + (o_oh.to(IDX) * s_gh + o_ow.to(IDX) * s_gw)[None, :])
                b_g = tl.load(p_g + off, mask=m_c[:, None] & m_g[None, :], other=0.0).to(ACC)
                b_acc += b_tap[:, None] * b_g
    if IN_SCALE:
        b_acc *= scale_factor(in_s_ptr, s_ib, o_ci * s_ic, in_s_ptr, s_ib, 0, i_b, m_c, True,
                              False, ACC)[:, None]
    p_d = dx_ptr + i_b.to(tl.int64) * s_db
    if FLAT_OUT:
        off_d = o_ci[:, None].to(IDX) * s_dc + (o_q.to(IDX) * s_dw)[None, :]
    else:
        off_d = (o_ci[:, None].to(IDX) * s_dc
                 + (o_ih.to(IDX) * s_dh + o_iw.to(IDX) * s_dw)[None, :])
    tl.store(p_d + off_d, b_acc.to(dx_ptr.dtype.element_ty), mask=m_c[:, None] & m_q[None, :])


@autotune(key=["B_KEY", "C_OUT", "KEY_L", "KH", "KW"], shapes=DW_KGRAD_TILES)
@triton.jit
def dw_bwd_w_kernel(
    x_ptr, g_ptr, G_ptr,
    B, C_OUT, MULT, H, W, HO, WO,
    s_xb, s_xc, s_xh, s_xw, s_gb, s_gc, s_gh, s_gw,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, B_KEY, KEY_L,
    KH: tl.constexpr, KW: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr,
    FLAT_G: tl.constexpr, FLAT_X: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """G[b, c, t] = sum over the output pixels p of grad_out[b, c, p] times x[b, c // MULT] at
    the input pixel tap t of p reads: example b's kernel gradient for BLOCK_C channels and every
    tap (G is (B, C_OUT, KH * KW), contiguous, in the accumulation dtype). A program per
    (example, channel tile): the grid has B x C_OUT / BLOCK_C programs.

    The program walks its example's pixels in blocks of BLOCK_L; per block it computes the
    pixels' rows and columns and loads the grad_out tile once, then for every tap loads the
    shifted input tile (reloads of the block's input, tap after tap, hit L1) and sums the
    product over the pixels. The first block stores the taps' sums in G, each later block adds
    to them (the program's own entries of G, after a barrier: deterministic). Before, the taps
    were the outer loop: per tap and pixel block the grad_out tile was loaded and converted
    again and the pixels' rows and columns divided out again, about half of the instructions.

    FLAT_G: grad_out's pixels at one stride (s_gh = WO s_gw), addressed as p s_gw; FLAT_X:
    stride 1 and x's rows as wide as the output's (W = WO, s_xh = W s_xw), so that a tap's input
    pixels are p plus a constant. Addressed so, the pixels' contiguity is visible to the
    compiler: in NCHW it lays the threads along the pixels (coalesced loads), not across the
    channels, H x W elements apart (the launcher sets them for NCHW only)."""
    i_b, i_c, _ = program_ids(B, tl.cdiv(C_OUT, BLOCK_C))
    IDX: tl.constexpr = tl.int64 if WIDE else tl.int32
    L = HO * WO
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C_OUT
    p_x = x_ptr + i_b.to(tl.int64) * s_xb
    p_g = g_ptr + i_b.to(tl.int64) * s_gb
    off_xc = (o_c // MULT).to(IDX) * s_xc
    off_gc = o_c.to(IDX) * s_gc
    p_G = G_ptr + (i_b.to(tl.int64) * C_OUT + o_c) * (KH * KW)
    for p0 in range(0, L, BLOCK_L):
        o_p = p0 + tl.arange(0, BLOCK_L)
        m_p = o_p < L
        o_oh, o_ow = o_p // WO, o_p % WO
        if FLAT_G:
            off_g = off_gc[:, None] + (o_p.to(IDX) * s_gw)[None, :]
        else:
            off_g = off_gc[:, None] + (o_oh.to(IDX) * s_gh + o_ow.to(IDX) * s_gw)[None, :]
        b_g = tl.load(p_g + off_g, mask=m_c[:, None] & m_p[None, :], other=0.0).to(ACC)
        for i in range(KH):  # rows of taps in a loop, a row's taps unrolled
            o_ih = o_oh * STRIDE_H - PAD_T + i * DIL_H
            m_h = m_p & (o_ih >= 0) & (o_ih < H)
            for j in tl.static_range(KW):
                o_iw = o_ow * STRIDE_W - PAD_L + j * DIL_W
                m_x = m_h & (o_iw >= 0) & (o_iw < W)
                if FLAT_X:  # the tap's input pixel of p: p + (i D - PAD_T) W + j D - PAD_L
                    o_q = o_p + (i * DIL_H - PAD_T) * W + (j * DIL_W - PAD_L)
                    off_x = off_xc[:, None] + (o_q.to(IDX) * s_xw)[None, :]
                else:
                    off_x = (off_xc[:, None]
                             + (o_ih.to(IDX) * s_xh + o_iw.to(IDX) * s_xw)[None, :])
                b_x = tl.load(p_x + off_x, mask=m_c[:, None] & m_x[None, :], other=0.0)
                b_s = tl.sum(b_x.to(ACC) * b_g, axis=1)
                if p0 > 0:  # the earlier blocks' sum, stored by this program
                    b_s += tl.load(p_G + i * KW + j, mask=m_c, other=0.0)
                tl.store(p_G + i * KW + j, b_s, mask=m_c)
        tl.debug_barrier()  # this block's stores visible to every thread of the next
