"""Dense 1x1 CondConv kernel gradient (grad_weight and grad_routing) with every tile in the
tensor cores' accumulator layout (Hopper, Gluon).

Experimental: used only with ``CONDCONV_TRITON_STATIONARY=kernel_grad`` (or ``all``) until a GPU
run has measured it against the Triton kernel (:func:`condconv_kernels.triton.dense.
dense_bwd_w_kernel`).

Why: the Triton kernel gradient holds a tile of every expert's weights and gradients in
registers across a slice of the batch, as this one does, but in a layout of Triton's choosing.
Each example's G_b = grad_out_b x_b^T leaves the tensor cores in the accumulator's layout and
goes through shared memory into the tiles' layout: on the 7x7 layers 4 rounds, 8 of the 11
barriers of an example, at 246 registers (one program of 8 warps an SM, nothing to run while
it waits). The H200 measured that kernel at 313 us on s6.b1.expand (192 -> 1152 at 7x7, batch
256) against ~66 us of issued instructions: latency between barriers. Here the E expert tiles
of W (float32), their gradients and G_b are all in the accumulator's layout, so an example's
fold is elementwise in each thread's registers: grad_weight[e] += routing[b, e] G_b, and
grad_routing's <G_b, W[e]> is summed within each warp (shuffles) and written as one partial
sum a warp, added on the host in a fixed order. The barriers of an iteration (3: the explicit
one after the copies' wait, two the compiler adds for the shared buffers, whose runtime index
it cannot tell apart) guard the two copy buffers.

A program owns 64 output channels x BLOCK_CI input channels and a slice of the batch; per
example and tile of 64 pixels it copies grad_out's (64 x pixels) and x's (BLOCK_CI x pixels)
tiles (cp.async, the next tile's copy in flight during this one's product and fold) and
accumulates G_b on the tensor cores (wgmma, A = grad_out's tile, rows contiguous; B = x's tile,
its channels contiguous), then folds it. grad_weight comes out per batch slice (float32,
summed on the host, as the Triton kernel's).

Scope: 1x1, stride 1, no padding, groups = 1, float16 / bfloat16, x and grad_out channels_last
with their channels multiples of 16 (:func:`condconv_kernels.triton.stationary._copyable`), at
most :data:`MAX_EXPERTS` experts, planes of at most :data:`MAX_PIXELS` pixels (G_b's chain of
tensor-core sums stays as short as the Triton kernel's), no per-example scales, sm_90; every
other call takes the Triton kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import stationary
from .dense import CHAIN

if stationary.AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared,
                                                                  warpgroup_mma)

AVAILABLE = stationary.AVAILABLE
BLOCK_CO = 64  # one warpgroup's wgmma rows
BLOCK_P = 64  # pixels a tile
# Warps a program: one warpgroup (tiles of 64 x 16 channels) or two (64 x 32, each warpgroup
# 16 of the columns); a thread holds 8 values of each register tile either way.
WARP_CHOICES = (4, 8)
WARPS = 8  # the plan's unless told otherwise (bench_pointwise --acc-warps times the other)
# The expert tiles and their gradients are E pairs of register tiles: past 8 experts they
# would not fit beside each other.
MAX_EXPERTS = 8
MAX_PIXELS = CHAIN.value * BLOCK_P
# Batch slices: as the Triton kernel gradient's (each slice's gradients summed on the host).
SPLITS = 8


def plan(experts: int, cin: int, cout: int, pixels: int,
         warps: Optional[int] = None) -> Optional[dict]:
    """The compile-time sizes for a layer of ``experts`` experts, ``cin`` -> ``cout`` channels
    and ``pixels`` pixels an example, or None outside the kernel's scope: tiles of 64 output x
    4 ``warps`` input channels (a thread holds 8 values of each of the 2E + 1 register tiles,
    the expert tiles and their gradients float32: 168-170 registers at E = 8; with 16 values a
    thread ptxas spills), two buffers of both copied tiles. 8 warps (64 x 32) read grad_out
    half as often as 4 (64 x 16), which fit three programs an SM instead of one; ``warps``:
    :data:`WARPS` by default."""
    warps = WARPS if warps is None else warps
    if warps not in WARP_CHOICES:
        raise ValueError(f"warps must be one of {WARP_CHOICES}, got {warps}")
    if not (1 <= experts <= MAX_EXPERTS and 0 < pixels <= MAX_PIXELS
            and cin % 16 == 0 and cout % 16 == 0):
        return None
    block_ci = 4 * warps
    shared = 2 * 2 * (BLOCK_CO + block_ci) * BLOCK_P  # two buffers of both tiles, 16-bit
    return dict(BLOCK_CI=block_ci, WARPS=warps, NBUF=2, shared_bytes=shared)


if AVAILABLE:
    @gluon.jit
    def _copy_tiles(gs, xs, buf, g_b, x_b, p0, P, o_mg, COUT, o_pg, s_gp, o_kx, CIN, o_px,
                    s_xp):
        """Starts the asynchronous copies of one example's grad_out (64 rows x BLOCK_P pixels,
        rows contiguous) and x (BLOCK_CI channels x BLOCK_P pixels, channels contiguous) tiles
        at pixel p0 into buffer ``buf`` (zeros past the rows, channels and pixels); one commit
        group."""
        pg = p0 + o_pg
        cp.async_copy_global_to_shared(gs.index(buf), g_b + (o_mg[:, None] + pg[None, :] * s_gp),
                                       mask=(o_mg[:, None] < COUT) & (pg[None, :] < P))
        px = p0 + o_px
        cp.async_copy_global_to_shared(xs.index(buf), x_b + (o_kx[:, None] + px[None, :] * s_xp),
                                       mask=(o_kx[:, None] < CIN) & (px[None, :] < P))
        cp.commit_group()

    @gluon.jit
    def _warp_sums(v, WARPS: gl.constexpr):
        """The sums of v (64 x N, the accumulator's layout: warpgroup j holds columns j N / WN
        to (j + 1) N / WN - 1 of the WN = WARPS / 4, its warp w rows 16w to 16w + 15) over each
        warp's share, a (WARPS,) tensor: within the warps (shuffles), no barrier."""
        WN: gl.constexpr = WARPS // 4
        N: gl.constexpr = v.shape[1]
        v = gl.permute(gl.reshape(v, [4, 16, WN, N // WN]), (0, 2, 1, 3))
        return gl.sum(gl.reshape(v, [WARPS, 16 * N // WN]), axis=1)

    @gluon.jit
    def pw_kgrad_kernel(
        x_ptr, g_ptr, r_ptr, w_ptr, gw_ptr, part_ptr, B, CIN, COUT, P, PER_SPLIT, N_CI, N_CO,
        s_xb, s_xp, s_gb, s_gp, s_rb, s_re, s_we, s_wr,
        E: gl.constexpr, NEED_W: gl.constexpr, NEED_R: gl.constexpr, BLOCK_CO: gl.constexpr,
        BLOCK_CI: gl.constexpr, BLOCK_P: gl.constexpr, NBUF: gl.constexpr, WARPS: gl.constexpr,
    ):
        """For the tile (64 output channels of program // N_CI % N_CO, BLOCK_CI input channels
        of program % N_CI) and the batch slice program // (N_CI N_CO) (PER_SPLIT examples):
        gw[slice, e, co, ci] = sum over the slice's examples b of r[b, e] G_b[co, ci] (NEED_W)
        and part[tile, b, warp, e] = warp's share of sum over the tile of G_b W[e] (NEED_R),
        where G_b = sum over pixels p of grad_out[b, co, p] x[b, ci, p]. x (B, CIN, P) and
        grad_out (B, COUT, P) channels_last (a pixel's channels contiguous, pixels s_xp / s_gp
        apart, examples s_xb / s_gb), their channels, strides and addresses multiples of 16
        (elements; bytes for the address: the copies move 16 bytes); w[e, co, ci] at e * s_we +
        co * s_wr + ci; offsets within an example fit in int32."""
        pid = gl.program_id(0)
        i_ci = pid % N_CI
        i_co = pid // N_CI % N_CO
        i_s = pid // (N_CI * N_CO)
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        # The copies' register layouts: grad_out's rows and x's channels contiguous, 16 bytes a
        # thread; the tiles in shared memory as wgmma reads them (A: rows contiguous; B read
        # as (pixels x channels), channels contiguous).
        gc_layout: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, WARPS], [0, 1])
        xc_layout: gl.constexpr = gl.BlockedLayout([8, 1], [BLOCK_CI // 8, 256 // BLOCK_CI],
                                                   [1, WARPS], [0, 1])
        gs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_CO, BLOCK_P], gl.NVMMASharedLayout(
            swizzle_byte_width=2 * BLOCK_CO, element_bitwidth=16, rank=2, transposed=True))
        xs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_CI, BLOCK_P], gl.NVMMASharedLayout(
            swizzle_byte_width=min(128, 2 * BLOCK_CI), element_bitwidth=16, rank=2,
            transposed=True))
        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, WARPS // 4],
            instr_shape=[16, BLOCK_CI // (WARPS // 4), 16])
        o_mg = i_co * BLOCK_CO + gl.arange(0, BLOCK_CO, layout=gl.SliceLayout(1, gc_layout))
        o_pg = gl.arange(0, BLOCK_P, layout=gl.SliceLayout(0, gc_layout))
        o_kx = i_ci * BLOCK_CI + gl.arange(0, BLOCK_CI, layout=gl.SliceLayout(1, xc_layout))
        o_px = gl.arange(0, BLOCK_P, layout=gl.SliceLayout(0, xc_layout))
        o_co = i_co * BLOCK_CO + gl.arange(0, BLOCK_CO, layout=gl.SliceLayout(1, mma))
        o_ci = i_ci * BLOCK_CI + gl.arange(0, BLOCK_CI, layout=gl.SliceLayout(0, mma))
        m_tile = (o_co[:, None] < COUT) & (o_ci[None, :] < CIN)
        o_tile = o_co[:, None].to(gl.int64) * s_wr + o_ci[None, :]

        # The E expert tiles (for grad_routing) and their gradients, in the accumulator's
        # layout for the whole slice.
        ws = ()
        gws = ()
        for e in gl.static_range(E):
            if NEED_R:
                ws = ws + (gl.load(w_ptr + e * s_we.to(gl.int64) + o_tile, mask=m_tile,
                                   other=0.0).to(gl.float32),)
            gws = gws + (gl.zeros([BLOCK_CO, BLOCK_CI], gl.float32, mma),)

        b_lo = i_s * PER_SPLIT
        b_hi = gl.minimum(B, b_lo + PER_SPLIT)
        if b_lo < b_hi:
            _copy_tiles(gs, xs, 0, g_ptr + b_lo.to(gl.int64) * s_gb,
                        x_ptr + b_lo.to(gl.int64) * s_xb, 0, P, o_mg, COUT, o_pg, s_gp, o_kx,
                        CIN, o_px, s_xp)
        tile = (i_co * N_CI + i_ci).to(gl.int64)
        buf = 0
        for b in range(b_lo, b_hi):
            G = gl.zeros([BLOCK_CO, BLOCK_CI], gl.float32, mma)
            for p0 in range(0, P, BLOCK_P):
                cp.wait_group(0)
                fence_async_shared()  # the copies visible to the tensor cores
                gl.thread_barrier()  # ... and every warp's products done with the other buffer
                # The next tile (this example's next pixels, or the next example's first) into
                # the other buffer while this one is multiplied and folded.
                nb, np0 = stationary.next_tile(b, p0, P, BLOCK_P)
                if nb < b_hi:
                    _copy_tiles(gs, xs, 1 - buf, g_ptr + nb.to(gl.int64) * s_gb,
                                x_ptr + nb.to(gl.int64) * s_xb, np0, P, o_mg, COUT, o_pg, s_gp,
                                o_kx, CIN, o_px, s_xp)
                # grad_out's tile (64 x pixels) times x's read as (pixels x channels).
                G = warpgroup_mma(gs.index(buf), xs.index(buf).permute((1, 0)), G)
                buf = 1 - buf
            # The fold, in each thread's registers.
            r_b = r_ptr + b.to(gl.int64) * s_rb
            if NEED_W:
                folded = ()
                for e in gl.static_range(E):
                    folded = folded + (gws[e] + gl.load(r_b + e * s_re).to(gl.float32) * G,)
                gws = folded
            if NEED_R:
                p_part = part_ptr + (tile * B + b) * (WARPS * E)
                for e in gl.static_range(E):
                    q = _warp_sums(G * ws[e], WARPS)
                    o_w = gl.arange(0, WARPS, layout=q.type.layout)
                    gl.store(p_part + o_w * E + e, q)
        if NEED_W:
            n = COUT.to(gl.int64) * CIN
            for e in gl.static_range(E):
                gl.store(gw_ptr + (i_s * E + e) * n + o_tile, gws[e], mask=m_tile)


def _eligible_shapes(x: torch.Tensor, grad_out: torch.Tensor, experts: int) -> Optional[dict]:
    """The plan where the shapes, strides and dtypes suit the kernel, whatever the device."""
    if not (x.dtype in (torch.float16, torch.bfloat16) and grad_out.dtype == x.dtype
            and stationary._copyable(x) and stationary._copyable(grad_out)
            and x.shape[0] == grad_out.shape[0] and x.shape[2:] == grad_out.shape[2:]):
        return None
    B, cin, H, W = x.shape
    cout = grad_out.shape[1]
    if B == 0 or H * W == 0:
        return None
    # Offsets within an example in int32: each example's extent, and the stride between them.
    for t in (x, grad_out):
        s0, _, _, s3 = stationary.packed_strides(t)
        if max(s0, (H * W - 1) * s3 + t.shape[1]) >= 2 ** 31:
            return None
    return plan(experts, cin, cout, H * W)


def fits(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, stride, padding,
         dilation, groups: int, scales=stationary.NO_SCALES) -> Optional[dict]:
    """The plan (:func:`plan`) where this kernel computes the call's kernel gradient, whatever
    the device (the static report asks on meta tensors): a 1x1 layer at stride 1 without
    padding, one group, no per-example scales, x and grad_out as the copies read them."""
    E, cout, cin_g, kh, kw = weight.shape
    if not (groups == 1 and kh == kw == 1 and tuple(stride) == (1, 1)
            and not any(padding) and all(s is None for s in scales)
            and weight.dtype == x.dtype):
        return None
    return _eligible_shapes(x, grad_out, E)


def eligible(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, stride, padding,
             dilation, groups: int, scales=stationary.NO_SCALES) -> Optional[dict]:
    """:func:`fits`, on an sm_90 GPU with Gluon."""
    if not (AVAILABLE and x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0)):
        return None
    return fits(x, grad_out, weight, stride, padding, dilation, groups, scales)


def programs(batch: int, cin: int, cout: int, config: dict) -> Tuple[int, int, int, int]:
    """(input-channel tiles, output-channel tiles, examples a slice, programs) of a launch."""
    n_ci = -(-cin // config["BLOCK_CI"])
    n_co = -(-cout // BLOCK_CO)
    per = -(-batch // min(batch, SPLITS))
    return n_ci, n_co, per, n_ci * n_co * -(-batch // per)


def kernel_grads(grad_out: torch.Tensor, x: torch.Tensor, routing: torch.Tensor,
                 weight: torch.Tensor, need_r: bool, need_w: bool, config: dict
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_routing (B, E) float32, grad_weight (weight's shape and dtype)) of a 1x1 layer
    for a call :func:`eligible` accepted, None where not asked for: every partial sum written
    once and added on the host in a fixed order (deterministic)."""
    B, cin, H, W = x.shape
    E, cout = weight.shape[:2]
    w = weight.reshape(E, cout, cin).contiguous()
    n_ci, n_co, per, count = programs(B, cin, cout, config)
    splits = count // (n_ci * n_co)
    f32 = dict(dtype=torch.float32, device=x.device)
    gw = torch.empty((splits, E, cout * cin), **f32) if need_w else torch.empty(1, **f32)
    part = (torch.empty((n_ci * n_co, B, config["WARPS"], E), **f32) if need_r
            else torch.empty(1, **f32))
    s_x, s_g = stationary.packed_strides(x), stationary.packed_strides(grad_out)
    pw_kgrad_kernel[(count,)](
        x, grad_out, routing, w, gw, part, B, cin, cout, H * W, per, n_ci, n_co,
        s_x[0], s_x[3], s_g[0], s_g[3], routing.stride(0),
        routing.stride(1), cout * cin, cin, E=E, NEED_W=need_w, NEED_R=need_r,
        BLOCK_CO=BLOCK_CO, BLOCK_CI=config["BLOCK_CI"], BLOCK_P=BLOCK_P,
        NBUF=config["NBUF"], WARPS=config["WARPS"], num_warps=config["WARPS"])
    grad_routing = part.sum((0, 2)) if need_r else None
    grad_weight = gw.sum(0).view(weight.shape).to(weight.dtype) if need_w else None
    return grad_routing, grad_weight


# Specializations compile_check builds: (experts, Cin, Cout, pixels, need_r, need_w): the 7x7
# expand and project layers of EfficientNet-CondConv, a 14x14 layer (four pixel tiles an
# example), 4 experts, and each half alone.
COMPILE_CASES = [(8, 192, 1152, 49, True, True), (8, 1152, 192, 49, True, True),
                 (8, 112, 672, 196, True, True), (4, 80, 480, 196, True, True),
                 (8, 192, 1152, 49, True, False), (8, 192, 1152, 49, False, True)]


def compile_for(experts: int, cin: int, cout: int, pixels: int, dtype: torch.dtype,
                arch: int = 90, need_r: bool = True, need_w: bool = True,
                warps: Optional[int] = None):
    """The kernel compiled ahead of time for ``sm_<arch>`` (no GPU needed) at the plan of the
    layer, with the integer specializations a launch gets (sizes and strides divisible by 16,
    the routing's experts and W's columns at stride 1)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    config = plan(experts, cin, cout, pixels, warps)
    if config is None:
        raise ValueError(f"no plan for E={experts}, {cin} -> {cout}, P={pixels}")
    fn = pw_kgrad_kernel
    const = dict(E=experts, NEED_W=need_w, NEED_R=need_r, BLOCK_CO=BLOCK_CO,
                 BLOCK_CI=config["BLOCK_CI"], BLOCK_P=BLOCK_P,
                 NBUF=config["NBUF"], WARPS=config["WARPS"], s_re=1)
    kind = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    signature = {n: "constexpr" if n in const else
                 "*fp32" if n in ("r_ptr", "gw_ptr", "part_ptr") else
                 f"*{kind}" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    divisible = ["x_ptr", "g_ptr", "w_ptr", "gw_ptr", "part_ptr", "CIN", "COUT", "s_xb",
                 "s_xp", "s_gb", "s_gp", "s_we", "s_wr"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = GluonASTSource(fn, signature,
                            {(fn.arg_names.index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config["WARPS"]))
