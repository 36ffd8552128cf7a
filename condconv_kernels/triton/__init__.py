"""The ``triton`` backend: fused expert-mix + convolution kernels, forward and backward.

Host launchers: allocate, pick the kernel (dense implicit GEMM or depthwise direct), launch; a
call whose tensors' shapes, strides, dtypes and alignment were met before replays those
launches (:mod:`._replay`).
Inputs are read through their strides (contiguous, channels_last or sliced: no copies of x or
grad_out); outputs follow x's memory format. float32 ``tl.dot`` uses TF32 on the GPU where
PyTorch lets float32 convolutions use it (``torch.backends.cudnn.conv.fp32_precision`` or the
legacy ``torch.backends.cudnn.allow_tf32``; on by default), IEEE float32 otherwise and always
under the interpreter; float16/bfloat16 multiply in their precision with float32 accumulation;
float64 accumulates in float64. The expert mix is always float32 (float64).
The depthwise kernel gradient's two small matrix products on the host (and the bias terms)
follow PyTorch's float32 matmul precision (``torch.backends.cuda.matmul.allow_tf32``), as the
other backends' do; under ``torch.use_deterministic_algorithms(True)`` they need
``CUBLAS_WORKSPACE_CONFIG``, as any cuBLAS product does.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (for tests).

Two experimental paths for the dense 1x1 passes, off unless their switches name them
(``_env.py``): the Hopper kernels of ``CONDCONV_TRITON_STATIONARY`` (the experts stationary in
shared memory, :mod:`.stationary`, with their mix on the tensor cores, :mod:`.stationary_mix`,
and the kernel gradient in the tensor cores' accumulator layout, :mod:`.pointwise_grad`) and
batched cuBLAS products over chunks of examples
(:mod:`.batched`, ``CONDCONV_TRITON_BATCHED``); batched takes a pass before stationary where
both are on. A third, ``CONDCONV_TRITON_CLUSTER``, gives the dense 1x1 forward, grad_x and
kernel gradient on a Hopper GPU to the cuda backend's Hopper kernels (:mod:`.cluster`), before
the other two.
"""
from __future__ import annotations

import threading
from typing import Optional, Sequence, Tuple

import torch
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .. import _args, _env
from .._epilogue import Scales, conv_tf32, finish_grads, fold_scaled_kernel_grads
from ._grid import cdiv, flat_grid
from ._config import (DENSE_TILES, DW_KGRAD_TILES, DW_TILES, INTERPRET, KGRAD_TILES, bucket,
                      fixed_blocks, smallest_block)
from .dense import (CHAIN, SUM_BLOCK_C, SUM_BLOCK_W, dense_bwd_w_kernel, dense_bwd_x_kernel,
                    dense_fwd_kernel, dense_kgrad_sum_kernel)
from ._scales import launch_args
from .depthwise import dw_bwd_w_kernel, dw_bwd_x_kernel, dw_fwd_kernel
from . import _replay, batched, cluster, pointwise_grad, stationary, stationary_mix

__all__ = ["forward", "backward"]



def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of :func:`_acc`: the kernels' buffers of sums and mixed taps."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype: torch.dtype) -> str:
    tf32 = dtype == torch.float32 and not INTERPRET and conv_tf32()
    return "tf32" if tf32 else "ieee"


# Fixed configurations a GPU refused for their shared memory (one with less than the tables'
# H100), as (kernel, launch options, the tensors' dtypes and device) -> the stages launched
# instead, so that a call that is not replayed does not ask for them again.
_FEWER_STAGES: dict = {}


def _stages_key(kernel, args, kwargs) -> tuple:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return (kernel, tuple(kwargs.items()), tuple(t.dtype for t in tensors), tensors[0].device)


