"""The structured track: heads and channels removed, block by block on the block engine
(harness/blocks). allocation.py (how many units each module loses), observe.py (a module's
statistics from hooks), gradients.py (Taylor), pipeline.py (what it does to a block),
report.py (what it did)."""

from harness.prune.pipeline import Pipeline, module_shapes, prune
from harness.prune.report import PruneReport
from harness.settings import PruneSettings, n_params, prunable_layers

__all__ = ["Pipeline", "PruneReport", "PruneSettings", "module_shapes", "n_params", "prunable_layers", "prune"]
