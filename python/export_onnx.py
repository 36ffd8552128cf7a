"""Export an EfficientNet-CondConv to ONNX with a dynamic batch, and check it with onnxruntime.

    python python/export_onnx.py --model tf_efficientnet_cc_b0_8e [--checkpoint ckpt.safetensors] \\
        [--out model.onnx] [--input-size 224]

The CondConv layers are written as standard ONNX ops (unfold-equivalent gathers + batched
MatMul), so the file runs on any ONNX runtime at any batch size.
"""

import torch

from condconv_kernels.cli import parser
from condconv_kernels.export import export_onnx
from condconv_kernels.models import create_model


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default="tf_efficientnet_cc_b0_8e", help="The model to export.")
    p.add_argument("--checkpoint", default=None,
                   help="Weights to load (timm's checkpoints load unchanged).")
    p.add_argument("--out", default=None, help="The .onnx file to write (default: MODEL.onnx).")
    p.add_argument("--input-size", type=int, default=None,
                   help="The image side (default: the model's own input size).")
    args = p.parse_args(argv)
    model = create_model(args.model, pretrained_path=args.checkpoint).eval()
    side = args.input_size or model.pretrained_cfg["input_size"][-1]
    out = export_onnx(model, args.out or f"{args.model}.onnx", input_size=(3, side, side))
    print(f"wrote {out}")
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime is not installed: the file was not checked")
        return
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, side, side)
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = model(x)
        err = ((torch.from_numpy(got) - want).norm() / want.norm()).item()
        print(f"batch {batch}: onnxruntime vs PyTorch relative error {err:.2e}")


if __name__ == "__main__":
    main()
