"""Which weights of a layer to remove, from a score per weight (lower = removed first).

Two patterns (METHOD.md section 9): `per_row(scores, k)` removes the k lowest of every output
row (the same count in every row), `n_of_m(scores, n, m)` the n lowest of every group of m
consecutive input columns of a row (Wanda's prune_n / prune_m). Both return a boolean mask,
True where a weight is removed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """What one layer loses: a fraction of every row, or n of every m columns."""

    sparsity: float
    n: int = 0  # n:m when n > 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.n > 0

    def removed_per_row(self, columns: int) -> int:
        return columns // self.m * self.n if self.is_nm else int(columns * self.sparsity)

    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"


def parse_nm(value: str, key: str = "nm") -> tuple[int, int]:
    """'2:4' -> (2, 4): n zeros in each group of m (0 < n < m)."""
    n, sep, m = str(value).partition(":")
    try:
        n_, m_ = int(n), int(m)
    except ValueError:
        n_ = m_ = 0
    if not sep or not 0 < n_ < m_:
        raise ValueError(f"{key}={value!r} is not accepted; accepted: N:M with 0 < N < M, e.g. 2:4 or 4:8")
    return n_, m_


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
