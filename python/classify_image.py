"""Classify an image with an EfficientNet-CondConv through the library API (see also the
`condconv-classify` command).

    python python/classify_image.py --checkpoint tf_efficientnet_cc_b0_8e.safetensors \\
        --image panda.jpg [--model tf_efficientnet_cc_b0_8e] [--labels labels_map.txt]

Any timm checkpoint of the same model loads unchanged.
"""
import argparse

from condconv_kernels.classify import classify, load_labels
from condconv_kernels.models import create_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tf_efficientnet_cc_b0_8e")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--labels")
    args = p.parse_args()
    model = create_model(args.model, pretrained_path=args.checkpoint)
    print("preprocessing:", {k: model.pretrained_cfg[k]
                             for k in ("input_size", "crop_pct", "interpolation")})
    for index, label, prob in classify(model, args.image, load_labels(args.labels)):
        print(f"{prob:7.4f}  {label} ({index})")


if __name__ == "__main__":
    main()
