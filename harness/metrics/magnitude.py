"""Data-free magnitude baselines (LLM-Pruner's MagnitudeImportance): sum of |w|^p over all
weights of a unit, i.e. its level-1 output rows and its level-2 input columns (no biases)."""

from __future__ import annotations

import torch

from harness.metrics import Metric, Ranking, per_unit, register
from harness.models.base import DepthTwo, weight
from harness.stats import ModuleStats


def magnitude(d2: DepthTwo, p: int) -> torch.Tensor:
    units = d2.all_units()
    total = per_unit(weight(d2.level2).to(torch.float64).abs().pow(p).sum(0), d2)
    for module, rows in zip(d2.level1, d2.level1_channels(units), strict=True):
        row_mass = weight(module).to(torch.float64).abs().pow(p).sum(1)[rows]
        total = total + row_mass.view(d2.n_units, -1).sum(1)
    return total


class _Magnitude(Metric):
    p = 1

    def rank(self, d2: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        return Ranking(magnitude(d2, self.p))


@register("l1")
class L1(_Magnitude):
    p = 1


@register("l2")
class L2(_Magnitude):
    p = 2
