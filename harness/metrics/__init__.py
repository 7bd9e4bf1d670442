"""Scoring rules for heads and MLP channels, behind one registry.

A metric scores the units of one depth-2 module from the statistics it asked for; higher
means more important (kept). Adding a metric = one file here with `@register("name")` plus
one YAML under conf/metric/.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.blocks.stats import ModuleStats
from harness.models.base import DepthTwo
from harness.registry import Registry


@dataclass
class Ranking:
    """Unit scores of one module (higher = keep).

    order: an explicit removal order (first = removed first) where the rule is not a
    score threshold (the similarity metric's greedy candidates).
    allocation_scores: what adaptive allocation compares across modules and layers;
    defaults to the scores standardised within the module.
    """

    scores: torch.Tensor
    order: torch.Tensor | None = None
    allocation_scores: torch.Tensor | None = None

    def removal_order(self) -> torch.Tensor:
        if self.order is not None:
            return self.order
        # stable: equal scores go lowest index first
        return torch.sort(self.scores.to(torch.float64), stable=True).indices

    def for_allocation(self) -> torch.Tensor:
        if self.allocation_scores is not None:
            return self.allocation_scores
        return standardise(self.scores.to(torch.float64))


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std with the unbiased std, as FLAP; a constant vector maps to zeros."""
    x = x.to(torch.float64)
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


class Metric:
    name: str = ""
    # The statistics it scores from, per module kind (the names in harness/prune/observe.py).
    needs_attention: frozenset[str] = frozenset()
    needs_mlp: frozenset[str] = frozenset()

    def needs(self, kind: str) -> frozenset[str]:
        return self.needs_attention if kind == "attention" else self.needs_mlp

    def needs_gradients(self, kinds) -> bool:
        """Whether scoring these module kinds needs the whole model's Taylor gradients."""
        return any("grad" in self.needs(kind) for kind in kinds)

    def gradient_moments(self) -> frozenset[str]:
        """Which moments of the per-sequence gradients it reads (prune/gradients.py): the mean
        g and/or the mean square a; each one not read saves 4 bytes per prunable weight."""
        return frozenset({"mean", "square"})

    @property
    def label(self) -> str:
        """How records and tables name the method (its registry name unless it says more)."""
        return self.name

    @property
    def family(self) -> str:
        """How the paper's Table 1 groups it: by what it needs to score."""
        needs = self.needs_attention | self.needs_mlp
        if "grad" in needs:
            return "training-aware"
        return "inference-aware" if needs else "data-free"

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        raise NotImplementedError


_REGISTRY: Registry[type[Metric]] = Registry("structured metric", __name__, "metric")
register, names, build = _REGISTRY.register, _REGISTRY.names, _REGISTRY.build


def per_unit(channel_scores: torch.Tensor, view: DepthTwo) -> torch.Tensor:
    """Sum level-2-channel scores over each unit's channels (a head sums its channels)."""
    idx = view.level2_channels(view.all_units()).view(view.n_units, -1)
    return channel_scores[idx].sum(1)
