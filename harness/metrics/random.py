"""Random baseline: uniform random scores from the run's seeded generator."""

from __future__ import annotations

import torch

from harness.metrics import Metric, Ranking, register
from harness.models.base import DepthTwo
from harness.prune.stats import ModuleStats


@register("random")
class Random(Metric):
    def rank(self, d2: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        return Ranking(torch.rand(d2.n_units, generator=generator, dtype=torch.float64))
