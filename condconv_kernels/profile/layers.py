"""The CondConv layers of EfficientNet-CondConv at their real shapes."""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

from .._args import same_padding

# EfficientNet-B0's last three stages, the ones with experts in tf_efficientnet_cc_b0_*:
# (repeats, kernel, stride, expand ratio, output channels).
_B0_CONDCONV_STAGES = [(3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
_B0_STAGE5_INPUT = 80       # channels into the first CondConv stage
_B0_STAGE5_REDUCTION = 16   # its input resolution is image_size / 16


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One CondConv layer: x (B, cin, height, width), weight (E, cout, cin/groups, k, k)."""
    name: str
    cin: int
    cout: int
    height: int
    width: int
    kernel: int
    stride: int
    groups: int
    experts: int
    padding: Tuple[int, int, int, int]   # TF "same": (top, bottom, left, right)
    scales: Tuple[bool, bool, bool] = (False, False, False)  # in, out, tap (ODConv's)

    @property
    def out_hw(self) -> Tuple[int, int]:
        return ((self.height + self.padding[0] + self.padding[1] - self.kernel) // self.stride + 1,
                (self.width + self.padding[2] + self.padding[3] - self.kernel) // self.stride + 1)

    def madds(self, batch: int) -> int:
        """Convolution multiply-adds for a batch (without the expert mix)."""
        ho, wo = self.out_hw
        return batch * self.cout * ho * wo * (self.cin // self.groups) * self.kernel ** 2

    def work(self, batch: int, itemsize: int, backward: bool = False) -> Tuple[int, int]:
        """(floating-point operations, fewest bytes moved) of one fused call on a batch.

        Operations: 2 per multiply-add of the convolution, plus the expert mix, B * E * |W|
        multiply-adds (the op's FLOP formula). The backward adds grad_x's and the kernel
        gradient's convolutions and three more passes of mix size: the backward's mix and the
        folds into grad_weight and grad_routing. Bytes: each input read once and each output
        written once, in ``itemsize`` bytes per element (routing in float32): x, the experts,
        the output; and for the backward also grad_out, grad_x and grad_weight.
        """
        ho, wo = self.out_hw
        kernel_numel = self.cout * (self.cin // self.groups) * self.kernel ** 2
        conv, mix = self.madds(batch), batch * self.experts * kernel_numel
        x, out = batch * self.cin * self.height * self.width, batch * self.cout * ho * wo
        experts = self.experts * kernel_numel
        routing_bytes = batch * self.experts * 4
        if not backward:
            return 2 * (conv + mix), (x + experts + out) * itemsize + routing_bytes
        return (2 * (3 * conv + 4 * mix),
                (2 * (x + experts + out)) * itemsize + 2 * routing_bytes)

    def describe(self) -> str:
        kind = "dw" if self.groups > 1 else "pw" if self.kernel == 1 else "conv"
        return (f"{kind} {self.kernel}x{self.kernel}/s{self.stride} {self.cin}->{self.cout} "
                f"@{self.height}x{self.width}")


def efficientnet_cc_b0_layers(num_experts: int = 8, image_size: int = 224) -> List[LayerShape]:
    """The 24 CondConv layers of tf_efficientnet_cc_b0_{4e,8e} (stages 5-7: expand 1x1,
    depthwise kxk, project 1x1 in each of 8 blocks), in network order."""
    size = -(-image_size // _B0_STAGE5_REDUCTION)
    cin = _B0_STAGE5_INPUT
    layers = []
    for stage, (repeats, k, stride, expand, cout) in enumerate(_B0_CONDCONV_STAGES, start=5):
        for block in range(repeats):
            s = stride if block == 0 else 1
            mid = cin * expand
            tag = f"s{stage}.b{block}"
            layers.append(LayerShape(f"{tag}.expand", cin, mid, size, size, 1, 1, 1,
                                     num_experts, (0, 0, 0, 0)))
            pad = same_padding(size, k, s, 1) * 2
            dw = LayerShape(f"{tag}.dw", mid, mid, size, size, k, s, mid, num_experts, pad)
            layers.append(dw)
            size = dw.out_hw[0]
            layers.append(LayerShape(f"{tag}.project", mid, cout, size, size, 1, 1, 1,
                                     num_experts, (0, 0, 0, 0)))
            cin = cout
    return layers


def resnet_condconv_layers(num_experts: int = 4) -> List[LayerShape]:
    """Dense 3x3 CondConv layers at the shapes of a ResNet-18/34 at 224 (one per stage, and the
    stride-2 entries of stages 3-5): the kxk dense path, which EfficientNet does not use."""
    shapes = [("r2.conv", 64, 64, 56, 1), ("r3.down", 64, 128, 56, 2), ("r3.conv", 128, 128, 28, 1),
              ("r4.down", 128, 256, 28, 2), ("r4.conv", 256, 256, 14, 1),
              ("r5.down", 256, 512, 14, 2), ("r5.conv", 512, 512, 7, 1)]
    return [LayerShape(name, cin, cout, size, size, 3, stride, 1, num_experts, (1, 1, 1, 1))
            for name, cin, cout, size, stride in shapes]
