"""Remedies around the cut, behind one registry (a new remedy is one file here plus one YAML
under conf/remedy/).

A remedy declares what it needs and hooks into the pipeline at two points of each module:
  before_scoring   the module as pruned so far, with the dense module's inputs at hand
                   (recovery re-fits it to the dense outputs, paper Algorithms 2-4)
  after_selection  the units to keep are chosen, the cut has not happened
                   (bias folds the removed channels' mean into the bias, FLAP)
`finish` returns what the record keeps about it (or raises if it silently did nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from harness.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from harness.models.base import DepthTwo
    from harness.prune.settings import PruneSettings
    from harness.prune.stats import ModuleStats
    from harness.prune.stream import Chunk

class Remedy:
    name: ClassVar[str] = "none"
    needs: ClassVar[frozenset[str]] = frozenset()  # statistics observed at the cut (observe.NEEDS)
    dense_reference: ClassVar[bool] = False  # keep a dense copy of each block and the dense stream
    params: ClassVar[tuple[str, ...]] = ()  # the remedy.* keys it reads (the tables label runs by them)

    def __init__(self, settings: PruneSettings):
        self.settings = settings

    @classmethod
    def check(cls, settings: PruneSettings) -> None:
        """Refuse settings this remedy cannot honour (at construction, before any work)."""

    def before_scoring(self, block: nn.Module, view: DepthTwo, stream: list[Chunk],
                       dense_inputs: tuple[list[torch.Tensor], list[torch.Tensor]], where: str, dtype: torch.dtype,
                       device: torch.device) -> None:
        """Called before `view` (the module as pruned so far) is observed and scored, only when
        `dense_reference`; `dense_inputs`: the dense module's level-1 inputs and level-2 outputs
        per chunk of the dense stream (from one forward of the dense block)."""

    def after_selection(self, view: DepthTwo, keep: torch.Tensor, stats: ModuleStats) -> None:
        """Called with the units to keep, before they are cut."""

    def finish(self) -> dict:
        return {}


_REGISTRY: Registry[type[Remedy]] = Registry("remedy", __name__)
register, names, get = _REGISTRY.register, _REGISTRY.names, _REGISTRY.get
register("none")(Remedy)


def fits_on_data(name: str) -> bool:
    """Whether remedy `name` fits weights on data (and so reads remedy.calibration)."""
    return get(name).dense_reference
