"""The unstructured / N:M track (`sparsity_type=unstructured|nm`) on the block engine:
methods.py (one layer: magnitude, wanda, sparsegpt, mrp_s, mrp_m, behind one registry),
masks.py (which weights a pattern removes), pipeline.py (what the track does to a block)."""

from harness.sparse.methods import build, names
from harness.sparse.pipeline import SparseReport, prune_sparse

__all__ = ["SparseReport", "build", "names", "prune_sparse"]
