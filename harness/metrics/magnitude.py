"""Data-free magnitude baselines (LLM-Pruner's MagnitudeImportance): sum of |w|^p over all
weights of a unit, i.e. its level-1 output rows and its level-2 input columns (no biases)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, per_unit, register
from harness.models.base import DepthTwo, weight


def group_sum(view: DepthTwo, per_weight: Callable[[nn.Module], torch.Tensor],
              line: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Sum a per-weight quantity ([out, in] like the weight) over every unit's weights:
    its level-1 output rows and its level-2 input columns (the coupled group). `line`, when
    given, maps each row's and column's sum before the rows and columns of a unit are added."""
    line = line or (lambda x: x)
    total = per_unit(line(per_weight(view.level2).to(torch.float64).sum(0)), view)
    if view.kind == "mlp":  # channel u of each factor is one row
        for part, (i, _) in enumerate(view.level1_parts):
            total = total + view.level1_part(line(per_weight(view.level1[i]).to(torch.float64).sum(1)), part)
        return total
    for i, module in enumerate(view.level1):
        row_mass = line(per_weight(module).to(torch.float64).sum(1))
        # channel lists are in layout order (GPT-2: all q, then k, then v): group per head
        total = total + torch.stack([row_mass[view.level1_channels(torch.tensor([u]))[i]].sum()
                                     for u in range(view.n_units)])
    return total


def magnitude(view: DepthTwo, p: int) -> torch.Tensor:
    return group_sum(view, lambda m: weight(m).detach().abs().pow(p))


class _Magnitude(Metric):
    p = 1

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        return Ranking(magnitude(view, self.p))


@register("l1")
class L1(_Magnitude):
    p = 1


@register("l2")
class L2(_Magnitude):
    p = 2
