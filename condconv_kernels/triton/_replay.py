"""Replayed launches: a pass's host work kept per call signature, for the eager GPU path.

What a launcher (``forward`` and ``backward`` in ``__init__.py``) decides before it launches
(which kernel, its
integer arguments, grid and options) and what Triton then picks (the compiled kernel for those
arguments and the tuned configuration) depend on the call's tensors only through their shapes,
strides, dtypes, devices and 16-byte alignment (which Triton specializes pointers on), and on a
few switches. A :class:`Plan` keeps the outcome for one such signature (:func:`key`): the
compiled kernel, its grid, and its positional arguments with the places of the call's tensors
and of the buffers it allocates marked. A later call of the same signature allocates those
buffers (``torch.empty_strided``, as the launcher's) and launches the compiled kernel directly:
no launcher arithmetic, no launch key, no grid function (launched dry, a 1x1 layer's forward
31 -> 13 us of host time, its backward 91 -> 29: ``bench/bench_host_overhead.py --dry-run``).

A plan is kept only where a tuned launch went through ``TunedKernel``'s direct launch (on the
GPU, or launched dry; never under the interpreter or with ``CONDCONV_TRITON_DIRECT_LAUNCH=0``)
or a plain or Gluon kernel's launch returned its compiled kernel (the mix pass's, and every
kernel's with autotuning off, as the GPU tests run), where
every tensor argument is one of the call's tensors, a buffer the launcher allocated or a
stand-in for an unused output (a copy it made of an input, e.g. the experts in tap-major order,
is not kept: that call's launcher runs every time), and never while a CUDA graph is captured. A
plan holds none of a call's tensors: the compiled kernels, integers, the buffers' sizes and the
stand-ins (which outlive every call).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver

from .. import _args, _env
from .._epilogue import conv_tf32, fp16_accumulation
from . import _config

# The most signatures kept (one per layer shape, batch size and alignment met): past it the
# plans start over.
MAX_PLANS = 4096
PLANS: Dict[tuple, "Plan"] = {}


def enabled(t: torch.Tensor) -> bool:
    """Whether a call on ``t``'s device may replay launches: the direct launch is on, and the
    tensor is not a meta tensor (the static report records launches on them, with no driver)."""
    return _config.DIRECT_LAUNCH and t.device.type != "meta"


def _cluster_state() -> Optional[tuple]:
    """The cluster pass's passes and the cuda backend's switches they read (the clustered
    kernels' mode, the kernel-gradient kernel's), None with the pass off (no op called)."""
    if not _env.TRITON_CLUSTER:
        return None
    ops = torch.ops.condconv
    try:
        switches = (ops.cuda_pointwise_cluster(), ops.cuda_pointwise_kgrad())
    except (AttributeError, RuntimeError):  # no extension: the pass never takes a call
        switches = None
    return _env.TRITON_CLUSTER, switches


def key(pass_name: str, tensors: Sequence[Optional[torch.Tensor]], *params) -> tuple:
    """A call's signature: the pass, its tensors' (``_args.signature``: shape, strides, dtype,
    device, 16-byte alignment), the call's other arguments ``params`` (hashable), and the switches
    a launch reads at run time: the experimental passes' (``_env``; with the batched
    products on, float16's reduced-precision accumulation, which keeps the dense kernels),
    float32's TF32, the configuration forced with autotuning off (``_config.FORCED_CONFIG``,
    which the launchers read at every call), the current device (Triton launches there) and
    Triton's debug and instrumentation switches (part of its launch options). With the cluster
    pass on, also the cuda backend's two switches its eligibility reads (:func:`_cluster_state`):
    a call that launched Triton's kernels under one setting is not replayed under another."""
    return (pass_name, _args.signature(*tensors), params, _env.TRITON_STATIONARY,
            _env.TRITON_BATCHED, _cluster_state(),
            bool(_env.TRITON_BATCHED) and fp16_accumulation(),
            conv_tf32(), _config.FORCED_CONFIG, driver.active.get_current_device(),
            knobs.runtime.debug, knobs.compilation.instrumentation_mode)


