"""Pruning, block by block: settings.py (what to do), stream.py (the calibration stream and
each block's own arguments), observe.py (statistics hooks), allocation.py (how many units
each module loses), gradients.py (Taylor), pipeline.py (the loop)."""

from harness.prune.pipeline import Pipeline, module_shapes, module_view, prune
from harness.prune.settings import (
           PruneReport,
           PruneSettings,
           n_params,
           prunable_layers,
)

__all__ = ["Pipeline", "PruneReport", "PruneSettings", "module_shapes", "module_view",
           "n_params", "prunable_layers", "prune"]
