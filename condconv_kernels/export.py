"""Exporting models that contain CondConv layers.

- :func:`decomposed`: a context manager under which every fused layer
  (:class:`~condconv_kernels.nn.CondConv2d`, ``DynamicConv2d``, ``ODConv2d``) of a model
  computes with standard PyTorch ops (unfold + batched matmul), which any exporter can translate.
  The batch size stays symbolic: unlike timm's grouped-convolution trick, no group count depends
  on it.
- :func:`export_onnx`: ONNX export with a dynamic batch dimension, through that decomposition.

``torch.export.export`` and ``torch.compile`` need neither: they keep each CondConv as one
``condconv::condconv2d`` node (the op has a fake implementation and symbolic-shape support).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .nn import FusedConv2d

__all__ = ["decomposed", "export_onnx"]


@contextlib.contextmanager
def decomposed(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every fused layer (CondConv2d, DynamicConv2d, ODConv2d) in ``model``
    uses the standard-op form (unfold + batched matmul). The previous setting of each layer is
    restored on exit."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"decomposed: argument 'model' must be an nn.Module, "
                        f"got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, FusedConv2d)]
    before = [m.decompose for m in layers]
    try:
        for m in layers:
            m.decompose = True
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.decompose = flag


def _example_input(model: nn.Module, example_input: Optional[torch.Tensor],
                   input_size: Optional[Sequence[int]]) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
            raise ValueError("export_onnx: argument 'example_input' must be a 4-D tensor "
                             "(B, C, H, W)")
        return example_input
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size")
        if input_size is None:
            raise ValueError("export_onnx: argument 'input_size' (C, H, W) is required when the "
                             "model has no pretrained_cfg['input_size'] and no example_input "
                             "is given")
    input_size = tuple(input_size)
    if len(input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in input_size):
        raise ValueError(f"export_onnx: argument 'input_size' must be (C, H, W) positive ints, "
                         f"got {input_size!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    # Batch 2, not 1: an exporter may specialise a dimension of size 1.
    return torch.randn((2,) + input_size, device=device, dtype=dtype)


def export_onnx(model: nn.Module, path: str, example_input: Optional[torch.Tensor] = None,
                input_size: Optional[Sequence[int]] = None, dynamic_batch: bool = True,
                opset_version: int = 18, input_name: str = "input",
                output_name: str = "logits") -> str:
    """Exports ``model`` to ONNX at ``path`` and returns the path.

    CondConv layers are decomposed into Unfold-equivalent gathers and batched MatMuls (see
    :func:`decomposed`), so the file runs on any ONNX runtime and, with ``dynamic_batch``
    (the default), at any batch size.

    Args:
        model: a module taking one (B, C, H, W) tensor; put into eval mode for the export and
            restored afterwards.
        path: the .onnx file to write (written to a temporary name, then renamed).
        example_input: a (B, C, H, W) tensor to trace with; otherwise one is made from
            ``input_size`` or the model's ``pretrained_cfg["input_size"]``.
        dynamic_batch: export the batch dimension as symbolic.
        opset_version: the ONNX opset (18 or later).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: argument 'model' must be an nn.Module, "
                        f"got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"export_onnx: argument 'path' must be a file path, got {path!r}")
    try:
        import onnxscript  # noqa: F401  (the exporter's dependency; a clear error if missing)
    except ImportError as err:
        raise RuntimeError("export_onnx needs the 'onnx' and 'onnxscript' packages: "
                           "pip install onnx onnxscript") from err
    x = _example_input(model, example_input, input_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch \
        else None
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    was_training = model.training
    model.eval()
    try:
        with decomposed(model), torch.no_grad():
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                        opset_version=opset_version, input_names=[input_name],
                                        output_names=[output_name], verbose=False)
        program.save(tmp)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
