"""A CondConv block on random data: routing, expand / depthwise / project CondConvs sharing one
routing function (as in EfficientNet-CondConv), a few training steps, and how the per-example
weights differ.

    python python/condconv_demo.py [--backend auto] [--experts 8]
"""

import torch
import torch.nn.functional as F

import condconv_kernels as cc
from condconv_kernels.cli import parser
from condconv_kernels import nn as ccnn


class CondConvBlock(torch.nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project, all CondConv."""

    def __init__(self, channels, expand=4, kernel=5, experts=8, backend="auto"):
        super().__init__()
        mid = channels * expand
        self.routing = ccnn.CondConvRouting(channels, experts)
        self.expand = ccnn.CondConv2d(channels, mid, 1, num_experts=experts, backend=backend)
        self.dw = ccnn.CondConv2d(mid, mid, kernel, padding="same", groups=mid,
                                  num_experts=experts, backend=backend)
        self.project = ccnn.CondConv2d(mid, channels, 1, num_experts=experts, backend=backend)

    def forward(self, x):
        r = self.routing(x)
        h = F.silu(self.expand(x, r))
        h = F.silu(self.dw(h, r))
        return x + self.project(h, r)


def main():
    p = parser(__doc__)
    p.add_argument("--backend", default="auto", help="The condconv2d backend to run on.")
    p.add_argument("--experts", type=int, default=8, help="Experts per CondConv layer.")
    args = p.parse_args()
    print("available backends on cpu:", cc.available_backends("cpu"))
    torch.manual_seed(0)
    block = CondConvBlock(32, experts=args.experts, backend=args.backend)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    x = torch.randn(4, 32, 14, 14)
    target = torch.randn(4, 32, 14, 14)
    for step in range(3):
        loss = F.mse_loss(block(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    print("routing weights per example (each example gets its own kernel mix):")
    for b, row in enumerate(block.routing(x).detach().tolist()):
        print(f"  example {b}: " + " ".join(f"{v:.3f}" for v in row))


if __name__ == "__main__":
    main()
