"""Classify an image with an EfficientNet(-CondConv): the model's own preprocessing (resize by
the crop fraction, bicubic, center crop, mean/std normalisation), softmax, top-k.

    condconv-classify --model tf_efficientnet_cc_b0_8e --pretrained --image panda.jpg
    condconv-classify --model tf_efficientnet_cc_b0_8e --checkpoint ckpt.safetensors \\
                      --image panda.jpg [--labels labels_map.txt] [--topk 5] [--backend auto]

--pretrained downloads the released ImageNet weights once (into the torch hub cache, hash
checked). Labels are the ImageNet class names shipped with the package, or a JSON map of class
index -> name given with --labels (as TensorFlow's eval data ships it, labels_map.txt).
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["preprocess", "imagenet_labels", "load_labels", "classify", "main"]

_INTERPOLATION = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def open_image(path: str):
    """The image at ``path`` as RGB; ValueError when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"classify: argument 'image': no file {path!r}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"classify: argument 'image': {path!r} is not an image ({exc})") from exc


def preprocess(image, cfg: Dict[str, object]) -> torch.Tensor:
    """PIL image -> (3, S, S) float tensor: resize the short side to S / crop_pct, center crop
    S x S, scale to [0, 1], normalise with the model's mean/std (S = cfg input size)."""
    from PIL import Image
    size = int(cfg["input_size"][-1])
    scaled = int(size / float(cfg["crop_pct"]))
    w, h = image.size
    if w <= h:
        new_w, new_h = scaled, max(1, round(h * scaled / w))
    else:
        new_w, new_h = max(1, round(w * scaled / h)), scaled
    resample = getattr(Image.Resampling, _INTERPOLATION[str(cfg["interpolation"])])
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = pixels.view(size, size, 3).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    return (x - mean) / std


def imagenet_labels() -> Dict[int, str]:
    """The 1000 ImageNet class names shipped with the package (short names, e.g. 0 -> "tench",
    388 -> "giant panda"), in the class order of the released models."""
    from importlib.resources import files
    text = files("condconv_kernels").joinpath("data/imagenet_classes.txt").read_text()
    return {i: name.replace("_", " ") for i, name in enumerate(text.splitlines())}


def load_labels(path: Optional[str]) -> Dict[int, str]:
    """JSON {"0": "tench, Tinca tinca", ...} -> {0: "tench, Tinca tinca", ...}; ``None``: the
    ImageNet class names of :func:`imagenet_labels`."""
    if path is None:
        return imagenet_labels()
    try:
        with open(path) as f:
            raw = json.load(f)
        return {int(k): str(v) for k, v in raw.items()}
    except FileNotFoundError:
        raise FileNotFoundError(f"classify: argument 'labels': no file {path!r}") from None
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"classify: argument 'labels': {path!r} is not a JSON map of class "
                         f"index to name ({exc})") from exc


@torch.no_grad()
def classify(model: torch.nn.Module, image_path: str, labels: Optional[Dict[int, str]] = None,
             topk: int = 5) -> List[Tuple[int, str, float]]:
    """Top-k (class index, label, probability) for one image."""
    model.eval()
    x = preprocess(open_image(image_path), model.pretrained_cfg).unsqueeze(0)
    probs = torch.softmax(model(x).float(), dim=-1)[0]
    values, indices = probs.topk(min(topk, probs.numel()))
    labels = labels or {}
    return [(int(i), labels.get(int(i), f"class {int(i)}"), float(p))
            for p, i in zip(values, indices)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import parser
    from .models import create_model, list_models
    from .models.pretrained import pretrained_models
    p = parser(__doc__, prog="condconv-classify")
    p.add_argument("--model", required=True,
                   help=f"The model's name, one of: {', '.join(list_models())}.")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="Use the released ImageNet weights (downloaded once, hash checked); "
                              f"these models have them: {', '.join(pretrained_models())}.")
    weights.add_argument("--checkpoint", help="A state dict to load (.safetensors or .pth); "
                                              "timm's checkpoints load unchanged.")
    p.add_argument("--image", required=True, help="The image file to classify (any format "
                                                  "Pillow reads).")
    p.add_argument("--labels", help="A JSON map of class index -> name; without it, the ImageNet "
                                    "class names shipped with the package are used.")
    p.add_argument("--topk", type=int, default=5, help="How many classes to print.")
    p.add_argument("--backend", default="auto",
                   help="The condconv2d backend of the CondConv layers (auto, cpu, reference, "
                        "triton or cuda).")
    args = p.parse_args(argv)
    if args.topk < 1:
        p.error(f"argument --topk: must be at least 1, got {args.topk}")
    try:
        model = create_model(args.model, pretrained_path=args.checkpoint, backend=args.backend,
                             pretrained=args.pretrained)
        labels = load_labels(args.labels)
        results = classify(model, args.image, labels, args.topk)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        print(f"condconv-classify: error: {exc}", file=sys.stderr)
        return 2
    if args.checkpoint is None and not args.pretrained:
        print("WARNING: neither --pretrained nor --checkpoint given: the model has RANDOM "
              "weights and these predictions mean nothing", file=sys.stderr)
    print(f"{args.model} on {args.image}:")
    for rank, (index, label, prob) in enumerate(results, 1):
        print(f"  {rank}. {label} (class {index}): {prob:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
