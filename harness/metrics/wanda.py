"""Wanda-sp (structured Wanda, as in FLAP's comparison): on the level-2 input X, per input
channel j: mean over output rows of |W_ij| * sqrt(E[X_j^2]); a head sums its channels."""

from __future__ import annotations

import torch

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, per_unit, register
from harness.models.base import DepthTwo, weight


@register("wanda")
class WandaSP(Metric):
    needs_attention = frozenset({"level2"})
    needs_mlp = frozenset({"level2"})

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        w = weight(view.level2).to(torch.float64).abs()
        channel = w.mean(0) * stats.level2.second_moment.to(torch.float64).sqrt()
        return Ranking(per_unit(channel, view))
