"""HyWIA-like hybrid-grained Taylor importance (arXiv 2403.10799; METHOD.md section 8).

The paper fuses a fine-grained (element-wise) and a coarse-grained (vector-wise) Taylor score
per layer but gives no closed-form fusion rule and no code, so the rule here is a documented
choice and the records call the method "HyWIA-like (<policy>)":

  fine   I_f(u) = sum over u's weights of |g w - 1/2 w^2 F|           (LLM-Pruner param_mix)
  coarse I_c(u) = |sum over u's weights of g w|                       (coarse=group: taylor vector)
         or     = sum over u's rows and columns of |their sum of g w| (coarse=channel: LLM-Pruner's
                  vectorize code, which takes |.| per row of each matrix before adding)
  fused  I(u)   = alpha * norm(I_f) + (1 - alpha) * norm(I_c), norm = divided by the module's
                  sum (norm=sum) or max (norm=max), so both score vectors weigh the same

in each module (a block's attention or MLP) with alpha from the policy:
  fixed    alpha as given
  depth    alpha_first + (alpha_last - alpha_first) * depth, depth = 0 at the first pruned block
           and 1 at the last (fine-grained in front, coarse-grained later, as the paper observes)
  softmax  alpha = exp(-H_f) / (exp(-H_f) + exp(-H_c)), H = the entropy of the sum-normalised
           score vector: the more concentrated (more discriminating) vector gets more weight;
           parameter-free.
alpha = 1 ranks exactly as taylor variant=mix, alpha = 0 (coarse=group) as variant=vector.
"""

from __future__ import annotations

import math

import torch

from harness.blocks.stats import ModuleStats
from harness.metrics import Metric, Ranking, register
from harness.metrics.magnitude import group_sum
from harness.models.base import DepthTwo, weight

POLICIES = ("fixed", "depth", "softmax")
NORMS = ("sum", "max")
COARSE = ("group", "channel")


def _unit_interval(key: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"hywia {key}={value!r} is out of range; accepted: 0 <= {key} <= 1")
    return float(value)


def normalise(scores: torch.Tensor, how: str) -> torch.Tensor:
    scale = scores.sum() if how == "sum" else scores.max()
    return scores / scale if scale > 0 else torch.zeros_like(scores)


def entropy(scores: torch.Tensor) -> float:
    p = normalise(scores, "sum")
    p = p[p > 0]
    return float(-(p * p.log()).sum()) if p.numel() else 0.0


@register("hywia")
class HyWIA(Metric):
    needs_attention = frozenset({"grad"})
    needs_mlp = frozenset({"grad"})

    def __init__(self, policy: str = "depth", alpha: float = 0.5, alpha_first: float = 1.0,
                 alpha_last: float = 0.0, norm: str = "sum", coarse: str = "group"):
        for key, value, accepted in (("policy", policy, POLICIES), ("norm", norm, NORMS), ("coarse", coarse, COARSE)):
            if value not in accepted:
                raise ValueError(f"unknown hywia {key} {value!r}; accepted: {', '.join(accepted)}")
        self.policy, self.norm, self.coarse = policy, norm, coarse
        self.alpha = _unit_interval("alpha", alpha)
        self.alpha_first = _unit_interval("alpha_first", alpha_first)
        self.alpha_last = _unit_interval("alpha_last", alpha_last)

    @property
    def label(self) -> str:
        """How records and tables name it: the fusion rule is this harness's choice."""
        return f"HyWIA-like ({self.policy})"

    def scores(self, view: DepthTwo, stats: ModuleStats) -> tuple[torch.Tensor, torch.Tensor]:
        """(fine, coarse) unit scores, unnormalised."""
        grads = stats.extra["grad"]

        def first_order(module):
            g, _ = grads[module]
            return weight(module).detach().float() * g

        def mix(module):
            w = weight(module).detach().float()
            g, a = grads[module]
            return (w * g - 0.5 * w * a * w).abs()

        fine = group_sum(view, mix)
        coarse = (group_sum(view, first_order).abs() if self.coarse == "group"
                  else group_sum(view, first_order, line=torch.abs))
        return fine, coarse

    def fusion_weight(self, fine: torch.Tensor, coarse: torch.Tensor, depth: float) -> float:
        if self.policy == "fixed":
            return self.alpha
        if self.policy == "depth":
            return self.alpha_first + (self.alpha_last - self.alpha_first) * depth
        h_fine, h_coarse = entropy(fine), entropy(coarse)
        return 1.0 / (1.0 + math.exp(h_fine - h_coarse))

    def rank(self, view: DepthTwo, stats: ModuleStats, generator: torch.Generator) -> Ranking:
        fine, coarse = self.scores(view, stats)
        alpha = self.fusion_weight(fine, coarse, stats.depth)
        return Ranking(alpha * normalise(fine, self.norm) + (1 - alpha) * normalise(coarse, self.norm))
