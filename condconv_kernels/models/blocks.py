"""EfficientNet building blocks: block arguments, channel/depth rounding, and the modules.

Module and parameter names follow timm's EfficientNet so that state dicts are interchangeable:
``conv_pw``/``bn1``, ``conv_dw``/``bn2``, ``se.conv_reduce``/``se.conv_expand``,
``conv_pwl``/``bn3`` and, in CondConv blocks, ``routing_fn``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._args import same_padding
from ..nn import CondConv2d, CondConvRouting

__all__ = ["BlockArgs", "decode_block_string", "encode_block_string", "round_channels",
           "scale_depth", "BatchNormAct2d", "Conv2dPadded", "SqueezeExcite", "DropPath",
           "DepthwiseSeparable", "InvertedResidual"]


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """One stage of blocks.

    block: "ds" (depthwise separable: dw -> se -> pw) or "ir" (inverted residual:
        pw expand -> dw -> se -> pw project). kernel/stride: of the depthwise conv (the stride
        applies to the first block of the stage). expand_ratio: mid = in * expand_ratio.
    out_channels, repeats: before width/depth scaling. se_ratio: squeeze-excitation channels as
        a fraction of the block's input channels (0 or None: no SE). num_experts: > 0 makes the
        block's three convolutions CondConv with one shared routing function.
    """
    block: str = "ir"
    repeats: int = 1
    kernel: int = 3
    stride: int = 1
    expand_ratio: float = 1.0
    out_channels: int = 16
    se_ratio: Optional[float] = 0.25
    num_experts: int = 0
    skip: bool = True

    def __post_init__(self):
        if self.block not in ("ds", "ir"):
            raise ValueError(f"BlockArgs: argument 'block' must be 'ds' or 'ir', "
                             f"got {self.block!r}")
        for name in ("repeats", "kernel", "stride", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"BlockArgs: argument '{name}' must be >= 1, "
                                 f"got {getattr(self, name)}")
        if self.expand_ratio <= 0 or self.num_experts < 0:
            raise ValueError("BlockArgs: 'expand_ratio' must be > 0 and 'num_experts' >= 0")


_TOKEN = re.compile(r"^([a-z]+)(\d+(?:\.\d+)?)$")


def decode_block_string(text: str, experts_multiplier: int = 1) -> BlockArgs:
    """Parses the EfficientNet notation, e.g. ``"ir_r4_k5_s2_e6_c192_se0.25_cc4"``: block type,
    r=repeats, k=kernel, s=stride, e=expand ratio, c=output channels, se=SE ratio,
    cc=CondConv experts (times ``experts_multiplier``), ``noskip``."""
    parts = text.strip().split("_")
    if not parts or parts[0] not in ("ds", "ir"):
        raise ValueError(f"decode_block_string: block string must start with 'ds' or 'ir', "
                         f"got {text!r}")
    kw = {"block": parts[0], "se_ratio": None}
    keys = {"r": ("repeats", int), "k": ("kernel", int), "s": ("stride", int),
            "e": ("expand_ratio", float), "c": ("out_channels", int), "se": ("se_ratio", float),
            "cc": ("num_experts", int)}
    for token in parts[1:]:
        if token == "noskip":
            kw["skip"] = False
            continue
        m = _TOKEN.match(token)
        if not m or m.group(1) not in keys:
            raise ValueError(f"decode_block_string: unknown token {token!r} in {text!r}")
        name, cast = keys[m.group(1)]
        value = m.group(2)
        kw[name] = cast(float(value)) if cast is int else cast(value)
    if kw.get("num_experts"):
        kw["num_experts"] *= experts_multiplier
    return BlockArgs(**kw)


def encode_block_string(args: BlockArgs) -> str:
    """The inverse of :func:`decode_block_string`."""
    parts = [args.block, f"r{args.repeats}", f"k{args.kernel}", f"s{args.stride}",
             f"e{args.expand_ratio:g}", f"c{args.out_channels}"]
    if args.se_ratio:
        parts.append(f"se{args.se_ratio:g}")
    if args.num_experts:
        parts.append(f"cc{args.num_experts}")
    if not args.skip:
        parts.append("noskip")
    return "_".join(parts)


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``), never rounding down by > 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < round_limit * value:
        new += divisor
    return new


def round_channels(channels: int, multiplier: float = 1.0, divisor: int = 8) -> int:
    """Width scaling: ``channels * multiplier`` rounded to a multiple of ``divisor``."""
    return make_divisible(channels * multiplier, divisor) if multiplier else channels


def scale_depth(repeats: int, multiplier: float = 1.0) -> int:
    """Depth scaling: ceil(repeats * multiplier)."""
    return int(math.ceil(repeats * multiplier))


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation (its parameters are BatchNorm2d's)."""

    def __init__(self, channels: int, eps: float = 1e-5, act: bool = True):
        super().__init__(channels, eps=eps)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(super().forward(x))


