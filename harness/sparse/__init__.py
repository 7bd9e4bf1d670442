"""The unstructured / N:M track (`sparsity_type=unstructured|nm`): methods.py (one layer:
magnitude, wanda, sparsegpt, mrp_s, mrp_m), masks.py (patterns), pipeline.py (block by block)."""

from harness.sparse.masks import Pattern, parse_nm
from harness.sparse.methods import build, names
from harness.sparse.pipeline import SparseReport, prune_sparse

SPARSITY_TYPES = ("structured", "unstructured", "nm")

__all__ = ["SPARSITY_TYPES", "Pattern", "SparseReport", "build", "names", "parse_nm", "prune_sparse"]
