"""What the structured track did (`PruneReport`): the record's pruning entry is built from it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PruneReport:
    ratio: float | None  # the uniform per-module ratio; None under adaptive allocation
    params_before: int
    params_after: int
    per_layer: list[dict]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    removed: dict[tuple[int, str], list[int]] = field(default_factory=dict)  # (layer, module) -> unit ids
    divergence: dict[int, list[list[float]]] = field(default_factory=dict)  # layer -> head x head mean JS distance
    remedy: dict = field(default_factory=dict)  # what the remedy reports (recovery: fits and fall-backs)

    @property
    def sparsity_achieved(self) -> float:
        return 1 - self.params_after / self.params_before
