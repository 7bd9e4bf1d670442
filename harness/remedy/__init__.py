"""Remedies around the cut, behind one registry (a new remedy is one file here plus one YAML
under conf/remedy/).

A remedy declares what it needs and hooks into the pipeline at three points of each module:
  before_observing  the module as pruned so far, with what the dense module saw at hand
                    (recovery re-fits level 1 to the dense outputs, paper Algorithms 2-4)
  before_scoring    its statistics are observed, with the level-2 inputs that pass saw
                    (recovery re-fits level 2: the statistics never read level-2 weights)
  after_selection   the units to keep are chosen, the cut has not happened
                    (bias folds the removed channels' mean into the bias, FLAP)
`finish` returns what the record keeps about it (or raises if it silently did nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from harness.blocks.stats import ModuleStats
from harness.blocks.stream import Chunk
from harness.models.base import DepthTwo
from harness.registry import Registry
from harness.settings import PruneSettings


@dataclass(frozen=True)
class FitContext:
    """What a remedy that fits weights on data (`fits_on_data`) sees of one module."""

    block: nn.Module
    view: DepthTwo  # the module as pruned so far
    stream: list[Chunk]  # the stream it fits on, through the model pruned so far
    dense: tuple[list[torch.Tensor], list[torch.Tensor]]  # the dense module's level-1 inputs, level-2 outputs per chunk
    where: str  # "block k attention", for messages
    dtype: torch.dtype  # of the statistics
    device: torch.device


class Remedy:
    name: ClassVar[str] = "none"
    needs: ClassVar[frozenset[str]] = frozenset()  # statistics observed at the cut (observe.NEEDS)
    # Fits weights on data: the pipeline keeps each block's dense outputs and the dense stream for it.
    fits_on_data: ClassVar[bool] = False
    params: ClassVar[tuple[str, ...]] = ()  # the remedy.* keys it reads (the tables label runs by them)

    def __init__(self, settings: PruneSettings):
        self.settings = settings

    @classmethod
    def check(cls, settings: PruneSettings) -> None:
        """Refuse settings this remedy cannot honour (at construction, before any work)."""

    def before_observing(self, fit: FitContext) -> None:
        """Called before the module is observed, only when `fits_on_data` and something
        upstream was cut (else its input is the dense one); `fit.dense` comes from one forward
        of the dense block over the dense stream."""

    def before_scoring(self, fit: FitContext, level2_inputs: list[torch.Tensor] | None) -> None:
        """Called after the module's statistics pass, before it is scored (same condition);
        `level2_inputs`: the level-2 input per chunk of `fit.stream` that pass saw, or None
        where it saw none of that stream (the remedy computes them itself)."""

    def after_selection(self, view: DepthTwo, keep: torch.Tensor, stats: ModuleStats) -> None:
        """Called with the units to keep, before they are cut."""

    def finish(self) -> dict:
        return {}


_REGISTRY: Registry[type[Remedy]] = Registry("remedy", __name__, "remedy")
register, names, get = _REGISTRY.register, _REGISTRY.names, _REGISTRY.get
register("none")(Remedy)


def fits_on_data(name: str) -> bool:
    """Whether remedy `name` fits weights on data (and so reads remedy.calibration)."""
    return get(name).fits_on_data
