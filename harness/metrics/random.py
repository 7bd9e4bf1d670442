"""Random baseline: uniform random scores from the run's seeded generator."""

from __future__ import annotations

import torch

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, register
from harness.models.base import DepthTwo


@register("random")
class Random(Metric):
    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        return Ranking(torch.rand(view.n_units, generator=generator, dtype=torch.float64))
