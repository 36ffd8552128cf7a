"""Dense CondConv (Cin/groups > 1) in Triton: the expert mix fused into an implicit GEMM.

Forward: a program owns a (BLOCK_CO output channels x BLOCK_P output pixels) tile of one
(example, group). For each K = Cin/g*kh*kw block it loads the E expert tiles of W, mixes them
with routing[b, :] in registers (float32, float64 for float64), gathers the input patches
(im2col on the fly, padding by masks, x read through its strides) and feeds both to tl.dot.
The mixed kernel never goes to memory.

Backward:
- grad_x: the transposed convolution, the same way: mixed W^T tiles times gathered grad_out;
- kernel gradient: a program owns a (BLOCK_CO x BLOCK_K) tile of W for a slice of the batch
  and, example by example, computes that tile of G_b = grad_out_b @ cols_b^T, adds
  routing[b, e] * G_b into its (exclusively owned) tile of every expert's gradient, and writes
  <G_b, W[e]> over the tile as a partial of grad_routing[b, e]. Nothing is shared between
  programs; the partials are summed afterwards in a fixed order (deterministic).

All dot dimensions are >= 16, so what runs in the interpreter compiles for the GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import autotune


@autotune(key=["COUT_G", "KEY_K", "KEY_L"], shapes=("BLOCK_CO", "BLOCK_P", "BLOCK_K"))
@triton.jit
def dense_fwd_kernel(
    x_ptr, r_ptr, w_ptr, bias_ptr, out_ptr,
    E, CIN_G, COUT_G, GROUPS, H, W, HO, WO,
    s_xb, s_xc, s_xh, s_xw, s_rb, s_re, s_ob, s_oc, s_oh, s_ow,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, KEY_K, KEY_L,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_p, i_co, i_bg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_g = i_bg // GROUPS, i_bg % GROUPS
    K = CIN_G * KH * KW
    N = COUT_G * GROUPS * K
    o_co = i_g * COUT_G + i_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    m_co = i_co * BLOCK_CO + tl.arange(0, BLOCK_CO) < COUT_G
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < HO * WO
    o_oh, o_ow = o_p // WO, o_p % WO
    p_x0 = x_ptr + i_b.to(tl.int64) * s_xb + (i_g * CIN_G).to(tl.int64) * s_xc
    p_r = r_ptr + i_b.to(tl.int64) * s_rb

    b_acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        o_ci, o_t = o_k // (KH * KW), o_k % (KH * KW)
        # The mixed kernel tile, in registers.
        p_w = w_ptr + o_co[:, None].to(tl.int64) * K + o_k[None, :]
        m_w = m_co[:, None] & m_k[None, :]
        b_w = tl.zeros((BLOCK_CO, BLOCK_K), dtype=ACC)
        for e in range(E):
            b_r = tl.load(p_r + e * s_re).to(ACC)
            b_w += b_r * tl.load(p_w + e * N, mask=m_w, other=0.0).to(ACC)
        # The input patches (im2col on the fly; the padding is the mask).
        o_ih = o_oh[None, :] * STRIDE_H - PAD_T + (o_t // KW)[:, None] * DIL_H
        o_iw = o_ow[None, :] * STRIDE_W - PAD_L + (o_t % KW)[:, None] * DIL_W
        m_x = (m_k[:, None] & m_p[None, :] & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0)
               & (o_iw < W))
        p_x = (p_x0 + o_ci[:, None].to(tl.int64) * s_xc + o_ih.to(tl.int64) * s_xh
               + o_iw.to(tl.int64) * s_xw)
        b_x = tl.load(p_x, mask=m_x, other=0.0)
        b_acc += tl.dot(b_w.to(b_x.dtype), b_x, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        b_bias = tl.zeros((BLOCK_CO,), dtype=ACC)
        for e in range(E):
            b_r = tl.load(p_r + e * s_re).to(ACC)
            b_bias += b_r * tl.load(bias_ptr + e * COUT_G * GROUPS + o_co, mask=m_co,
                                    other=0.0).to(ACC)
        b_acc += b_bias[:, None]
    p_o = (out_ptr + i_b.to(tl.int64) * s_ob + o_co[:, None].to(tl.int64) * s_oc
           + o_oh[None, :].to(tl.int64) * s_oh + o_ow[None, :].to(tl.int64) * s_ow)
    tl.store(p_o, b_acc.to(out_ptr.dtype.element_ty), mask=m_co[:, None] & m_p[None, :])


@autotune(key=["CIN_G", "KEY_K", "KEY_L"], shapes=("BLOCK_CI", "BLOCK_Q", "BLOCK_K"))
@triton.jit
def dense_bwd_x_kernel(
    g_ptr, r_ptr, w_ptr, dx_ptr,
    E, CIN_G, COUT_G, GROUPS, H, W, HO, WO,
    s_gb, s_gc, s_gh, s_gw, s_rb, s_re, s_db, s_dc, s_dh, s_dw,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, KEY_K, KEY_L,
    KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x[b, ci, ih, iw] = sum_{co, i, j} W_b[co, ci, i, j] grad_out[b, co, oh, ow] over
    the (oh, ow) with ih = oh * stride - pad + i * dilation (likewise w)."""
    i_q, i_ci, i_bg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_g = i_bg // GROUPS, i_bg % GROUPS
    K2 = COUT_G * KH * KW
    N = COUT_G * GROUPS * CIN_G * KH * KW
    o_ci = i_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    m_ci = o_ci < CIN_G
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < H * W
    o_ih, o_iw = o_q // W, o_q % W
    p_g0 = g_ptr + i_b.to(tl.int64) * s_gb + (i_g * COUT_G).to(tl.int64) * s_gc
    p_r = r_ptr + i_b.to(tl.int64) * s_rb

    b_acc = tl.zeros((BLOCK_CI, BLOCK_Q), dtype=ACC)
    for k0 in range(0, K2, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K2
        o_co, o_t = o_k // (KH * KW), o_k % (KH * KW)
        # Mixed W^T tile: (ci, (co, t)) of W[e, g * COUT_G + co, ci, t].
        p_w = (w_ptr + ((i_g * COUT_G + o_co[None, :]).to(tl.int64) * CIN_G + o_ci[:, None])
               * (KH * KW) + o_t[None, :])
        m_w = m_ci[:, None] & m_k[None, :]
        b_w = tl.zeros((BLOCK_CI, BLOCK_K), dtype=ACC)
        for e in range(E):
            b_r = tl.load(p_r + e * s_re).to(ACC)
            b_w += b_r * tl.load(p_w + e * N, mask=m_w, other=0.0).to(ACC)
        # grad_out at the output pixel each (input pixel, tap) came from, if any.
        o_nh = o_ih[None, :] + PAD_T - (o_t // KW)[:, None] * DIL_H
        o_nw = o_iw[None, :] + PAD_L - (o_t % KW)[:, None] * DIL_W
        o_oh, o_ow = o_nh // STRIDE_H, o_nw // STRIDE_W
        m_g = (m_k[:, None] & m_q[None, :] & (o_nh >= 0) & (o_nw >= 0)
               & (o_nh % STRIDE_H == 0) & (o_nw % STRIDE_W == 0) & (o_oh < HO) & (o_ow < WO))
        p_g = (p_g0 + o_co[:, None].to(tl.int64) * s_gc + o_oh.to(tl.int64) * s_gh
               + o_ow.to(tl.int64) * s_gw)
        b_g = tl.load(p_g, mask=m_g, other=0.0)
        b_acc += tl.dot(b_w.to(b_g.dtype), b_g, input_precision=PRECISION, out_dtype=ACC)
    p_d = (dx_ptr + i_b.to(tl.int64) * s_db + (i_g * CIN_G + o_ci)[:, None].to(tl.int64) * s_dc
           + o_ih[None, :].to(tl.int64) * s_dh + o_iw[None, :].to(tl.int64) * s_dw)
    tl.store(p_d, b_acc.to(dx_ptr.dtype.element_ty), mask=m_ci[:, None] & m_q[None, :])


@autotune(key=["COUT_G", "KEY_K", "KEY_L"], shapes=("BLOCK_CO", "BLOCK_K", "BLOCK_P"),
          reset_to_zero=("gw_ptr", "part_ptr"))
@triton.jit
def dense_bwd_w_kernel(
    x_ptr, g_ptr, r_ptr, w_ptr, gw_ptr, part_ptr,
    B, E, CIN_G, COUT_G, GROUPS, H, W, HO, WO, B_PER_SPLIT,
    s_xb, s_xc, s_xh, s_xw, s_gb, s_gc, s_gh, s_gw, s_rb, s_re,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, KEY_K, KEY_L,
    KH: tl.constexpr, KW: tl.constexpr, NEED_W: tl.constexpr, NEED_R: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """gw[split, e, tile] += routing[b, e] G_b[tile] and part[tile, b, e] = <G_b, W[e]>[tile]
    for the examples b of this program's batch split."""
    i_k, i_co, i_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_co, n_k = tl.num_programs(1), tl.num_programs(0)
    i_g, i_s = i_gs % GROUPS, i_gs // GROUPS
    K = CIN_G * KH * KW
    N = COUT_G * GROUPS * K
    L = HO * WO
    o_co = i_g * COUT_G + i_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    m_co = i_co * BLOCK_CO + tl.arange(0, BLOCK_CO) < COUT_G
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < K
    o_ci, o_t = o_k // (KH * KW), o_k % (KH * KW)
    m_tile = m_co[:, None] & m_k[None, :]
    o_tile = o_co[:, None].to(tl.int64) * K + o_k[None, :]
    tile = (i_g * n_co + i_co) * n_k + i_k

    for b in range(i_s * B_PER_SPLIT, tl.minimum(B, (i_s + 1) * B_PER_SPLIT)):
        p_x0 = x_ptr + tl.cast(b, tl.int64) * s_xb + (i_g * CIN_G).to(tl.int64) * s_xc
        p_g0 = g_ptr + tl.cast(b, tl.int64) * s_gb
        b_G = tl.zeros((BLOCK_CO, BLOCK_K), dtype=ACC)
        for p0 in range(0, L, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m_p = o_p < L
            o_oh, o_ow = o_p // WO, o_p % WO
            p_g = (p_g0 + o_co[:, None].to(tl.int64) * s_gc + o_oh[None, :].to(tl.int64) * s_gh
                   + o_ow[None, :].to(tl.int64) * s_gw)
            b_g = tl.load(p_g, mask=m_co[:, None] & m_p[None, :], other=0.0)
            o_ih = o_oh[:, None] * STRIDE_H - PAD_T + (o_t // KW)[None, :] * DIL_H
            o_iw = o_ow[:, None] * STRIDE_W - PAD_L + (o_t % KW)[None, :] * DIL_W
            m_x = (m_p[:, None] & m_k[None, :] & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0)
                   & (o_iw < W))
            p_x = (p_x0 + o_ci[None, :].to(tl.int64) * s_xc + o_ih.to(tl.int64) * s_xh
                   + o_iw.to(tl.int64) * s_xw)
            b_x = tl.load(p_x, mask=m_x, other=0.0)
            b_G += tl.dot(b_g, b_x, input_precision=PRECISION, out_dtype=ACC)
        for e in range(E):
            if NEED_R:
                b_we = tl.load(w_ptr + e * N + o_tile, mask=m_tile, other=0.0).to(ACC)
                tl.store(part_ptr + (tile.to(tl.int64) * B + b) * E + e, tl.sum(b_G * b_we))
            if NEED_W:
                b_r = tl.load(r_ptr + tl.cast(b, tl.int64) * s_rb + e * s_re).to(ACC)
                p_gw = gw_ptr + (i_s * E + e).to(tl.int64) * N + o_tile
                tl.store(p_gw, tl.load(p_gw, mask=m_tile, other=0.0) + b_r * b_G, mask=m_tile)
