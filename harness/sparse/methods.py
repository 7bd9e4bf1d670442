"""Unstructured and N:M pruning of one linear layer (METHOD.md sections 9-10).

Every method takes the layer's weight `w` [out, in] (float, a copy it may change) and, if it
reads data, the Gram matrix of the layer's calibration inputs G = sum over tokens of x x^T
with the token count; it returns the pruned weight (removed entries exactly 0) and the mask
of removed entries. H = (2/N) G + lambda I with lambda = damp * mean(diag((2/N) G)); inputs
that are always zero ("dead" columns, diag = 0) get H_jj = 1 and their weights are removed
first, as in SparseGPT.

  magnitude  |w|, no data, no update
  wanda      |w| * ||X_j||_2 (Wanda), no update
  sparsegpt  OBS column sweep with lazy block updates (IST-DASLab/sparsegpt); the mask of each
             column block from w^2 / [chol(H^-1)]_jj^2
  mrp_s      MRP Solution S: the OBS updates of every removed weight of a row added up,
             dw = -sum_p (w_p / [H^-1]_pp) [H^-1]_p,: ; then w_P = 0
  mrp_m      MRP Solution M: dw = -w_P [(H^-1)_PP]^-1 (H^-1)_P,: (one k x k solve per row,
             exact for the mask); N:M masks by the smallest group loss
             L = 1/2 w_S [(H^-1)_SS]^-1 w_S^T over all C(m, n) sets S of each group
The masks of mrp_s and mrp_m are per row by the OBS saliency w_j^2 / (2 [H^-1]_jj).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from harness.blocks.stats import damping
from harness.checks import integer, number
from harness.registry import Registry
from harness.settings import Pattern
from harness.sparse.masks import candidates, n_of_m, select

# Rows solved at once: bounds the gathered k x k systems to about 2^25 entries.
_SOLVE_ENTRIES = 1 << 25


def hessian(gram: torch.Tensor, tokens: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(damped H, dead input columns) from the inputs' Gram matrix."""
    h = gram * (2.0 / max(tokens, 1))
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damping(h, damp)
    return h, dead


_REGISTRY: Registry[type[Method]] = Registry("masking method", __name__, "metric")
register, names, build = _REGISTRY.register, _REGISTRY.names, _REGISTRY.build