def _launch(kernel, grid, args, kwargs, launches: Optional[list] = None) -> list:
    """``kernel[grid](*args, **kwargs)``, returned as the list of launches ``_replay.keep``
    takes, and appended to ``launches`` where given: (kernel, grid, args, kwargs, what the launch
    returned), the compiled kernel of a plain kernel's launch (autotuning off) among them, so
    that those calls replay too. A fixed configuration (autotuning off: ``num_stages`` among
    ``kwargs``) that needs more shared memory than the GPU has (the tables are H100's) is
    launched with one pipeline stage fewer at a time, down to one (and with those stages from
    then on: _FEWER_STAGES); the autotuner skips such configurations itself."""
    asked, key = kwargs, None
    if _FEWER_STAGES and "num_stages" in kwargs:
        key = _stages_key(kernel, args, kwargs)
        stages = _FEWER_STAGES.get(key)
        kwargs = kwargs if stages is None else {**kwargs, "num_stages": stages}
    while True:
        try:
            compiled = kernel[grid](*args, **kwargs)
            break
        except OutOfResources as error:
            stages = kwargs.get("num_stages")
            if error.name != "shared memory" or stages is None or stages <= 1:
                if error.name == "shared memory" and stages is not None:
                    name = getattr(kernel, "__name__", "a kernel")
                    raise RuntimeError(
                        f"condconv triton backend: {name} needs {error.required} bytes of "
                        f"shared memory with one pipeline stage, more than this GPU's "
                        f"{error.limit}; CONDCONV_TRITON_CONFIG=i launches another "
                        f"configuration of its table") from error
                raise
            kwargs = {**kwargs, "num_stages": stages - 1}
    if kwargs.get("num_stages") != asked.get("num_stages"):
        _FEWER_STAGES[key or _stages_key(kernel, args, asked)] = kwargs["num_stages"]
    launch = (kernel, grid, args, kwargs, compiled)
    if launches is not None:
        launches.append(launch)
    return [launch]


def _pointwise(kh, kw, stride, padding, t: torch.Tensor) -> bool:
    """Whether a dense pass reads ``t`` (x, or grad_out for grad_x) as a (channels x pixels)
    matrix: a 1x1 kernel at stride 1 without padding, over a tensor whose rows of pixels follow
    one another at one stride (contiguous or channels_last, not a spatial slice)."""
    return (kh == kw == 1 and tuple(stride) == (1, 1) and not any(padding)
            and t.stride(2) == t.shape[3] * t.stride(3))


# The smallest batch whose dense 3x3 forward / grad_x reduce over (tap, channel) (_tap_major).
TAP_MAJOR_MIN_BATCH = 16


def _tap_major(kh: int, kw: int, t: torch.Tensor) -> bool:
    """Whether a dense forward / grad_x reduces over (tap, channel) rather than (channel, tap):
    for a kernel with several taps read from a tensor ``t`` (x, or grad_out for grad_x) whose
    channels are contiguous (channels_last), so that both of the dot's tiles are contiguous
    along a tap's channels (vector loads, copied asynchronously), at a batch of at least
    TAP_MAJOR_MIN_BATCH. The experts are then copied into that order once a call (2 E |W|
    bytes through HBM), which pays where the kernel reads them once per block of up to 8
    examples, not for the single read of a small batch. In NCHW a tap's channels are a plane
    apart, and the experts' order stays the one they come in."""
    return kh * kw > 1 and t.stride(1) == 1 and t.shape[0] >= TAP_MAJOR_MIN_BATCH


def _phases(stride: Sequence[int], pointwise: bool) -> bool:
    """Whether the dense grad_x runs phase by phase (``dense_bwd_x_kernel``'s PHASES): at a
    stride above 1, where each input pixel is reached through only some of the taps."""
    return not pointwise and tuple(stride) != (1, 1)


def _within(rows: Tuple[int, int], tiles: Tuple[int, int],
            grid: Tuple[int, ...]) -> Tuple[int, ...]:
    """A kernel-gradient grid whose programs cover (output channels x K) ``tiles`` tiles of W
    in each group, checked against the rows of partial sums allocated for them (``rows``: as
    many tiles as the smallest blocks give)."""
    if tiles[0] > rows[0] or tiles[1] > rows[1]:
        raise RuntimeError(f"condconv2d (triton): {tiles[0]} x {tiles[1]} tiles of W for "
                           f"{rows[0]} x {rows[1]} rows of partial sums: a configuration's tile "
                           "is smaller than the smallest of its table")
    return grid


def _taps(B: int, kh: int, kw: int, cout: int, x: torch.Tensor) -> torch.Tensor:
    """The depthwise forward's and grad_x's buffer of mixed taps, (B, kh kw, Cout) in the
    accumulation dtype: each program stores its examples' taps of its channels there once and
    reads them back tap by tap (depthwise._stage_taps)."""
    return torch.empty((B, kh * kw, cout), dtype=_acc_dtype(x.dtype), device=x.device)


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether an offset within one example of these tensors may not fit in 32 bits."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2 ** 31
               for t in tensors)


def _geometry(stride, padding, dilation):
    return (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])


