"""Profiling: the CondConv layer shapes of real models and a timing harness shared by the
benchmarks in bench/."""
from .layers import LayerShape, efficientnet_cc_b0_layers
from .timing import Measurement, machine_info, time_callable

__all__ = ["LayerShape", "efficientnet_cc_b0_layers", "Measurement", "machine_info",
           "time_callable"]