def inverse(h: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


class Method:
    name: ClassVar[str] = ""  # set by @register
    family: ClassVar[str] = "inference-aware"  # the paper's Table 1 groups (collect.frame.FAMILIES)
    needs_data: ClassVar[bool] = True

    def __init__(self, damp: float = 0.01):
        self.damp = number("metric.params.damp", damp, 0)

    def prune(self, w: torch.Tensor, gram: torch.Tensor | None, tokens: int,
              pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@register("magnitude")
class Magnitude(Method):
    family = "data-free"
    needs_data = False

    def __init__(self):
        super().__init__()

    def prune(self, w, gram, tokens, pattern):
        mask = select(w.abs(), pattern)
        return w.masked_fill(mask, 0), mask


@register("wanda")
class Wanda(Method):

    def __init__(self):
        super().__init__()

    def prune(self, w, gram, tokens, pattern):
        mask = select(w.abs() * torch.diagonal(gram).clamp_min(0).sqrt()[None], pattern)
        return w.masked_fill(mask, 0), mask


@register("sparsegpt")
class SparseGPT(Method):

    def __init__(self, damp: float = 0.01, blocksize: int = 128):
        super().__init__(damp)
        integer("metric.params.blocksize", blocksize, 1)
        self.blocksize = blocksize

    def prune(self, w, gram, tokens, pattern):
        h, dead = hessian(gram, tokens, self.damp)
        w[:, dead] = 0
        return sparsegpt(w, h, pattern, self.blocksize)


def sparsegpt(w: torch.Tensor, h: torch.Tensor, pattern: Pattern, blocksize: int = 128,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's sweep on `w` (changed in place) with damped Hessian `h`; a given `mask`
    replaces the method's own choice (used by the identity tests)."""
    rows, cols = w.shape
    if pattern.is_nm and blocksize % pattern.m:
        raise ValueError(f"sparsegpt's blocksize={blocksize} must be a multiple of m={pattern.m} for {pattern.label()}")
    u = torch.linalg.cholesky(inverse(h), upper=True)  # row i: the OBS update once columns < i are fixed
    removed = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, u_block = w[:, start:end].clone(), u[start:end, start:end]
        d = torch.diagonal(u_block)
        errors = torch.zeros_like(block)
        if mask is not None:
            block_mask = mask[:, start:end].clone()
        elif pattern.is_nm:
            block_mask = torch.zeros_like(block, dtype=torch.bool)
        else:  # the k smallest saliencies of the whole column block
            saliency = (block**2 / d[None] ** 2).flatten()
            block_mask = torch.zeros_like(saliency, dtype=torch.bool)
            block_mask[torch.topk(saliency, int(saliency.numel() * pattern.sparsity), largest=False).indices] = True
            block_mask = block_mask.view_as(block)
        for i in range(end - start):
            if mask is None and pattern.is_nm and i % pattern.m == 0:
                group = block[:, i : i + pattern.m] ** 2 / d[None, i : i + pattern.m] ** 2
                block_mask[:, i : i + pattern.m] = n_of_m(group, pattern.n, pattern.m)
            column = block[:, i]
            error = torch.where(block_mask[:, i], column, torch.zeros_like(column)) / d[i]
            block[:, i:] -= error[:, None] * u_block[i, i:][None]
            block[:, i] = torch.where(block_mask[:, i], torch.zeros_like(column), block[:, i])
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
        removed[:, start:end] = block_mask
    return w, removed


class MRP(Method):
    exact: ClassVar[bool] = True

    def prune(self, w, gram, tokens, pattern):
        h, dead = hessian(gram, tokens, self.damp)
        w[:, dead] = 0
        h_inv = inverse(h)
        mask = mrp_mask(w, h_inv, pattern, exact=self.exact)
        return (solve_m(w, h_inv, mask) if self.exact else solve_s(w, h_inv, mask)), mask


@register("mrp_s")
class MRPS(MRP):
    exact = False


@register("mrp_m")
class MRPM(MRP):
    exact = True


def mrp_mask(w: torch.Tensor, h_inv: torch.Tensor, pattern: Pattern, exact: bool) -> torch.Tensor:
    """Per row, the OBS saliency's lowest; N:M with `exact`: per group the set of smallest loss."""
    saliency = w**2 / (2 * torch.diagonal(h_inv))[None]
    if not (pattern.is_nm and exact):
        return select(saliency, pattern)
    rows, cols = w.shape
    if cols % pattern.m:
        raise ValueError(f"an {pattern.label()} pattern needs the input width to be a multiple of {pattern.m}; got {cols}")
    sets = candidates(pattern.n, pattern.m)  # [c, n]
    groups = cols // pattern.m
    columns = torch.arange(groups)[:, None, None] * pattern.m + sets[None]  # [g, c, n]
    columns = columns.to(w.device)
    inv_blocks = torch.linalg.inv(h_inv[columns[..., :, None], columns[..., None, :]])  # [g, c, n, n]
    mask = torch.zeros_like(w, dtype=torch.bool)
    step = max(1, _SOLVE_ENTRIES // columns.numel())
    for r in range(0, rows, step):
        ws = w[r : r + step][:, columns]  # [rb, g, c, n]
        loss = 0.5 * torch.einsum("rgci,gcij,rgcj->rgc", ws, inv_blocks, ws)
        best = columns[torch.arange(groups, device=w.device)[None], loss.argmin(-1)]  # [rb, g, n]
        mask[r : r + step].scatter_(1, best.flatten(1), True)
    return mask


def _removed_columns(mask: torch.Tensor) -> torch.Tensor:
    counts = mask.sum(1)
    if not (counts == counts[0]).all():
        raise ValueError("MRP's batched solve needs the same number of removed weights in every row")
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)


def solve_m(w: torch.Tensor, h_inv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Solution M: the weights of each row refitted exactly for its removed set."""
    removed = _removed_columns(mask)
    k = removed.shape[1]
    if k == 0:
        return w
    out = w.clone()
    step = max(1, _SOLVE_ENTRIES // (k * k))
    for r in range(0, w.shape[0], step):
        cols = removed[r : r + step]
        system = h_inv[cols[:, :, None], cols[:, None, :]]  # [rb, k, k]
        z = torch.cholesky_solve(w[r : r + step].gather(1, cols)[..., None], torch.linalg.cholesky(system))[..., 0]
        coef = torch.zeros_like(w[r : r + step]).scatter_(1, cols, z)
        out[r : r + step] -= coef @ h_inv
    return out.masked_fill_(mask, 0)


def solve_s(w: torch.Tensor, h_inv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Solution S: each removed weight's own OBS update, summed, then the removed set zeroed."""
    coef = torch.where(mask, w / torch.diagonal(h_inv)[None], torch.zeros_like(w))
    return (w - coef @ h_inv).masked_fill_(mask, 0)