def forward(x: torch.Tensor, routing: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], groups: int, in_scale: Optional[torch.Tensor] = None,
            out_scale: Optional[torch.Tensor] = None,
            tap_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, Cin, H, W) x (B, E) x (E, Cout, Cin/g, kh, kw) [+ (E, Cout)] -> (B, Cout, Ho, Wo),
    with the optional per-example scales in_scale (B, Cin), out_scale (B, Cout) and tap_scale
    (B, kh, kw) applied in the kernels. A signature met before replays its launch
    (:mod:`._replay`)."""
    inputs = (x, routing, weight, bias, in_scale, out_scale, tap_scale)
    signature = None
    if _replay.enabled(x):
        signature = _replay.key("forward", inputs, tuple(stride), tuple(padding),
                                tuple(dilation), groups)
        plan = _replay.PLANS.get(signature)
        if plan is not None:
            return plan.run(inputs)[0]
    B, cin, H, W = x.shape
    E, cout, cin_g, kh, kw = weight.shape
    _, _, ho, wo = _args.out_shape(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty((B, cout, ho, wo), dtype=x.dtype, device=x.device,
                      memory_format=_args.suggest_memory_format(x))
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    geometry = _geometry(stride, padding, dilation)
    s_ptrs, s_strides, s_flags = launch_args((in_scale, out_scale, tap_scale), kh * kw, routing)
    if cin_g == 1:
        blocks = fixed_blocks(DW_TILES, itemsize=x.element_size(),
                              acc_bytes=_acc_dtype(x.dtype).itemsize,
                              channels_last=x.stride(1) == 1)
        grid = lambda meta: flat_grid(  # noqa: E731
            cdiv(ho * cdiv(wo, meta["COLS"]), meta["BLOCK_Q"]), cdiv(cout, meta["BLOCK_C"]),
            cdiv(B, meta["EXAMPLES"]))
        taps = _taps(B, kh, kw, cout, x)
        args = (x, routing, w, b, *s_ptrs, taps, out, B, cout, cout // cin, H, W,
                ho, wo, *x.stride(), *routing.stride(), *out.stride(), *s_strides, *geometry,
                bucket(B), bucket(ho * wo))
        kwargs = dict(E=E, KH=kh, KW=kw, HAS_BIAS=bias is not None, WIDE=_wide(x, out),
                      ACC=_acc(x.dtype), E_POW2=bucket(E), KK_POW2=bucket(kh * kw), **s_flags,
                      **blocks)
        launched = _launch(dw_fwd_kernel, grid, args, kwargs)
        if signature is not None:
            _replay.keep(signature, launched, inputs, (out, taps), (out,))
        return out
    given = (in_scale, out_scale, tap_scale)
    if "forward" in _env.TRITON_CLUSTER and cluster.eligible(x, weight, stride, padding, groups,
                                                            given):
        return cluster.forward(x, routing, weight, bias)
    if "forward" in _env.TRITON_BATCHED and batched.eligible(x, weight, stride, padding, groups,
                                                            given):
        return batched.forward(x, routing, weight, bias, out)
    pointwise = _pointwise(kh, kw, stride, padding, x)
    if "mix" in _env.TRITON_STATIONARY:
        plan = stationary_mix.eligible(x, E, cout, groups, pointwise, _wide(x, out), out=out,
                                       scales=given)
        if plan is not None:
            launches = []
            stationary_mix.run(x, routing, weight, bias, out, plan, launches=launches)
            if signature is not None:
                _replay.keep(signature, launches, inputs, (out,), (out,))
            return out
    if "forward" in _env.TRITON_STATIONARY:
        plan = stationary.eligible(x, E, cout, groups, pointwise, _wide(x, out), scales=given)
        if plan is not None:
            return stationary.run(x, routing, weight, bias, out, plan, scales=given)
    cout_g = cout // groups
    blocks = fixed_blocks(DENSE_TILES, E, x.element_size(), like=x)
    grid = lambda meta: flat_grid(cdiv(ho * wo, meta["BLOCK_N"]),  # noqa: E731
                                  cdiv(cout_g, meta["BLOCK_M"]),
                                  cdiv(B, meta["BLOCK_B"]) * groups)
    tap_major = _tap_major(kh, kw, x)
    args = (x, routing, weight.permute(0, 1, 3, 4, 2).contiguous() if tap_major else w, b,
            *s_ptrs, out, B, cin_g, cout_g, groups, H, W, ho, wo, *x.stride(),
            *routing.stride(), 0, *out.stride(), *s_strides, *geometry, bucket(B),
            bucket(cin_g * kh * kw), bucket(ho * wo))
    kwargs = dict(E=E, KH=kh, KW=kw, HAS_BIAS=bias is not None, POINTWISE=pointwise,
                  TAP_MAJOR=tap_major, ACC=_acc(x.dtype), PRECISION=_precision(x.dtype),
                  **s_flags, **blocks)
    launched = _launch(dense_fwd_kernel, grid, args, kwargs)
    if signature is not None:
        _replay.keep(signature, launched, inputs, (out,), (out,))
    return out


# The smallest (BLOCK_CO, BLOCK_K, BLOCK_P) tiles of the dense kernel gradient's table: the
# rows of partial sums its launches allocate, the most tiles of pixels an example may have.
_KGRAD_SMALLEST = tuple(smallest_block(KGRAD_TILES, name) for name in KGRAD_TILES)
_STAND_INS = {}


def _stand_in(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One element of ``dtype`` on ``device``, for a kernel's output that its flags leave
    unwritten: allocated once per dtype and device (not in every call), never read or written
    but by the autotuner, which zeroes it. Kept as an ordinary tensor (not an inference-mode
    one, which the tuner could not zero outside that mode) and never from a CUDA graph's
    capture (whose pool it would outlive: a fresh one then). On a GPU it is allocated by a
    thread of its own: the warm-up of torch.compile's CUDA graphs sends the calling thread's
    allocations to the graphs' pool, whose memory is handed out again when the graphs move to
    an earlier state, and the tuner's zeroing would then write into another tensor."""
    t = _STAND_INS.get((dtype, device))
    if t is None:
        fresh = lambda: torch.zeros(1, dtype=dtype, device=device)  # noqa: E731
        if device.type != "cuda":
            with torch.inference_mode(False):
                t = _STAND_INS[dtype, device] = fresh()
            return t
        if torch.cuda.is_current_stream_capturing():
            return fresh()
        made = []

        def allocate():  # (a new thread: no inference mode; finished before the thread ends)
            made.append(fresh())
            torch.cuda.current_stream(device).synchronize()
        thread = threading.Thread(target=allocate, name="condconv-stand-in")
        thread.start()
        thread.join()
        if not made:
            raise RuntimeError(f"condconv triton backend: could not allocate one {dtype} "
                               f"element on {device} (for an output left unwritten)")
        t = _STAND_INS[dtype, device] = made[0]
    return t


