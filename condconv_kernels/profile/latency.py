"""Latency of CondConv, fused against the unfused baseline and the static convolution, per layer
(at each CondConv layer's real shape) and for whole models.

Variants, measured in one run so that their ratios are meaningful:

- ``fused:<backend>``: the condconv op on that backend (every available one but reference);
- ``unfused``: the reference backend, timm's grouped-convolution form;
- ``static``: the same shape as one plain ``F.conv2d`` (per layer), or the same model built
  without experts (whole model).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _env, backends
from ..nn import FusedConv2d
from .layers import LayerShape
from .timing import Measurement, time_callable

__all__ = ["VariantResult", "model_layer_shapes", "layer_variants", "model_variants",
           "BATCHED_VARIANT", "BATCHED_GRAD_X_VARIANT", "KGRAD_VARIANT", "MIX_VARIANT",
           "SWITCHED_VARIANTS", "measure", "fused_backends",
           "cpu_peak_memory_mb"]


@dataclasses.dataclass
class VariantResult:
    variant: str
    time: Measurement
    peak_memory_mb: Optional[float]   # see measure()
    cuda_graph_ms: Optional[float] = None


def fused_backends(device: str) -> List[str]:
    """The fused backends worth timing on ``device`` (not the reference, and not triton on CPU,
    which runs there only in Triton's interpreter, for tests)."""
    return [b for b in backends.available_backends(device)
            if b != "reference" and not (b == "triton" and device == "cpu")]


def model_layer_shapes(model: nn.Module, input_size) -> List[LayerShape]:
    """The layers on the fused op (CondConv2d, DynamicConv2d, ODConv2d) of a model at the
    shapes a batch-1 forward pass gives them."""
    size = (input_size,) * 2 if isinstance(input_size, int) else tuple(input_size)[-2:]
    shapes: List[LayerShape] = []
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            pad = module.padding
            if pad == "same":
                from .._args import same_padding
                pad4 = (same_padding(x.shape[-2], module.kernel_size[0], module.stride[0],
                                     module.dilation[0]) +
                        same_padding(x.shape[-1], module.kernel_size[1], module.stride[1],
                                     module.dilation[1]))
            else:
                p = (pad, pad) if isinstance(pad, int) else tuple(pad)
                pad4 = (p[0], p[0], p[1], p[1])
            shapes.append(LayerShape(name, module.in_channels, module.out_channels, x.shape[-2],
                                     x.shape[-1], module.kernel_size[0], module.stride[0],
                                     module.groups, module.num_experts, pad4,
                                     tuple(module.scales)))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, FusedConv2d):
            hooks.append(m.register_forward_hook(hook(name)))
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, 3) + size, dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _step(fn: Callable[[], torch.Tensor], backward: bool,
          leaves: Sequence[torch.Tensor] = ()) -> Callable[[], None]:
    """One call of ``fn``, and with ``backward`` one backward pass from a fixed dense random
    gradient in the output's layout (``out.sum().backward()`` would hand the backward a
    stride-0 gradient, which no training step sees). The leaves' gradients are reset first, as
    ``optimizer.zero_grad()`` does, so no variant pays for accumulating into old gradients."""
    grad: List[torch.Tensor] = []

    def run():
        out = fn()
        if backward:
            for t in leaves:
                t.grad = None
            if not grad:
                grad.append(torch.randn_like(out))
            out.backward(grad[0])
    return run


