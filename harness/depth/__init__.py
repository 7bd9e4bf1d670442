"""The depth track (`sparsity_type=depth`): whole blocks removed, on the block engine.
methods.py (shortgpt, angular, sleb, random, last, behind one registry), pipeline.py (the
statistics, the greedy NLL search, the cut), replaceme.py (a removed run replaced by a linear
map folded into the block before it); the cut itself is models/surgery.py."""

from harness.depth.methods import build, names
from harness.depth.pipeline import DepthReport, prune_depth

__all__ = ["DepthReport", "build", "names", "prune_depth"]
