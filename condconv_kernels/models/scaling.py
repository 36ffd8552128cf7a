"""Compound scaling (Tan & Le, 2019): depth d = alpha^phi, width w = beta^phi, resolution
r = gamma^phi, under alpha * beta^2 * gamma^2 ~= max_cost and alpha, beta, gamma >= 1.

- :func:`compound_cost` / :func:`cost_error_fn`: the FLOP multiplier of a choice and its squared
  error against the budget.
- :func:`search_coefficients`: a grid search returning candidates sorted by that error.
- :func:`efficientnet_from_coefficients`: a model from width/depth/resolution multipliers, with
  or without CondConv experts.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, List, Optional, Sequence

from .efficientnet import B0_CONDCONV_STAGES, B0_STAGES, EfficientNet

__all__ = ["Coefficients", "compound_cost", "cost_error_fn", "search_coefficients",
           "efficientnet_from_coefficients", "PAPER_COEFFICIENTS"]


@dataclasses.dataclass(frozen=True)
class Coefficients:
    alpha: float   # depth base
    beta: float    # width base
    gamma: float   # resolution base
    cost: float    # (alpha * beta^2 * gamma^2) ** phi
    error: float   # (cost - max_cost) ** 2


# The grid-search result reported for EfficientNet-B0 (phi = 1, max_cost = 2).
PAPER_COEFFICIENTS = (1.2, 1.1, 1.15)


def compound_cost(alpha: float, beta: float, gamma: float, phi: float = 1.0) -> float:
    """FLOPs multiplier of scaling depth by alpha^phi, width by beta^phi, resolution by
    gamma^phi (FLOPs grow linearly in depth, quadratically in width and resolution)."""
    return (alpha * beta ** 2 * gamma ** 2) ** phi


def cost_error_fn(phi: float = 1.0, max_cost: float = 2.0) -> Callable[[float, float, float],
                                                                        float]:
    """The search objective: (compound_cost - max_cost)^2."""
    def error(alpha: float, beta: float, gamma: float) -> float:
        return (compound_cost(alpha, beta, gamma, phi) - max_cost) ** 2
    return error


def search_coefficients(phi: float = 1.0, max_cost: float = 2.0, search_per_coeff: int = 10,
                        tol: Optional[float] = None,
                        error_fn: Optional[Callable[[float, float, float], float]] = None,
                        ) -> List[Coefficients]:
    """Grid search over alpha, beta, gamma >= 1 (``search_per_coeff`` values each, up to the
    largest value the budget allows for that coefficient alone), sorted by ``error_fn``
    (default :func:`cost_error_fn`); with ``tol``, only candidates whose error is <= tol."""
    if phi <= 0 or max_cost <= 1 or search_per_coeff < 2:
        raise ValueError("search_coefficients: need phi > 0, max_cost > 1 and "
                         "search_per_coeff >= 2")
    error_fn = error_fn or cost_error_fn(phi, max_cost)
    budget = max_cost ** (1.0 / phi)

    def grid(upper):
        return [1.0 + (upper - 1.0) * i / (search_per_coeff - 1) for i in range(search_per_coeff)]
    found = [Coefficients(a, b, g, compound_cost(a, b, g, phi), error_fn(a, b, g))
             for a, b, g in itertools.product(grid(budget), grid(budget ** 0.5),
                                              grid(budget ** 0.5))]
    found.sort(key=lambda c: c.error)
    return [c for c in found if tol is None or c.error <= tol]


def efficientnet_from_coefficients(width: float = 1.0, depth: float = 1.0,
                                   resolution: int = 224, num_experts: int = 0,
                                   tf: bool = False, stages: Optional[Sequence[str]] = None,
                                   **kwargs) -> EfficientNet:
    """An EfficientNet scaled by width/depth multipliers (for phi: width = beta^phi,
    depth = alpha^phi, resolution = round(224 * gamma^phi)). ``num_experts`` > 0 puts that many
    CondConv experts in the last three stages (EfficientNet-CondConv); ``stages`` overrides
    the B0 block strings."""
    if stages is None:
        stages = B0_CONDCONV_STAGES if num_experts else B0_STAGES
        if num_experts:
            stages = [s.replace("_cc4", f"_cc{num_experts}") for s in stages]
    model = EfficientNet(stages, width, depth, tf_same=tf, bn_eps=1e-3 if tf else 1e-5, **kwargs)
    model.pretrained_cfg = {"architecture": f"efficientnet_w{width:g}_d{depth:g}",
                            "input_size": (3, resolution, resolution), "crop_pct": 0.875,
                            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                            "std": (0.229, 0.224, 0.225)}
    return model
