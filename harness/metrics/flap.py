"""FLAP fluctuation metrics (An et al. 2024; reference CASIA-IVA-Lab/FLAP lib/prune.py).

On the level-2 input X with per-channel mean m_j and variance v_j:
  IFV  = v_j;   WIFV (default) = v_j * sum_i W_ij^2;   WIFN = mean_i |W_ij| * sqrt(E[X_j^2]).
Attention channel scores are squared; a head sums them (UL-UM). For adaptive allocation
(AL-AM) scores are standardised within the module and a head takes the mean of its
channels' standardised scores, as the reference does.
`prune.flap_faithful=true` makes the pipeline observe the reference's per-sample running
statistics (blocks/stats.py FlapSampleMoments) instead of per-token Welford variance.
"""

from __future__ import annotations

import torch

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, per_unit, register, standardise
from harness.models.base import DepthTwo, weight

SCORES = ("ifv", "wifv", "wifn")


@register("flap")
class Flap(Metric):
    needs_attention = frozenset({"level2", "centered"})
    needs_mlp = frozenset({"level2", "centered"})

    def __init__(self, score: str = "wifv"):
        if score not in SCORES:
            raise ValueError(f"unknown FLAP score {score!r}; accepted: {', '.join(SCORES)}")
        self.score = score

    def channel_scores(self, view: DepthTwo, stats: ModuleStats) -> torch.Tensor:
        w = weight(view.level2).to(torch.float64)
        var = stats.level2.variance.to(torch.float64)
        if self.score == "ifv":
            return var
        if self.score == "wifv":
            return var * w.pow(2).sum(0)
        return w.abs().mean(0) * stats.level2.second_moment.to(torch.float64).sqrt()

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        channel = self.channel_scores(view, stats)
        if view.kind == "attention":
            channel = channel.pow(2)
            idx = view.level2_channels(view.all_units()).view(view.n_units, -1)
            return Ranking(per_unit(channel, view), allocation_scores=standardise(channel)[idx].mean(1))
        return Ranking(channel)
