"""Which weights of a layer to remove, from a score per weight (lower = removed first).

Two patterns (METHOD.md section 9): `per_row(scores, k)` removes the k lowest of every output
row (the same count in every row), `n_of_m(scores, n, m)` the n lowest of every group of m
consecutive input columns of a row (Wanda's prune_n / prune_m). Both return a boolean mask,
True where a weight is removed.
"""

from __future__ import annotations

import itertools

import torch

from harness.settings import Pattern


def per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"an {n}:{m} pattern needs the input width to be a multiple of {m}; got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def select(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if pattern.is_nm:
        return n_of_m(scores, pattern.n, pattern.m)
    return per_row(scores, pattern.removed_per_row(scores.shape[1]))


def candidates(n: int, m: int) -> torch.Tensor:
    """Every way to remove n of m columns: [C(m, n), n] column offsets, in lexicographic order."""
    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.long)
