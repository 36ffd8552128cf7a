"""Classify an image with an EfficientNet(-CondConv): the model's own preprocessing (resize by
the crop fraction, bicubic, center crop, mean/std normalisation), softmax, top-k.

    condconv-classify --model tf_efficientnet_cc_b0_8e --checkpoint ckpt.safetensors \\
                      --image panda.jpg [--labels labels_map.txt] [--topk 5] [--backend auto]

The labels map is JSON of class index -> name (as TensorFlow's eval data ships it).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["preprocess", "load_labels", "classify", "main"]

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


def load_labels(path: Optional[str]) -> Dict[int, str]:
    """JSON {"0": "tench, Tinca tinca", ...} -> {0: "tench, Tinca tinca", ...}."""
    if path is None:
        return {}
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
    from .models import create_model, list_models
    p = argparse.ArgumentParser(prog="condconv-classify", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    p.add_argument("--checkpoint", help="state dict (.safetensors or .pth), e.g. from timm")
    p.add_argument("--image", required=True)
    p.add_argument("--labels", help="JSON map of class index -> name")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    try:
        model = create_model(args.model, pretrained_path=args.checkpoint, backend=args.backend)
        labels = load_labels(args.labels)
        results = classify(model, args.image, labels, args.topk)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        print(f"condconv-classify: error: {exc}", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        print("WARNING: no --checkpoint given: the model has RANDOM weights and these "
              "predictions mean nothing", file=sys.stderr)
    print(f"{args.model} on {args.image}:")
    for rank, (index, label, prob) in enumerate(results, 1):
        print(f"  {rank}. {label} (class {index}): {prob:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