def _splits(B: int, pixels: int) -> int:
    """Batch slices of the dense kernel-gradient programs (each owns its slice of partial
    sums): 8 (1 under the interpreter), more where a slice's iterations over (example, tile of
    ``pixels``) would reach 2**31 (the kernel's loop counter is 32-bit)."""
    S = 1 if INTERPRET else max(1, min(B, 8))
    tiles = min(cdiv(pixels, _KGRAD_SMALLEST[2]), CHAIN.value)  # an example's iterations
    while S < B and cdiv(B, S) * tiles >= 2 ** 31:
        S = min(B, 2 * S)
    return S


def backward(grad_out: torch.Tensor, x: torch.Tensor, routing: torch.Tensor,
             weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], groups: int,
             output_mask: Sequence[bool], in_scale: Optional[torch.Tensor] = None,
             out_scale: Optional[torch.Tensor] = None, tap_scale: Optional[torch.Tensor] = None
             ) -> Tuple[Optional[torch.Tensor], ...]:
    """(grad_x, grad_routing, grad_weight, grad_bias, grad_in_scale, grad_out_scale,
    grad_tap_scale), None where output_mask (an entry per gradient, or 4: every given scale's;
    _args.backward_mask) is False (the scales' gradients come in the scales' dtypes). A
    signature met before replays its launches where the call launched nothing but them
    (:mod:`._replay`: the dense kernels without the scales' gradients, the depthwise ones);
    what follows them on the host (the depthwise kernel gradient's products, the bias's
    terms) runs after the replay as after the launches."""
    output_mask = _args.backward_mask(output_mask, (in_scale, out_scale, tap_scale))
    need_x, need_r, need_w, need_b, *need_s = output_mask
    B, cin, H, W = x.shape
    E, cout, cin_g, kh, kw = weight.shape
    acc = _acc_dtype(x.dtype)
    w = weight.contiguous()
    depthwise = cin_g == 1
    scales = Scales(in_scale, out_scale, tap_scale)
    inputs = (grad_out, x, routing, weight, bias, in_scale, out_scale, tap_scale)
    signature = None
    # (what is never replayed is not looked up: the dense kernel gradient with the scales'
    # gradients, which it sums into zeroed buffers)
    if _replay.enabled(x) and (depthwise or not any(need_s)):
        signature = _replay.key("backward", inputs, tuple(stride), tuple(padding),
                                tuple(dilation), groups, output_mask)
        plan = _replay.PLANS.get(signature)
        if plan is not None:
            grad_x, grad_routing, grad_weight, G = plan.run(inputs)
            return _backward_tail(grad_out, routing, w, bias, scales, groups, output_mask, acc,
                                  grad_x, grad_routing, grad_weight, G)
    # What a replay would make again: the launches, the buffers they write, and whether each
    # gradient came from them alone (set in those branches only).
    launches, buffers = [], []
    replay_x = replay_k = False
    ho, wo = grad_out.shape[-2:]
    geometry = _geometry(stride, padding, dilation)
    grad_x = grad_routing = grad_weight = G = None
    s_ptrs, s_strides, s_flags = launch_args(scales, kh * kw, routing)
    scale_grads = (None, None, None)

    if need_x and not depthwise and "grad_x" in _env.TRITON_CLUSTER and cluster.eligible(
            grad_out, weight, stride, padding, groups, (in_scale, out_scale, tap_scale)):
        grad_x = cluster.grad_x(grad_out, x, routing, weight)  # (not replayed: a cuda launch)
    elif need_x:
        grad_x = torch.empty_like(x, memory_format=_args.suggest_memory_format(x))
        if depthwise:
            blocks = fixed_blocks(DW_TILES, itemsize=grad_out.element_size(),
                                  acc_bytes=acc.itemsize, stride=stride[1],
                                  channels_last=grad_out.stride(1) == 1)
            grid = lambda meta: flat_grid(  # noqa: E731
                cdiv(H * cdiv(W, meta["COLS"] * stride[1]), meta["BLOCK_Q"]),
                cdiv(cin, meta["BLOCK_C"]), cdiv(B, meta["EXAMPLES"]))
            taps = _taps(B, kh, kw, cout, x)
            args = (grad_out, routing, w, *s_ptrs, taps, grad_x, B, cin, cout // cin, H, W, ho,
                    wo, *grad_out.stride(), *routing.stride(), *grad_x.stride(), *s_strides,
                    *geometry, bucket(B), bucket(H * W))
            kwargs = dict(E=E, KH=kh, KW=kw, WIDE=_wide(grad_out, grad_x), ACC=_acc(x.dtype),
                          KK_POW2=bucket(kh * kw), **s_flags, **blocks)
            _launch(dw_bwd_x_kernel, grid, args, kwargs, launches)
            buffers += [grad_x, taps]
            replay_x = True
        else:
            pointwise = _pointwise(kh, kw, stride, padding, grad_out)
            given = (in_scale, out_scale, tap_scale)
            take_batched = "grad_x" in _env.TRITON_BATCHED and batched.eligible(
                grad_out, weight, stride, padding, groups, given)
            mix_plan = (stationary_mix.eligible(grad_out, E, cin, groups, pointwise,
                                                _wide(grad_out, grad_x), transposed=True,
                                                out=grad_x, scales=given)
                        if "mix" in _env.TRITON_STATIONARY and not take_batched else None)
            plan = (stationary.eligible(grad_out, E, cin, groups, pointwise,
                                        _wide(grad_out, grad_x), transposed=True, scales=given)
                    if "grad_x" in _env.TRITON_STATIONARY and not take_batched
                    and mix_plan is None else None)
            if take_batched:
                batched.grad_x(grad_out, routing, weight, grad_x)
            elif mix_plan is not None:
                stationary_mix.run(grad_out, routing, weight, None, grad_x, mix_plan,
                                   transposed=True, launches=launches)
                buffers.append(grad_x)
                replay_x = True
            elif plan is not None:
                stationary.run(grad_out, routing, weight, None, grad_x, plan, transposed=True,
                               scales=given)
            else:
                cout_g = cout // groups
                blocks = fixed_blocks(DENSE_TILES, E, x.element_size(), like=x)
                # (the phases that hold pixels: a stride past the plane leaves the rest empty)
                phases = (min(stride[0], H) * min(stride[1], W) if _phases(stride, pointwise)
                          else 0)
                grid = lambda meta: flat_grid(  # noqa: E731
                    phases * cdiv(cdiv(H, stride[0]) * cdiv(W, stride[1]), meta["BLOCK_N"])
                    if phases else cdiv(H * W, meta["BLOCK_N"]),
                    cdiv(cin_g, meta["BLOCK_M"]), cdiv(B, meta["BLOCK_B"]) * groups)
                tap_major = _tap_major(kh, kw, grad_out)
                args = (grad_out, routing,
                        weight.permute(0, 3, 4, 1, 2).contiguous() if tap_major else w,
                        *s_ptrs, grad_x, B, cin_g, cout_g, groups, H, W, ho,
                        wo, *grad_out.stride(), *routing.stride(), 0, *grad_x.stride(),
                        *s_strides, *geometry, bucket(B), bucket(cout_g * kh * kw),
                        bucket(H * W))
                kwargs = dict(E=E, KH=kh, KW=kw, POINTWISE=pointwise, TAP_MAJOR=tap_major,
                              PHASES=bool(phases), ACC=_acc(x.dtype),
                              PRECISION=_precision(x.dtype), **s_flags, **blocks)
                _launch(dense_bwd_x_kernel, grid, args, kwargs, launches)
                buffers.append(grad_x)
                replay_x = True

    routed = False  # grad_routing from the stationary kernel
    if need_r and not depthwise and "routing" in _env.TRITON_STATIONARY:
        grad_routing = _stationary_routing_grad(grad_out, x, weight, groups, stride, padding,
                                                (in_scale, out_scale, tap_scale))
        need_r = grad_routing is None  # else the kernel gradient below leaves it out
        routed = not need_r

    if (need_r or need_w or any(need_s)) and depthwise:
        # The examples' tap gradients, then grad_weight = routing^T G, grad_routing = G W^T.
        # (the products in _backward_tail)
        G = torch.empty((B, cout, kh * kw), dtype=acc, device=x.device)
        blocks = fixed_blocks(DW_KGRAD_TILES)
        grid = lambda meta: flat_grid(B, cdiv(cout, meta["BLOCK_C"]))  # noqa: E731
        args = (x, grad_out, G, B, cout, cout // cin, H, W, ho, wo, *x.stride(),
                *grad_out.stride(), *geometry, bucket(B), bucket(ho * wo))
        kwargs = dict(KH=kh, KW=kw, WIDE=_wide(x, grad_out), ACC=_acc(x.dtype), **blocks)
        _launch(dw_bwd_w_kernel, grid, args, kwargs, launches)
        buffers.append(G)
        replay_k = True
    elif ((need_r or need_w) and not any(need_s) and "kernel_grad" in _env.TRITON_CLUSTER
          and cluster.kgrad_eligible(x, grad_out, weight, stride, padding, groups, scales)):
        r, grad_weight = cluster.kernel_grads(grad_out, x, routing, weight, need_r, need_w)
        grad_routing = r if need_r else grad_routing  # (not replayed: a cuda launch)
    elif (need_r or need_w) and "kernel_grad" in _env.TRITON_BATCHED and batched.eligible(
            x, weight, stride, padding, groups, scales, also=grad_out):
        r, grad_weight = batched.kernel_grads(grad_out, x, routing, weight, need_r, need_w, acc)
        grad_routing = r if need_r else grad_routing  # (else the stationary kernel's, or None)
    elif ((need_r or need_w) and not any(need_s) and "kernel_grad" in _env.TRITON_STATIONARY
          and (kgrad_plan := pointwise_grad.eligible(x, grad_out, weight, stride, padding,
                                                     dilation, groups, scales)) is not None):
        r, grad_weight = pointwise_grad.kernel_grads(grad_out, x, routing, weight, need_r,
                                                     need_w, kgrad_plan)
        grad_routing = r if need_r else grad_routing
    elif need_r or need_w or any(need_s):
        S = _splits(B, ho * wo)
        per_split = cdiv(B, S)
        N = w[0].numel()
        cout_g, K = cout // groups, cin_g * kh * kw
        rows_co, rows_k = cdiv(cout_g, _KGRAD_SMALLEST[0]), cdiv(K, _KGRAD_SMALLEST[1])

        def zeros(shape, wanted):
            """An accumulator the kernel adds into or fills in part, zeroed; where unused (the
            kernel then never writes it), the stand-in."""
            return (torch.zeros(shape, dtype=acc, device=x.device) if wanted else
                    _stand_in(acc, x.device))
        # Every program writes its tile of every expert's gradient for its slice, examples or
        # none: no fill.
        gw = (torch.empty((S, E, N), dtype=acc, device=x.device) if need_w else
              _stand_in(acc, x.device))
        # Partial sums by tile of W, as many rows as the smallest tiles of any configuration
        # make (each launch checks that it fits): grad_routing's (a row per tile), out_scale's
        # (a row per tile of K), in_scale's and tap_scale's (a row per tile of channels).
        # (not filled: the sum kernel reads the rows the launched configuration wrote)
        part = (torch.empty((groups * rows_co * rows_k, B, E), dtype=acc, device=x.device)
                if need_r else _stand_in(acc, x.device))
        qc = zeros((rows_k, B, cout), any(need_s) and out_scale is not None)
        qk = zeros((rows_co, B, groups * K),
                   any(need_s) and (in_scale is not None or tap_scale is not None))
        blocks = fixed_blocks(KGRAD_TILES, E, x.element_size(), gw.element_size(),
                              any(need_s))
        # channels_last x, several taps: the tiles' columns run over (tap, channel), along
        # which x is contiguous (vector loads, copied asynchronously; in (channel, tap) order
        # every element of the x tile is a scalar load with its own im2col address). W, where
        # read, is copied into that order; gw and qk come out in it.
        tap_major = kh * kw > 1 and x.stride(1) == 1
        w_k = (weight.permute(0, 1, 3, 4, 2).contiguous()
               if tap_major and (need_r or any(need_s)) else w)

        # The rows of partial sums the launched configuration writes: its grid's tiles (Triton
        # calls the grid with the configuration it launches, the tuner's last); all the rows
        # where the launch is only recorded, never run (the static report).
        written = {"tiles": groups * rows_co * rows_k}

        def grid(meta):
            n_k, n_co = cdiv(K, meta["BLOCK_K"]), cdiv(cout_g, meta["BLOCK_CO"])
            written["tiles"] = groups * n_co * n_k
            return _within((rows_co, rows_k), (n_co, n_k), flat_grid(n_k, n_co, groups * S))
        args = (x, grad_out, routing, w_k, *s_ptrs, gw, part, qc, qk, B, cin_g, cout_g, groups,
                H, W, ho, wo, per_split, *x.stride(), *grad_out.stride(), *routing.stride(),
                *s_strides, *geometry, bucket(B), bucket(K), bucket(ho * wo))
        kwargs = dict(E=E, E_POW2=bucket(E), KH=kh, KW=kw, NEED_W=need_w, NEED_R=need_r,
                      SCALE_GRADS=any(need_s), POINTWISE=_pointwise(kh, kw, stride, padding, x)
                      and _pointwise(kh, kw, stride, padding, grad_out),
                      TAP_MAJOR=tap_major, ACC=_acc(x.dtype), PRECISION=_precision(x.dtype),
                      **s_flags, **blocks)
        _launch(dense_bwd_w_kernel, grid, args, kwargs, launches)
        buffers += [t for t, wanted in ((gw, need_w), (part, need_r)) if wanted]
        if need_w or need_r:
            grad_weight, summed = _sum_kernel_grads(gw, part, written["tiles"], weight, B,
                                                    tap_major, need_w, need_r, launches)
            buffers += [t for t in (grad_weight, summed) if t is not None]
            if need_r:  # (else the stationary kernel's, or None)
                grad_routing = summed
        replay_k = not any(need_s) and not routed
        scale_grads = _scale_grads(scales, need_s, qc, qk, B, groups, cin_g, kh * kw, acc,
                                   tap_major)

    kernel_grads = need_r or need_w or any(need_s)
    if (signature is not None and (replay_x or not need_x) and (replay_k or not kernel_grads)):
        _replay.keep(signature, launches, inputs, buffers, (grad_x, grad_routing, grad_weight, G),
                     constants=tuple(_STAND_INS.values()))
    return _backward_tail(grad_out, routing, w, bias, scales, groups, output_mask, acc, grad_x,
                          grad_routing, grad_weight, G, scale_grads)


