"""The paper's combination: similarity (Algorithm 1) picks which heads go, second moment
picks MLP channels; adaptive allocation compares modules by their second-moment scores."""

from __future__ import annotations

import torch

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, register, standardise
from harness.metrics.second_moment import head_scores, mlp_scores
from harness.metrics.similarity import similarity_ranking
from harness.models.base import DepthTwo


@register("ours")
class Ours(Metric):
    def __init__(self, tau: float | None = None, data_free: bool = False):
        self.tau = tau
        self.data_free = data_free
        self.needs_attention = frozenset({"js"} if data_free else {"js", "level2"})
        self.needs_mlp = frozenset() if data_free else frozenset({"level1"})

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        if view.kind == "mlp":
            return Ranking(mlp_scores(view, None if self.data_free else stats.level1_moments))
        importance = head_scores(view, None if self.data_free else stats.level2.second_moment)
        ranking = similarity_ranking(view, stats, importance, self.tau)
        ranking.allocation_scores = standardise(importance)
        return ranking
