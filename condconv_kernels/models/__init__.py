"""EfficientNet / EfficientNet-CondConv models, timm-compatible state dicts, compound scaling."""
from .blocks import BlockArgs, decode_block_string, encode_block_string, round_channels, scale_depth
from .efficientnet import (B0_CONDCONV_STAGES, B0_STAGES, EfficientNet, create_model,
                           list_models, load_checkpoint, save_checkpoint)

__all__ = ["BlockArgs", "decode_block_string", "encode_block_string", "round_channels",
           "scale_depth", "EfficientNet", "create_model", "list_models", "load_checkpoint",
           "save_checkpoint",
           "B0_STAGES", "B0_CONDCONV_STAGES"]
