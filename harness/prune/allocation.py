"""How many units each pruned module loses (METHOD.md sections 1 and 4).

`sparsity_mode=model` (default): `sparsity` is the fraction of the whole model's parameters
to remove; the per-module ratio r is solved for over the prunable layer range (for
`uniform`) or becomes a global parameter budget (for `adaptive`). `sparsity_mode=module`:
`sparsity` is r itself (LLM-Pruner's per-module ratio), and adaptive uses the budget
r x (parameters of the prunable units). No module is ever emptied: at least one unit stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.settings import ALLOCATIONS


@dataclass(frozen=True)
class ModuleShape:
    layer: int
    kind: str  # attention | mlp
    n_units: int
    params_per_unit: int


def budget(shapes: list[ModuleShape], total: int, sparsity: float, mode: str, allocation: str,
           layer_range: range) -> tuple[float | None, float]:
    """(uniform per-module ratio, or None for adaptive; parameters to remove). `total` is the
    whole model's parameter count (`model` mode's reference)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1)")
    prunable = sum(sh.n_units * sh.params_per_unit for sh in shapes)
    reference = total if mode == "model" else prunable
    target = sparsity * reference
    most = max_removable(shapes)
    if target > most:
        raise ValueError(
            f"sparsity={sparsity} ({mode} mode) asks to remove {target:,.0f} parameters, but keeping one unit per "
            f"module in layers [{layer_range.start}, {layer_range.stop}) allows at most {most:,} ({most / reference:.3f}); "
            "lower the sparsity or widen model.layers"
        )
    return POLICIES[allocation].ratio(shapes, sparsity, mode, target), target


def uniform_removed(n_units: int, ratio: float) -> int:
    """LLM-Pruner's rule: n - int(n (1 - r)) units removed, at most n - 1."""
    return min(n_units - int(n_units * (1 - ratio)), n_units - 1)


def removed_params(shapes: list[ModuleShape], ratio: float) -> int:
    return sum(uniform_removed(s.n_units, ratio) * s.params_per_unit for s in shapes)


def solve_ratio(shapes: list[ModuleShape], target_params: float) -> float:
    """The per-module ratio whose removed parameter count is closest to the target.

    The removed count is a step function of r; it only changes at r = 1 - j/n, so
    checking those breakpoints is exact. Ties go to the smaller ratio."""
    candidates = {0.0}
    for shape in shapes:
        candidates.update(1 - j / shape.n_units for j in range(1, shape.n_units + 1))
    best = min(sorted(candidates), key=lambda r: abs(removed_params(shapes, r) - target_params))
    return float(best)


def max_removable(shapes: list[ModuleShape]) -> int:
    return sum((shape.n_units - 1) * shape.params_per_unit for shape in shapes)


def uniform(shapes: list[ModuleShape], ratio: float) -> list[int]:
    return [uniform_removed(s.n_units, ratio) for s in shapes]


def adaptive(shapes: list[ModuleShape], scores: list[torch.Tensor], budget_params: float) -> list[int]:
    """Global ranking of standardised unit scores across layers and modules (FLAP AL-AM):
    units are removed lowest score first, each costing its parameters, until the removed
    parameters are closest to the budget; a module's last unit is never removed."""
    flat = [(float(sc), i) for i, s in enumerate(scores) for sc in s.tolist()]
    flat.sort(key=lambda t: t[0])
    removed = [0] * len(shapes)
    total = 0
    for _, i in flat:
        cost = shapes[i].params_per_unit
        if removed[i] >= shapes[i].n_units - 1:
            continue
        if abs(total + cost - budget_params) > abs(total - budget_params):
            break
        removed[i] += 1
        total += cost
    return removed


def first_per_group(order: torch.Tensor, groups: int, per_group: int, n: int) -> torch.Tensor:
    """The first `n` units of every group in removal `order` (group g holds units
    [g * per_group, (g + 1) * per_group)); with one group, the first n of the order."""
    if groups == 1:
        return order[:n]
    group = order // per_group
    return torch.cat([order[group == g][:n] for g in range(groups)])


def step_scores(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Allocation scores of a grouped module's removal steps: step i removes the i-th least
    important unit of every group and scores the mean of their scores."""
    if groups == 1:
        return scores
    return torch.sort(scores.view(groups, -1), dim=1).values.mean(0)


class Uniform:
    """UL-UM: the same ratio in every pruned block and module."""
    uses_dense_scores = False  # counts follow from the ratio alone

    def ratio(self, shapes: list[ModuleShape], sparsity: float, mode: str, target: float) -> float:
        return sparsity if mode == "module" else solve_ratio(shapes, target)

    def counts(self, shapes: list[ModuleShape], ratio: float, target: float, scores) -> list[int]:
        return uniform(shapes, ratio)


class Adaptive:
    """AL-AM: standardised scores ranked globally across layers and modules (FLAP)."""
    uses_dense_scores = True  # one extra scoring pass over the dense model fixes the counts

    def ratio(self, shapes: list[ModuleShape], sparsity: float, mode: str, target: float) -> None:
        return None

    def counts(self, shapes: list[ModuleShape], ratio: None, target: float, scores: list[torch.Tensor]) -> list[int]:
        return adaptive(shapes, scores, target)


# A new policy is one class here plus one YAML under conf/allocation/ naming it.
POLICIES = {"uniform": Uniform(), "adaptive": Adaptive()}
assert tuple(POLICIES) == ALLOCATIONS  # the names PruneSettings accepts