class Plan:
    """One signature's launches: for each step (kernel, config, compiled, grid, template, takes,
    fills), ``compiled[grid](*arguments)`` (and ``kernel.best_config`` set to ``config``, as the
    tuned kernel's own launch sets it) where ``arguments`` is ``template`` (the launch's other
    arguments in place, its options at the end) with ``inputs[i]`` at each (place, i) of
    ``takes`` and the buffer ``j`` at each (place, j) of ``fills``; the buffers (``buffers``:
    sizes, strides, dtype) allocated first. :meth:`run` returns ``outputs``' buffers (None for
    None)."""
    __slots__ = ("buffers", "steps", "outputs")

    def __init__(self, buffers, steps, outputs):
        self.buffers, self.steps, self.outputs = buffers, steps, outputs

    def run(self, inputs: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        device = inputs[0].device
        made = [torch.empty_strided(size, stride, dtype=dtype, device=device)
                for size, stride, dtype in self.buffers]
        for kernel, config, compiled, grid, template, takes, fills in self.steps:
            if kernel is not None:
                kernel.best_config = config
            arguments = list(template)
            for place, i in takes:
                arguments[place] = inputs[i]
            for place, j in fills:
                arguments[place] = made[j]
            compiled[grid](*arguments)
        return [None if j is None else made[j] for j in self.outputs]


def keep(signature: tuple, launches: Sequence[tuple], inputs: Sequence[Optional[torch.Tensor]],
         buffers: Sequence[torch.Tensor], outputs: Sequence[Optional[torch.Tensor]],
         constants: Sequence[torch.Tensor] = ()) -> None:
    """Keeps the plan of the launches just made, each (kernel, grid, args, kwargs) as
    ``kernel[grid](*args, **kwargs)`` (a tuned kernel), or (kernel, grid, args, kwargs, the
    compiled kernel the launch returned) (a plain or Gluon one, its arguments all given),
    under ``signature``, if they can be replayed (see the module): ``inputs`` are the call's
    tensors (as :meth:`Plan.run` will get them), ``buffers`` what the launcher allocated with
    ``torch.empty`` for the launches (written by them alone), ``outputs`` the launches'
    results (each one of the buffers, or None), ``constants`` tensors that outlive every call
    (the unused outputs' stand-ins), passed as they are. The caller vouches that the launches
    are all the call did before its host tail besides allocating the buffers."""
    if not enabled(inputs[0]) or (inputs[0].is_cuda
                                  and torch.cuda.is_current_stream_capturing()):
        return
    given = [t for t in inputs if t is not None]
    if len({id(t) for t in given}) < len(given):  # one tensor in two roles: the plan would
        return  # read the first role's input for both in a later call of distinct ones

    def find(t, among):
        return next((i for i, u in enumerate(among) if u is t), None)
    steps = []
    for kernel, grid, args, kwargs, *returned in launches:
        if isinstance(kernel, _config.TunedKernel):
            if kernel.fn.pre_run_hooks:
                return
            kwargs = {"grid": grid, "warmup": False, **kwargs}  # as kernel[grid] passes them
            try:
                known = kernel._compiled.get(kernel.launch_key(args, kwargs))
            except TypeError:  # an argument that cannot be a key
                return
            if known is None:  # (tuned or compiled in this call: kept from the next one)
                return
            compiled, config, options, names = known
        else:  # a plain (or Gluon) kernel: the compiled kernel its launch returned
            if not returned or not isinstance(returned[0], CompiledKernel) or getattr(
                    kernel, "pre_run_hooks", None):
                return
            compiled, config, options = returned[0], None, {}
            names = kernel.arg_names[len(args):]
            if any(name not in kwargs for name in names):  # (a default left to Triton)
                return
            kernel = None  # (no configuration to set)
        named = {**kwargs, **options}
        grid = tuple(grid(named) if callable(grid) else grid) + (1, 1)
        template: List[object] = []
        takes: List[Tuple[int, int]] = []
        fills: List[Tuple[int, int]] = []
        for place, a in enumerate(args):
            if isinstance(a, torch.Tensor) and find(a, constants) is None:
                i, j = find(a, inputs), find(a, buffers)
                if i is not None:
                    takes.append((place, i))
                elif j is not None:
                    fills.append((place, j))
                else:  # a tensor the plan could not make again
                    return
                template.append(None)
            else:
                template.append(a)
        template += [named[name] for name in names]
        steps.append((kernel, config, compiled, grid[:3], tuple(template), tuple(takes),
                      tuple(fills)))
    ends = [None if t is None else find(t, buffers) for t in outputs]
    if any(j is None and t is not None for j, t in zip(ends, outputs)):
        return
    if len(PLANS) >= MAX_PLANS:
        PLANS.clear()
    PLANS[signature] = Plan(tuple((tuple(b.shape), b.stride(), b.dtype) for b in buffers),
                            tuple(steps), tuple(ends))
