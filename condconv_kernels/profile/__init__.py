"""Profiling: multiply-adds and parameters as the papers count them, CondConv layer shapes,
latency of fused / unfused / static variants, and the condconv-profile command."""
from .layers import LayerShape, efficientnet_cc_b0_layers
from .madds import LayerCount, count_madds, count_params, flop_counter_part, madds_breakdown
from .timing import Measurement, machine_info, time_callable

__all__ = ["LayerShape", "efficientnet_cc_b0_layers", "LayerCount", "count_madds",
           "count_params", "flop_counter_part", "madds_breakdown", "Measurement",
           "machine_info", "time_callable"]