def _input_sets(device: str, bytes_per_set: int) -> int:
    """How many input sets a CUDA benchmark rotates through so that a call never finds its
    inputs in L2 (twice the L2 size in all, at most 8 sets); 1 elsewhere."""
    if torch.device(device).type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0)
    return max(1, min(8, -(-2 * l2 // max(1, bytes_per_set))))


def layer_variants(layer: LayerShape, batch: int, device: str, dtype: torch.dtype,
                   backward: bool, channels_last: bool = False) -> Dict[str, Callable[[], None]]:
    """variant name -> callable running one forward (and backward) of the layer. On CUDA each
    callable rotates through enough input sets that its inputs are not in L2 (see
    :func:`_input_sets`), the same sets for every variant; each callable's ``sets`` attribute
    says how many calls make one turn of them."""
    from .. import condconv2d
    g = torch.Generator().manual_seed(0)
    itemsize = torch.empty((), dtype=dtype).element_size()
    set_bytes = layer.work(batch, itemsize, backward)[1]
    sets = []
    for _ in range(_input_sets(device, set_bytes)):
        x = torch.randn(batch, layer.cin, layer.height, layer.width, generator=g)
        routing = torch.rand(batch, layer.experts, generator=g)
        weight = torch.randn(layer.experts, layer.cout, layer.cin // layer.groups, layer.kernel,
                             layer.kernel, generator=g) * 0.05
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, weight = (t.to(device, dtype).requires_grad_(backward) for t in (x, weight))
        routing = routing.to(device, torch.float32 if dtype != torch.float64 else dtype)
        routing.requires_grad_(backward)
        static_w = weight[0].detach().clone().requires_grad_(backward)
        # ODConv's attentions as scales (around 0.5, as sigmoids are), in the routing's dtype.
        scales = tuple(
            (torch.rand(shape, generator=g) * 0.5 + 0.25).to(device, routing.dtype)
            .requires_grad_(backward) if given else None
            for shape, given in zip(((batch, layer.cin), (batch, layer.cout),
                                     (batch, layer.kernel, layer.kernel)), layer.scales))
        sets.append((x, routing, weight, static_w, scales))
    pad = layer.padding
    symmetric = pad[0] == pad[1] and pad[2] == pad[3]

    def rotating(body):
        turn = itertools.cycle(sets)
        return lambda: body(*next(turn))

    def static(x, routing, weight, static_w, scales):  # as nn.Conv2d / timm's Conv2dSame: F.pad
        if symmetric:                                   # only for asymmetric padding
            return F.conv2d(x, static_w, None, layer.stride, (pad[0], pad[2]), 1, layer.groups)
        xp = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
        return F.conv2d(xp, static_w, None, layer.stride, 0, 1, layer.groups)

    def op(name):
        return lambda x, routing, weight, static_w, scales: condconv2d(
            x, routing, weight, None, layer.stride, pad, 1, layer.groups, in_scale=scales[0],
            out_scale=scales[1], tap_scale=scales[2], backend=name)
    leaves = [t for s in sets for t in s[:4] + s[4] if t is not None]
    variants = {"static": _step(rotating(static), backward, leaves),
                "unfused": _step(rotating(op("reference")), backward, leaves)}
    for name in fused_backends(device):
        variants[f"fused:{name}"] = _step(rotating(op(name)), backward, leaves)
    for fn in variants.values():  # how many calls make one turn of the input sets
        fn.sets = len(sets)
    return variants


def _set_backend(model: nn.Module, name: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            m.backend = name
    return model


BATCHED_VARIANT = "fused:triton+batched"
BATCHED_GRAD_X_VARIANT = "fused:triton+batched-grad_x"
KGRAD_VARIANT = "fused:triton+kgrad"
MIX_VARIANT = "fused:triton+mix"
CLUSTER_VARIANT = "fused:triton+cluster"
# The triton backend with an experimental path switched on: variant -> (the switch of _env,
# which the backend reads at every call; the passes it turns on).
SWITCHED_VARIANTS = {BATCHED_VARIANT: ("TRITON_BATCHED", _env.BATCHED_PASSES),
                     BATCHED_GRAD_X_VARIANT: ("TRITON_BATCHED", frozenset({"grad_x"})),
                     KGRAD_VARIANT: ("TRITON_STATIONARY", frozenset({"kernel_grad"})),
                     MIX_VARIANT: ("TRITON_STATIONARY", frozenset({"mix"})),
                     CLUSTER_VARIANT: ("TRITON_CLUSTER", _env.CLUSTER_PASSES)}
# The extension's switches a variant also turns on (to 1) around its steps, where the extension
# has them: the cluster variant's kernel gradient takes the cuda backend's kernel only with it.
NATIVE_SWITCHES = {CLUSTER_VARIANT: ("cuda_pointwise_kgrad",)}


@contextlib.contextmanager
def _switched(variant: str):
    """The passes of ``variant`` (:data:`SWITCHED_VARIANTS`) and its switches of the extension
    (:data:`NATIVE_SWITCHES`) on for the block, then every switch as it was."""
    name, passes = SWITCHED_VARIANTS[variant]
    saved = getattr(_env, name)
    setattr(_env, name, passes)
    natives = [getattr(torch.ops.condconv, op) for op in NATIVE_SWITCHES.get(variant, ())
               if hasattr(torch.ops.condconv, op)]
    before = [switch() for switch in natives]
    try:
        for switch in natives:
            switch(1)
        yield
    finally:
        setattr(_env, name, saved)
        for switch, mode in zip(natives, before):
            switch(mode)


def model_variants(name: str, batch: int, device: str, dtype: torch.dtype, backward: bool,
                   input_size: Optional[int] = None, amp: Optional[torch.dtype] = None,
                   channels_last: bool = False, timm_models: Sequence[str] = (),
                   switched: Sequence[str] = ()) -> Dict[str, Callable[[], None]]:
    """variant name -> callable running the whole model (training mode with backward, else
    eval); ``static`` is the same architecture without experts. ``amp``: run under
    ``torch.autocast`` with that dtype (parameters stay ``dtype``); ``channels_last``: model and
    input in channels_last; ``timm_models``: timm's own models of these names as further
    variants ``timm:<name>`` (randomly initialised, same input), where timm is installed;
    ``switched`` (where the triton backend runs): variants of :data:`SWITCHED_VARIANTS`, the
    triton backend with an experimental path on (``fused:triton+batched``: every batched 1x1
    pass, ``CONDCONV_TRITON_BATCHED``; ``fused:triton+kgrad``: the dense 1x1 kernel gradient in
    the accumulator's layout, ``CONDCONV_TRITON_STATIONARY=kernel_grad``;
    ``fused:triton+mix``: the 7x7 and 14x14 1x1 forward and grad_x with the experts
    stationary and their mix on the tensor cores, ``CONDCONV_TRITON_STATIONARY=mix``;
    ``fused:triton+cluster``: the 1x1 forward, grad_x and kernel gradient through the cuda
    backend's Hopper kernels, ``CONDCONV_TRITON_CLUSTER`` with ``CONDCONV_CUDA_KGRAD=1``),
    switched on around
    its own steps only, forward and backward (so also while a CUDA graph captures them)."""
    from ..models import create_model
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    fused = create_model(name).to(device, dtype, memory_format=memory_format)
    static = create_model(name, condconv=False).to(device, dtype, memory_format=memory_format)
    size = input_size or fused.pretrained_cfg["input_size"][-1]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(
        memory_format=memory_format)
    device_type = torch.device(device).type

    def run(model):
        if amp is None:
            return model(x)
        with torch.autocast(device_type, dtype=amp):
            return model(x)
    variants = {}
    models = ([(static, "static", None), (fused, "unfused", "reference")] +
              [(fused, f"fused:{b}", b) for b in fused_backends(device)])
    unknown = set(switched) - set(SWITCHED_VARIANTS)
    if unknown:
        raise ValueError(f"switched: unknown variants {sorted(unknown)}; have "
                         f"{sorted(SWITCHED_VARIANTS)}")
    if "triton" in fused_backends(device):
        models += [(fused, v, "triton") for v in SWITCHED_VARIANTS if v in switched]
    if timm_models:
        import timm
        models += [(timm.create_model(t, pretrained=False).to(device, dtype,
                                                              memory_format=memory_format),
                    f"timm:{t}", None) for t in timm_models]
    for model, label, backend in models:
        if backend is not None:
            _set_backend(model, backend)
        model.train(backward)

        def fn(model=model, backend=backend):
            if backend is not None:
                _set_backend(model, backend)
            if backward:
                model.zero_grad(set_to_none=True)
                return run(model)
            with torch.no_grad():
                return run(model)
        variants[label] = _step(fn, backward)
        if label in SWITCHED_VARIANTS:  # the switch around the backward pass too
            def step_switched(step=variants[label], label=label):
                with _switched(label):
                    step()
            variants[label] = step_switched
    return variants


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 sent to /dev/null for the block: silences what native code (here the
    profiler's libkineto) writes to stderr without going through Python's ``sys.stderr``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak, in MiB, of the bytes allocated through PyTorch's CPU allocator during one call of
    ``fn``, above what was allocated before it (after one warm-up call, so caches and reused
    scratch are not counted). Read from the profiler's memory records: each op's own allocations
    are placed at its start and its own frees at its end, then the running total's maximum is
    taken. Memory allocated outside PyTorch's allocator (e.g. inside oneDNN or BLAS) is not
    seen."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # the profiler's C++ start/stop lines, one pair per call
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    deltas = []
    for event in prof.events():
        used = event.self_cpu_memory_usage
        if used > 0:
            deltas.append((event.time_range.start, used))
        elif used < 0:
            deltas.append((event.time_range.end, used))
    deltas.sort(key=lambda d: d[0])
    total = peak = 0
    for _, used in deltas:
        total += used
        peak = max(peak, total)
    return peak / 2 ** 20


def measure(fn: Callable[[], None], device: str, min_run_time: float,
            cuda_graph: bool = False, timed: Optional[Measurement] = None) -> VariantResult:
    """Times fn (median, quantiles) and its peak memory (CUDA: the caching allocator's peak
    above what was allocated before; CPU: :func:`cpu_peak_memory_mb`); with ``cuda_graph``
    also the replay time of fn captured in a CUDA graph. ``timed``: a timing already taken
    (e.g. by :func:`~condconv_kernels.profile.timing.time_interleaved`), kept as is."""
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    m = timed if timed is not None else time_callable(fn, device, min_run_time)
    graph_ms = None
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        if cuda_graph:
            graph_ms = _cuda_graph_ms(fn, min_run_time)
    else:
        peak = cpu_peak_memory_mb(fn)
    return VariantResult("", m, peak, graph_ms)


def _cuda_graph_ms(fn: Callable[[], None], min_run_time: float) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_callable(graph.replay, "cuda", min_run_time).median_ms
