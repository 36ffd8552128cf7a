"""Classify an image with an EfficientNet-CondConv through the library API (see also the
`condconv-classify` command).

    python python/classify_image.py --image panda.jpg [--model tf_efficientnet_cc_b0_8e]
        [--checkpoint tf_efficientnet_cc_b0_8e.safetensors] [--labels labels_map.txt]

Without --checkpoint the released ImageNet weights are used (downloaded once). Any timm
checkpoint of the same model loads unchanged.
"""
from condconv_kernels.classify import classify, load_labels
from condconv_kernels.cli import parser
from condconv_kernels.models import create_model


def main():
    p = parser(__doc__)
    p.add_argument("--model", default="tf_efficientnet_cc_b0_8e", help="The model's name.")
    p.add_argument("--checkpoint", help="A state dict to load instead of the released weights.")
    p.add_argument("--image", required=True, help="The image file to classify.")
    p.add_argument("--labels", help="A JSON map of class index -> name (default: the ImageNet "
                                    "class names shipped with the package).")
    args = p.parse_args()
    model = create_model(args.model, pretrained_path=args.checkpoint,
                         pretrained=args.checkpoint is None)
    print("preprocessing:", {k: model.pretrained_cfg[k]
                             for k in ("input_size", "crop_pct", "interpolation")})
    for index, label, prob in classify(model, args.image, load_labels(args.labels)):
        print(f"{prob:7.4f}  {label} ({index})")


if __name__ == "__main__":
    main()
