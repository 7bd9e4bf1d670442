"""FLAP bias compensation: the removed level-2 input channels are replaced by their mean.

    b_level2 += W[:, pruned] @ m[pruned]
m = calibration mean of the level-2 input. A bias is added where the architecture has none
(LLaMA o_proj / down_proj); the pruned save/load keeps it.
"""

from __future__ import annotations

import torch

from harness.blocks.stats import ModuleStats
from harness.models.base import DepthTwo, ensure_bias, weight
from harness.remedy import Remedy, register


def compensate(view: DepthTwo, keep_units: torch.Tensor, level2_mean: torch.Tensor) -> None:
    all_channels = view.level2_channels(view.all_units())
    kept = view.level2_channels(keep_units)
    mask = torch.ones(weight(view.level2).shape[1], dtype=torch.bool)
    mask[kept] = False
    pruned = all_channels[mask[all_channels]]
    if len(pruned) == 0:
        return
    w = weight(view.level2)
    shift = w[:, pruned].to(torch.float64) @ level2_mean[pruned].to(w.device, torch.float64)
    bias = ensure_bias(view.level2)
    with torch.no_grad():
        bias += shift.to(bias.dtype)


@register("bias")
class Bias(Remedy):
    needs = frozenset({"level2", "centered"})

    def after_selection(self, view: DepthTwo, keep: torch.Tensor, stats: ModuleStats) -> None:
        compensate(view, keep, stats.level2.mean)
