"""Dynamic convolutions in an existing CNN with one call: a ResNet-style and a MobileNetV2-style
network, both built here, converted by condconv_kernels.convert_model (DynamicConv by default,
or ODConv / CondConv), trained a few epochs on scikit-learn's digits upsampled to 16x16, then
timed fused against the unfused grouped-convolution form (the same converted model on the
reference backend, which materialises every example's kernel as the public implementations do).

    python python/convert_resnet.py [--kind dynamic|odconv|condconv] [--experts 4] [--epochs 8]

Prints each network's test accuracy after every epoch, then a table of milliseconds per batch
(inference and training step), fused vs unfused, measured in this run.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from condconv_kernels import convert_model
from condconv_kernels.cli import parser
from condconv_kernels.nn import FusedConv2d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import accuracy, load_digits  # noqa: E402  (the sibling example)

SIDE = 16


class BasicBlock(nn.Module):
    """ResNet's basic block: 3x3 - BN - ReLU - 3x3 - BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """stem 3x3 (1->16) -> blocks 16, 32 (s2), 64 (s2) -> pool -> FC. (B, 1, H, W) -> (B, 10)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2),
                                    BasicBlock(32, 64, 2))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand - depthwise 3x3 - 1x1 project (linear), residual when the
    shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class TinyMobileNetV2(nn.Module):
    """stem 3x3 (1->16) -> inverted residuals 16, 24 (s2), 24, 32 (s2) -> 1x1 (->64) -> pool ->
    FC. (B, 1, H, W) -> (B, 10)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1), InvertedResidual(24, 32, 2))
        self.last = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU6())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.last(self.blocks(self.stem(x))).mean((2, 3)))


def upsampled_digits(seed: int = 0):
    """scikit-learn's digits split as train_digits does, each image upsampled to SIDE x SIDE."""
    x_train, y_train, x_test, y_test = load_digits(seed)

    def up(x):
        return F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return up(x_train), y_train, up(x_test), y_test


def set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            m.backend = backend


def ms_per_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool,
                 repeats: int = 5) -> float:
    """Median milliseconds of one inference (or forward + backward) of the batch."""
    model.train(train)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        if train:
            F.cross_entropy(model(x), y).backward()
        else:
            with torch.no_grad():
                model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times[1:])[repeats // 2]


def run(kind: str = "dynamic", experts: int = 4, epochs: int = 8, batch_size: int = 64,
        lr: float = 3e-3, seed: int = 0, progress: bool = True) -> Dict[str, dict]:
    """Converts, trains and times both networks; returns {network: {"accuracy": [...],
    "ms": {mode: {"fused": ms, "unfused": ms}}}}."""
    if epochs < 1:
        raise ValueError(f"run: argument 'epochs' must be >= 1, got {epochs}")
    x_train, y_train, x_test, y_test = upsampled_digits(seed)
    torch.manual_seed(seed)
    results = {}
    for name, net in (("resnet", TinyResNet()), ("mobilenetv2", TinyMobileNetV2())):
        # The stem reads the 1-channel image: too few channels for an attention; keep it.
        model = convert_model(net, kind, experts, exclude=["stem.*"])
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(y_train) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        generator = torch.Generator().manual_seed(seed)
        accuracies = []
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(y_train), generator=generator)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            accuracies.append(accuracy(model, x_test, y_test))
            if progress:
                print(f"{name} ({kind}) epoch {epoch}: test accuracy {accuracies[-1]:.2%}")
        xb, yb = x_train[:batch_size], y_train[:batch_size]
        ms = {}
        for mode in ("inference", "training step"):
            ms[mode] = {}
            for label, backend in (("fused", "auto"), ("unfused", "reference")):
                set_backend(model, backend)
                ms[mode][label] = ms_per_batch(model, xb, yb, mode != "inference")
            set_backend(model, "auto")
        results[name] = {"accuracy": accuracies, "ms": ms}
    return results


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--kind", default="dynamic", choices=["dynamic", "odconv", "condconv"],
                   help="Which layers replace the convolutions.")
    p.add_argument("--experts", type=int, default=4, help="Kernels per converted layer.")
    p.add_argument("--epochs", type=int, default=8, help="Passes over the training set.")
    p.add_argument("--batch-size", type=int, default=64, help="Images per training step.")
    p.add_argument("--seed", type=int, default=0, help="The seed of the split and the weights.")
    args = p.parse_args(argv)
    results = run(args.kind, args.experts, args.epochs, args.batch_size, seed=args.seed)
    print("\n| network | test accuracy | mode | fused ms | unfused ms | speedup |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        for mode, t in r["ms"].items():
            print(f"| {name} | {r['accuracy'][-1]:.2%} | {mode} | {t['fused']:.2f} | "
                  f"{t['unfused']:.2f} | {t['unfused'] / t['fused']:.2f}x |")
    return results


if __name__ == "__main__":
    main()
