"""Train a small CondConv CNN on a real dataset: scikit-learn's handwritten digits (1797 images of
8x8, shipped inside the package, so nothing is downloaded), next to the same network with static
convolutions. Gradients go through condconv_kernels' handwritten backward.

    python python/train_digits.py [--epochs 30] [--experts 4] [--backend auto] [--save ckpt.safetensors]

Prints the test accuracy of both networks after each epoch; with ``--save`` the CondConv
network's weights are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from condconv_kernels.cli import parser
from condconv_kernels.models import save_checkpoint
from condconv_kernels.nn import CondConv2d, CondConvRouting


class DigitsNet(nn.Module):
    """conv 3x3 (1->32) -> [routing -> conv 3x3 (32->64) -> conv 3x3 s2 (64->64)] -> pool -> FC.

    With ``experts`` > 0 the two bracketed convolutions are CondConv layers sharing one routing
    function; with ``experts`` = 0 they are plain ``nn.Conv2d`` (the static baseline).
    Shapes: (B, 1, 8, 8) -> (B, 10)."""

    def __init__(self, experts: int = 4, backend: str = "auto"):
        super().__init__()
        self.experts = experts
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        if experts:
            self.routing = CondConvRouting(32, experts)
            self.conv1 = CondConv2d(32, 64, 3, num_experts=experts, backend=backend)
            self.conv2 = CondConv2d(64, 64, 3, stride=2, num_experts=experts, backend=backend)
        else:
            self.conv1 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.bn2 = nn.BatchNorm2d(64)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.experts:
            r = self.routing(x)
            x = F.relu(self.bn1(self.conv1(x, r)))
            x = F.relu(self.bn2(self.conv2(x, r)))
        else:
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def load_digits(seed: int = 0, test_fraction: float = 0.25):
    """scikit-learn's digits as (x_train, y_train, x_test, y_test); x is (N, 1, 8, 8) float32
    scaled to [0, 1], the split stratified by class."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise SystemExit("train_digits needs scikit-learn: pip install scikit-learn") from err
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(epochs: int = 30, experts: int = 4, backend: str = "auto", batch_size: int = 64,
          lr: float = 3e-3, seed: int = 0, save: Optional[str] = None,
          progress: bool = True) -> Dict[str, List[float]]:
    """Trains the CondConv and the static network side by side; returns the test accuracy of
    each after every epoch: {"condconv": [...], "static": [...], "seconds": [cc, static]}."""
    from tqdm import tqdm

    if epochs < 1:
        raise ValueError(f"train: argument 'epochs' must be >= 1, got {epochs}")
    if experts < 1:
        raise ValueError(f"train: argument 'experts' must be >= 1, got {experts}")
    x_train, y_train, x_test, y_test = load_digits(seed)
    torch.manual_seed(seed)
    models = {"condconv": DigitsNet(experts, backend), "static": DigitsNet(0)}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)
              for k, m in models.items()}
    scheds = {k: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=epochs * (
        (len(y_train) + batch_size - 1) // batch_size)) for k, o in optims.items()}
    history = {k: [] for k in models}
    seconds = {k: 0.0 for k in models}
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(1, epochs + 1), desc="digits", disable=not progress, unit="epoch")
    for epoch in bar:
        order = torch.randperm(len(y_train), generator=generator)
        for name, model in models.items():
            start = time.perf_counter()
            model.train()
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                optims[name].zero_grad()
                loss.backward()
                optims[name].step()
                scheds[name].step()
            seconds[name] += time.perf_counter() - start
            history[name].append(accuracy(model, x_test, y_test))
        line = (f"epoch {epoch:3d}  test accuracy: condconv {history['condconv'][-1]:.2%}  "
                f"static {history['static'][-1]:.2%}")
        if progress:
            bar.write(line)
    if save:
        save_checkpoint(models["condconv"], save)
    history["seconds"] = [seconds["condconv"], seconds["static"]]
    return history


def main(argv=None) -> Dict[str, List[float]]:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=30, help="Passes over the training set.")
    p.add_argument("--experts", type=int, default=4, help="Experts per CondConv layer.")
    p.add_argument("--backend", default="auto", help="The condconv2d backend to train on.")
    p.add_argument("--batch-size", type=int, default=64, help="Images per training step.")
    p.add_argument("--lr", type=float, default=3e-3, help="The optimizer's learning rate.")
    p.add_argument("--seed", type=int, default=0, help="The seed of the split and the weights.")
    p.add_argument("--save", default=None, help="Write the CondConv net's weights here.")
    args = p.parse_args(argv)
    history = train(args.epochs, args.experts, args.backend, args.batch_size, args.lr,
                    args.seed, args.save)
    cc_s, static_s = history["seconds"]
    print(f"final test accuracy: condconv {history['condconv'][-1]:.2%} ({cc_s:.1f} s training), "
          f"static {history['static'][-1]:.2%} ({static_s:.1f} s training)")
    return history


if __name__ == "__main__":
    main()
