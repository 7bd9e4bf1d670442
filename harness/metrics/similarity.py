"""Similarity metric for attention heads (paper Algorithm 1; METHOD.md section 2).

D_ij = mean over query rows of sqrt(JS(P_i || P_j)). Algorithm 1 walks the pairs with
D_ij < tau and adds i to the candidates when neither i nor j is one yet. To reach an exact
count instead of a threshold we walk *all* pairs in ascending D (ties: lower index pair
first) and, of the two heads of a pair, add the less important one by the tie-break score
(second moment of the head; equal scores: the higher index). The walk gives a full removal
order; at most n-1 heads can become candidates, so a module is never emptied.
With grouped-query units, D between two groups is the mean D over their heads' pairs.
MLP channels are scored with the second-moment metric (the paper uses similarity for heads only).
"""

from __future__ import annotations

import torch

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, register
from harness.metrics.second_moment import head_scores, mlp_scores
from harness.models.base import DepthTwo


def unit_divergence(js: torch.Tensor, heads_per_unit: int) -> torch.Tensor:
    n = js.shape[0] // heads_per_unit
    return js.view(n, heads_per_unit, n, heads_per_unit).mean(dim=(1, 3))


def greedy_candidates(div: torch.Tensor, importance: torch.Tensor, tau: float | None = None) -> list[int]:
    """Candidates in the order Algorithm 1 adds them (pairs by ascending divergence)."""
    n = div.shape[0]
    iu, ju = torch.triu_indices(n, n, offset=1)
    d = div[iu, ju]
    order = torch.argsort(d, stable=True)
    chosen: list[int] = []
    is_cand = [False] * n
    for k in order.tolist():
        if tau is not None and d[k] >= tau:
            break
        i, j = int(iu[k]), int(ju[k])
        if is_cand[i] or is_cand[j]:
            continue
        victim = i if importance[i] < importance[j] else j  # equal: the higher index (j)
        is_cand[victim] = True
        chosen.append(victim)
    return chosen


def similarity_ranking(view: DepthTwo, stats: ModuleStats, importance: torch.Tensor, tau: float | None) -> Ranking:
    div = unit_divergence(stats.js, view.heads_per_unit)
    chosen = greedy_candidates(div, importance, tau)
    rest = [u for u in torch.argsort(importance.to(torch.float64), stable=True).tolist() if u not in chosen]
    order = torch.tensor(chosen + rest, dtype=torch.long)
    # scores consistent with the order (for reporting and uniform selection)
    scores = torch.empty(view.n_units, dtype=torch.float64)
    scores[order] = torch.arange(view.n_units, dtype=torch.float64)
    return Ranking(scores, order=order, allocation_scores=None)


@register("similarity")
class Similarity(Metric):
    needs_attention = frozenset({"js", "level2"})
    needs_mlp = frozenset({"level1"})

    def __init__(self, tau: float | None = None):
        self.tau = tau

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        if view.kind == "mlp":
            return Ranking(mlp_scores(view, stats.level1_moments))
        importance = head_scores(view, stats.level2.second_moment)
        return similarity_ranking(view, stats, importance, self.tau)