class Conv2dPadded(nn.Conv2d):
    """nn.Conv2d with TensorFlow "same" padding when ``tf_same`` (computed per input size,
    asymmetric when it must be), else PyTorch-style symmetric padding ((k - 1) // 2 * d)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, bias=False,
                 tf_same=False):
        static = not tf_same or (stride == 1 and (kernel_size - 1) % 2 == 0)
        pad = ((stride - 1) + (kernel_size - 1)) // 2 if static else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, pad, 1, groups, bias)
        self.dynamic_same = not static

    def forward(self, x):
        if self.dynamic_same:
            top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], 1)
            left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], 1)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class SqueezeExcite(nn.Module):
    """x * sigmoid(expand(silu(reduce(mean_hw(x)))))."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x):
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of whole examples while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


@dataclasses.dataclass
class BlockConfig:
    """What a block needs beyond its BlockArgs: channels after scaling and conventions."""
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand_ratio: float
    se_ratio: Optional[float]
    num_experts: int
    skip: bool
    bn_eps: float
    tf_same: bool
    drop_path: float
    backend: str


def _se(cfg: BlockConfig, channels: int) -> nn.Module:
    if not cfg.se_ratio:
        return nn.Identity()
    return SqueezeExcite(channels, max(1, round(cfg.in_channels * cfg.se_ratio)))


def _conv(cfg: BlockConfig, cin: int, cout: int, kernel: int, stride: int = 1,
          groups: int = 1) -> nn.Module:
    if cfg.num_experts:
        return CondConv2d(cin, cout, kernel, stride, "same" if cfg.tf_same else "", 1, groups,
                          False, cfg.num_experts, cfg.backend)
    return Conv2dPadded(cin, cout, kernel, stride, groups, False, cfg.tf_same)


class DepthwiseSeparable(nn.Module):
    """dw kxk -> BN+act -> SE -> pw 1x1 -> BN (+ residual)."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.has_skip = cfg.skip and cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        self.conv_dw = Conv2dPadded(cfg.in_channels, cfg.in_channels, cfg.kernel, cfg.stride,
                                    cfg.in_channels, False, cfg.tf_same)
        self.bn1 = BatchNormAct2d(cfg.in_channels, cfg.bn_eps)
        self.se = _se(cfg, cfg.in_channels)
        self.conv_pw = Conv2dPadded(cfg.in_channels, cfg.out_channels, 1, tf_same=cfg.tf_same)
        self.bn2 = BatchNormAct2d(cfg.out_channels, cfg.bn_eps, act=False)
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, x):
        y = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return x + self.drop_path(y) if self.has_skip else y


class InvertedResidual(nn.Module):
    """pw expand -> BN+act -> dw kxk -> BN+act -> SE -> pw project -> BN (+ residual).

    With ``num_experts`` the three convolutions are CondConv, routed by one
    :class:`CondConvRouting` (``routing_fn``) on the block's input."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        mid = make_divisible(cfg.in_channels * cfg.expand_ratio)
        self.has_skip = cfg.skip and cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        self.conditional = cfg.num_experts > 0
        self.conv_pw = _conv(cfg, cfg.in_channels, mid, 1)
        self.bn1 = BatchNormAct2d(mid, cfg.bn_eps)
        self.conv_dw = _conv(cfg, mid, mid, cfg.kernel, cfg.stride, groups=mid)
        self.bn2 = BatchNormAct2d(mid, cfg.bn_eps)
        self.se = _se(cfg, mid)
        self.conv_pwl = _conv(cfg, mid, cfg.out_channels, 1)
        self.bn3 = BatchNormAct2d(cfg.out_channels, cfg.bn_eps, act=False)
        if self.conditional:  # registered last, as in timm, so state-dict order matches too
            self.routing_fn = CondConvRouting(cfg.in_channels, cfg.num_experts)
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, x):
        if self.conditional:
            r = self.routing_fn(x)
            y = self.bn1(self.conv_pw(x, r))
            y = self.se(self.bn2(self.conv_dw(y, r)))
            y = self.bn3(self.conv_pwl(y, r))
        else:
            y = self.bn1(self.conv_pw(x))
            y = self.se(self.bn2(self.conv_dw(y)))
            y = self.bn3(self.conv_pwl(y))
        return x + self.drop_path(y) if self.has_skip else y


def build_blocks(stages: List[BlockArgs], in_channels: int, width: float, depth: float,
                 bn_eps: float, tf_same: bool, drop_path_rate: float, backend: str,
                 ) -> Tuple[nn.Sequential, int]:
    """The stages as nn.Sequential of nn.Sequential (keys ``blocks.{stage}.{block}``) and
    the output channels. Drop-path grows linearly with the block index up to the rate."""
    repeats = [scale_depth(s.repeats, depth) for s in stages]
    total = sum(repeats)
    index = 0
    out = nn.Sequential()
    channels = in_channels
    for stage, n in zip(stages, repeats):
        cout = round_channels(stage.out_channels, width)
        blocks = nn.Sequential()
        for i in range(n):
            cfg = BlockConfig(channels, cout, stage.kernel, stage.stride if i == 0 else 1,
                              stage.expand_ratio, stage.se_ratio, stage.num_experts, stage.skip,
                              bn_eps, tf_same, drop_path_rate * index / total, backend)
            blocks.append(DepthwiseSeparable(cfg) if stage.block == "ds"
                          else InvertedResidual(cfg))
            channels = cout
            index += 1
        out.append(blocks)
    return out, channels

