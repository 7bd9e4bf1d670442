"""LLM-Pruner's Taylor importance (Ma et al. 2023; horseee/LLM-Pruner hf_llama_pruner.py).

Per weight, with s = W * g (g = LM-loss gradient) and a = mean over samples of g^2:
  element1 (code: param_first)  = |s|
  element2 (code: param_second) = |W * a * W|
  mix      (code: param_mix)    = |s - 1/2 W * a * W|
summed over a unit's coupled weights (level-1 rows, level-2 columns), and
  vector   (code: vectorize)    = |sum over the unit's weights of s|.
The paper's "Element1" is param_first; its "Element2" is param_second here (the sources leave
open whether it meant param_mix, which is available as variant=mix).
Gradients come from the dense model, once, before pruning starts (harness/prune/gradients.py).
"""

from __future__ import annotations

import torch

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, register
from harness.metrics.magnitude import group_sum
from harness.models.base import DepthTwo, weight

# The gradient moments (prune/gradients.py) each variant reads: g = "mean", a = "square".
MOMENTS_READ = {"element1": frozenset({"mean"}), "element2": frozenset({"square"}),
                "mix": frozenset({"mean", "square"}), "vector": frozenset({"mean"})}
VARIANTS = tuple(MOMENTS_READ)


@register("taylor")
class Taylor(Metric):
    needs_attention = frozenset({"grad"})
    needs_mlp = frozenset({"grad"})

    def __init__(self, variant: str = "element1"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown taylor variant {variant!r}; accepted: {', '.join(VARIANTS)}")
        self.variant = variant

    def gradient_moments(self) -> frozenset[str]:
        return MOMENTS_READ[self.variant]

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        grads = stats.extra["grad"]

        def per_weight(module):
            w = weight(module).detach().float()
            g, a = grads[module]
            if self.variant == "element1":
                return (w * g).abs()
            if self.variant == "element2":
                return (w * a * w).abs()
            if self.variant == "mix":
                return (w * g - 0.5 * w * a * w).abs()
            return w * g  # vector: signed, summed over the group, then |.|

        scores = group_sum(view, per_weight)
        return Ranking(scores.abs() if self.variant == "vector" else scores)
