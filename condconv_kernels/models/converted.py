"""ResNet-18 and MobileNetV2 built here (torchvision's module names and layout, no download),
and their dynamic-convolution versions made by :func:`condconv_kernels.convert_model`:

    resnet18-odconv4, resnet18-dynamic4, resnet18-condconv4,
    mobilenetv2-odconv4, mobilenetv2-dynamic4, mobilenetv2-condconv4

(``<architecture>-<kind><experts>``, any expert count). As the papers' converted networks: the
ResNet's 3x3 convolutions in its blocks, and every convolution of MobileNetV2's inverted
residual blocks, become dynamic; the stems, the shortcut projections and MobileNetV2's last 1x1
stay static. ``condconv=False`` gives the static network.
"""
from __future__ import annotations

import re
from typing import List

from torch import nn

_IMAGENET = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_NAME = re.compile(r"^(resnet18|mobilenetv2)-(condconv|dynamic|odconv)(\d+)$")


class BasicBlock(nn.Module):
    """3x3 - BN - ReLU - 3x3 - BN plus the input (a 1x1 projection where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18: 7x7/2 stem, max pool, four stages of two basic blocks (64, 128, 256, 512),
    pool, FC. Shapes: (B, 3, H, W) -> (B, num_classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride),
                                                         BasicBlock(width, width, 1)))
            cin = width
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*(layers + ([nn.ReLU6(inplace=True)] if act else [])))


class InvertedResidual(nn.Module):
    """1x1 expand (unless the ratio is 1) - depthwise 3x3 - 1x1 linear projection; residual
    where stride 1 keeps the width."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, mid, 1)]
        layers += [_conv_bn(mid, mid, 3, stride, groups=mid), _conv_bn(mid, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0): 3x3/2 stem, 17 inverted residual blocks, 1x1 to 1280, pool, FC.
    Shapes: (B, 3, H, W) -> (B, num_classes)."""

    # (expansion, width, repeats, first stride)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features: List[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for expand, width, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                features.append(InvertedResidual(cin, width, stride if i == 0 else 1, expand))
                cin = width
        features.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


# Which convolutions each architecture converts (fnmatch patterns on module names).
_CONVERT = {"resnet18": dict(include=["layer*.conv1", "layer*.conv2"]),
            "mobilenetv2": dict(include=["features.*.conv.*.0"])}
_BUILD = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2}


def converted_models() -> List[str]:
    """The names listed (four experts of each kind); any expert count is accepted."""
    return [f"{arch}-{kind}4" for arch in _BUILD for kind in ("condconv", "dynamic", "odconv")]


def is_converted_name(name: str) -> bool:
    return isinstance(name, str) and _NAME.match(name) is not None


def create_converted(name: str, num_classes: int = 1000, condconv: bool = True,
                     backend: str = "auto") -> nn.Module:
    """The network ``<architecture>-<kind><experts>`` (see the module docstring), randomly
    initialised; ``condconv=False``: the static network. ``model.pretrained_cfg`` holds ImageNet's
    input size and normalisation."""
    from ..convert import convert_model
    found = _NAME.match(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"create_model: unknown model name {name!r}")
    arch, kind, experts = found.group(1), found.group(2), int(found.group(3))
    model = _BUILD[arch](num_classes)
    if condconv:
        model = convert_model(model, kind, experts, backend=backend, **_CONVERT[arch])
    model.pretrained_cfg = dict(_IMAGENET, architecture=name, num_classes=num_classes)
    return model
