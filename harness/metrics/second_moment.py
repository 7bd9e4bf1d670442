"""Second-moment metric (paper section 3.2.3; METHOD.md section 3).

MLP inner channel i of f(X) = B sigma(A X):
    M_i = 1/2 ||B_i||^2 (A_i^T Sigma_X A_i),    Sigma_X = E[x x^T]   (eq. for ReLU-like sigma)
gated MLP: the (W_gate, W_down) and (W_up, W_down) metrics multiplied.
A_i^T Sigma_X A_i = E[(A_i^T x)^2] is the second moment of level-1 output channel i (bias
excluded), which the pipeline accumulates per channel: O(tokens x channels) instead of the
O(tokens x d^2) of Sigma_X.
Head h (value path X_hat W_V^h W_O^h, X_hat = A_h X):
    score_h = sum_{c in h} ||W_O row c||^2 (W_V[:, c]^T Sigma_{X_hat,h} W_V[:, c])
and W_V[:, c]^T Sigma_{X_hat} W_V[:, c] is the second moment of o_proj's input channel c.
Data-free (data_free=true): Sigma = I.
"""

from __future__ import annotations

import torch

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, per_unit, register
from harness.models.base import DepthTwo, weight


def mlp_scores(view: DepthTwo, level1_moments: list[torch.Tensor] | None) -> torch.Tensor:
    """level1_moments: E[(A_i^T x)^2] per channel for each level-1 module; None = data-free."""
    out_norm = weight(view.level2).to(torch.float64).pow(2).sum(0)  # ||B_i||^2 over outputs
    score = torch.ones(view.n_units, dtype=torch.float64, device=out_norm.device)
    for part, (j, _) in enumerate(view.level1_parts):
        rows = weight(view.level1[j]).pow(2).sum(1) if level1_moments is None else level1_moments[j]
        score = score * 0.5 * out_norm * view.level1_part(rows.to(torch.float64), part)
    return score


def head_scores(view: DepthTwo, level2_second_moment: torch.Tensor | None) -> torch.Tensor:
    w_o = weight(view.level2).to(torch.float64)
    out_norm = w_o.pow(2).sum(0)  # per level-2 input channel
    if level2_second_moment is None:
        rows = view.value_rows(view.all_units())
        w_v = weight(view.level1[view.value_index]).to(torch.float64)
        moment = w_v[rows].pow(2).sum(1)
    else:
        moment = level2_second_moment.to(torch.float64)
    return per_unit(out_norm * moment, view)


@register("second_moment")
class SecondMoment(Metric):
    def __init__(self, data_free: bool = False):
        self.data_free = data_free
        self.needs_attention = frozenset() if data_free else frozenset({"level2"})
        self.needs_mlp = frozenset() if data_free else frozenset({"level1"})

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        if view.kind == "mlp":
            return Ranking(mlp_scores(view, None if self.data_free else stats.level1_moments))
        moment = None if self.data_free else stats.level2.second_moment
        return Ranking(head_scores(view, moment))