def _backward_tail(grad_out, routing, w, bias, scales: Scales, groups: int, output_mask, acc,
                   grad_x, grad_routing, grad_weight, G, scale_grads=(None, None, None)):
    """What follows the backward's launches on the host, replayed or not: the depthwise kernel
    gradient's products on the examples' tap gradients ``G`` (B, Cout, kh kw) (where not
    None: grad_routing = G W^T, grad_weight = routing^T G and the scales' terms), then the
    bias's terms and the gradients' dtypes (``finish_grads``). Returns the seven gradients."""
    _, need_r, need_w, need_b, *need_s = output_mask
    if G is not None:
        grad_routing, grad_weight, scale_grads = fold_scaled_kernel_grads(
            G.view(G.shape[0], -1), routing, w, scales, groups, need_r, need_w, acc, need_s)
    grad_routing, grad_bias, *scale_grads = finish_grads(grad_out, routing, bias, grad_routing,
                                                         need_b, acc, scales, scale_grads)
    return (grad_x, grad_routing, grad_weight, grad_bias, *scale_grads)


def _sum_kernel_grads(gw: torch.Tensor, part: torch.Tensor, tiles: int, weight: torch.Tensor,
                      B: int, tap_major: bool, need_w: bool, need_r: bool,
                      launches: Optional[list] = None
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_weight, grad_routing) from the dense kernel gradient's partial sums, in one launch
    (``dense_kgrad_sum_kernel``): grad_weight (E, Cout, Cin/g, kh, kw) in weight's dtype, the
    sum of gw's (S, E, N) slices (N in (Cout, kh, kw, Cin/g) order where ``tap_major``);
    grad_routing (B, E) in the accumulation dtype, the sum of part's first ``tiles`` rows of
    (B, E). None where not asked for. ``launches``: a list the launch is added to (as
    :func:`_launch` adds it)."""
    E, cout, cin_g, kh, kw = weight.shape
    acc = gw.dtype  # (the stand-in's where not asked for: the same)
    S, EN, BE = gw.shape[0], weight.numel(), B * E
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype,
                              device=weight.device) if need_w else None
    grad_routing = torch.empty((B, E), dtype=acc, device=weight.device) if need_r else None
    n_w = cdiv(EN, SUM_BLOCK_W.value) if need_w else 0
    programs = n_w + (cdiv(BE, SUM_BLOCK_C.value) if need_r else 0)
    stand_in = _stand_in(acc, weight.device)
    grid = flat_grid(programs)
    args = (gw, part, stand_in if grad_weight is None else grad_weight,
            stand_in if grad_routing is None else grad_routing, S, EN, n_w, tiles, BE, cin_g,
            kh * kw)
    kwargs = dict(NEED_W=need_w, NEED_R=need_r, TAP_MAJOR=tap_major and need_w)
    _launch(dense_kgrad_sum_kernel, grid, args, kwargs, launches)
    return grad_weight, grad_routing


def _stationary_routing_grad(grad_out, x, weight, groups, stride, padding,
                             scales=stationary.NO_SCALES):
    """grad_routing of a dense 1x1 layer from the experimental stationary kernel
    (:func:`stationary.routing_grad`), with the experts' slab W (rows Cout, over x) where it
    fits, else W^T (rows Cin, over grad_out); None where neither applies. ``scales``: the
    per-example (in_scale, out_scale, tap_scale), each possibly None."""
    E, cout, cin, kh, kw = weight.shape
    for inp, dual, rows, transposed in ((x, grad_out, cout, False), (grad_out, x, cin, True)):
        plan = stationary.eligible(inp, E, rows, groups, _pointwise(kh, kw, stride, padding, inp),
                                   _wide(inp, dual), transposed=transposed, routing=True,
                                   dual=dual, scales=scales)
        if plan is not None:
            return stationary.routing_grad(inp, dual, weight, plan, transposed=transposed,
                                           scales=scales)
    return None


def _scale_grads(scales: Scales, wanted: Sequence[bool], qc: torch.Tensor, qk: torch.Tensor,
                 B: int, groups: int, cin_g: int, taps: int, acc: torch.dtype,
                 tap_major: bool = False) -> Tuple[Optional[torch.Tensor], ...]:
    """The kernel terms of (grad_in_scale, grad_out_scale, grad_tap_scale) from the dense
    kernel gradient's partial sums (dense_bwd_w_kernel: qc by tile of K, qk by tile of output
    channels, its K over (channel, tap), or ``tap_major`` over (tap, channel)); None where the
    gradient is not ``wanted`` (an absent scale's never is)."""
    want_in, want_out, want_tap = wanted
    grad_out_scale = qc.sum(0) if want_out else None
    grad_in_scale = grad_tap_scale = None
    if want_in or want_tap:
        q = qk.sum(0)
        q = (q.view(B, groups, taps, cin_g).transpose(2, 3) if tap_major else
             q.view(B, groups, cin_g, taps))
        if want_in:
            t = q if scales.tap is None else q * scales.tap.to(acc).reshape(B, 1, 1, taps)
            grad_in_scale = t.sum(3).reshape(B, groups * cin_g)
        if want_tap:
            t = q if scales.in_ is None else q * scales.in_.to(acc).reshape(B, groups, cin_g, 1)
            grad_tap_scale = t.sum((1, 2))
    return grad_in_scale, grad_out_scale, grad_tap_scale
