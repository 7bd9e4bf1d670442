"""Streaming statistics, the one layer every track accumulates with: nothing is kept per token.

Accumulators are float64 on a CPU and float32 on a GPU (`accumulator_dtype`). Per-channel
moments (`ChannelMoments`, FLAP's `FlapSampleMoments`), head divergences (`js_distance_sums`),
Gram matrices X^T X (`Gram`: the lower block triangle only, mirrored when read) and the
damping rule both Hessian-based solvers use (`damping`). `ModuleStats` is what one pass over a
structured module collects. Memory per module: one vector over each level-1 output and over the
level-2 input channels (three where mean and variance are needed), one h x h divergence matrix
per block, and for recovery a Gram matrix and a cross product per level; the masking track a
Gram matrix per linear layer input. Peak = those plus one calibration chunk's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """Sums over calibration tokens: float64 on a CPU (it costs little there), float32 on a GPU."""
    return torch.float64 if device.type == "cpu" else torch.float32


GRAM_PIECES = 4  # column pieces of the Gram matrix's lower block triangle (measured best, 2 CPU cores)


def column_blocks(n: int, pieces: int = GRAM_PIECES) -> list[tuple[int, int]]:
    """[start, stop) of the `pieces` column blocks a Gram matrix is split into."""
    step = -(-n // pieces)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


class Gram:
    """Running X^T X over tokens and the token count. X^T X is symmetric: only the lower block
    triangle is formed (rows of each column block against the columns up to its own, about 0.6x
    the time of the full product for a 1,536-wide input on 2 CPU cores) and mirrored when read.
    `exact`: each chunk's products in the accumulator's precision (SparseGPT's and MRP's Hessian
    inverses need float64 products; the blocks accumulate bit-identically to one full product);
    else in the input's own precision, at least float32, summed in the accumulator's (recovery)."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, exact: bool = True,
                 pieces: int = GRAM_PIECES):
        self._lower = torch.zeros(width, width, dtype=dtype, device=device)
        self.exact, self.pieces, self.tokens, self._mirrored = exact, pieces, 0, True

    def add(self, x: torch.Tensor) -> None:
        """x: [tokens, width]."""
        acc = self._lower
        if self.exact:
            x = x.to(acc.dtype)
            for start, stop in column_blocks(x.shape[1], self.pieces):
                acc[start:stop, :stop].addmm_(x[:, start:stop].T, x[:, :stop])
        else:
            for start, stop in column_blocks(x.shape[1], self.pieces):
                acc[start:stop, :stop] += (x[:, start:stop].T @ x[:, :stop]).to(acc.dtype)
        self.tokens += x.shape[0]
        self._mirrored = False

    def update(self, x: torch.Tensor) -> None:
        """x: [..., width], e.g. a layer's input [batch, seq, width]."""
        self.add(x.reshape(-1, x.shape[-1]))

    @property
    def matrix(self) -> torch.Tensor:
        """X^T X, whole: the blocks above the diagonal are overwritten from their mirror images
        below (never accumulated, so re-mirroring after more updates is exact)."""
        if not self._mirrored:
            for start, stop in column_blocks(self._lower.shape[0], self.pieces):
                self._lower[start:stop, stop:] = self._lower[stop:, start:stop].T
            self._mirrored = True
        return self._lower


def damping(h: torch.Tensor, damp: float) -> torch.Tensor:
    """lambda I with lambda = damp x mean(diag h): the damping of SparseGPT's and MRP's Hessian
    and of recovery's ridge solve (METHOD.md sections 5 and 9)."""
    return damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


class ChannelMoments:
    """Per-channel second moment over tokens and, when `centered`, mean and variance
    (Chan/Welford merge of per-chunk centered moments)."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, centered: bool = True):
        self.n, self.centered = 0, centered
        self.sq = torch.zeros(width, dtype=dtype, device=device)  # sum of squares
        if centered:
            self._mean = torch.zeros(width, dtype=dtype, device=device)
            self.m2 = torch.zeros(width, dtype=dtype, device=device)  # sum of squared deviations

    def update(self, x: torch.Tensor) -> None:
        # chunk moments in (at least) float32, merged in the accumulator's precision; sums over
        # tokens as matrix-vector products (var_mean along dim 0 is several times slower on a CPU)
        x = x.reshape(-1, x.shape[-1])
        x = x.float() if x.element_size() < 4 else x
        nb = x.shape[0]
        ones = x.new_ones(nb)
        if not self.centered:
            self.sq += (ones @ x.square()).to(self.sq.dtype)
            self.n += nb
            return
        mean_b = (ones @ x) / nb
        mb, m2b = mean_b.to(self.sq.dtype), (ones @ (x - mean_b).square_()).to(self.sq.dtype)
        delta = mb - self._mean
        total = self.n + nb
        self._mean += delta * nb / total
        self.m2 += m2b + delta**2 * self.n * nb / total
        self.sq += (m2b + mb**2 * nb)
        self.n = total

    @property
    def second_moment(self) -> torch.Tensor:
        return self.sq / max(self.n, 1)

    def _need_centered(self) -> None:
        if not self.centered:
            raise RuntimeError("these moments were accumulated without the mean (declare the need 'centered')")

    @property
    def mean(self) -> torch.Tensor:
        self._need_centered()
        return self._mean

    @property
    def variance(self) -> torch.Tensor:
        self._need_centered()
        return self.m2 / max(self.n - 1, 1)


class FlapSampleMoments:
    """FLAP's reference statistics (lib/layerwrapper.py BiasGPT.add_batch), reproduced exactly:
    updated once per calibration sample with that sample's token-mean; the running
    'variance' skips the first sample and uses the updated mean in both factors."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        self.n = 0
        self.mean = torch.zeros(width, dtype=dtype, device=device)
        self.var = torch.zeros(width, dtype=dtype, device=device)
        self.sq = torch.zeros(width, dtype=dtype, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.to(self.mean.dtype)
        x = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]
        for sample in x:  # [seq, width]
            old_mean = self.mean.clone()
            self.mean = self.mean * self.n / (self.n + 1) + sample.mean(0) / (self.n + 1)
            if self.n > 0:
                self.var = self.var * (self.n - 1) / self.n + ((sample - old_mean) * (sample - self.mean)).sum(0) / (self.n + 1)
            self.n += 1
            self.sq += (sample * sample).sum(0)
            self.tokens += sample.shape[0]

    @property
    def second_moment(self) -> torch.Tensor:
        return self.sq / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        return self.var


def js_distance_sums(probs: torch.Tensor, eps: float = 1e-10, row_block: int = 32) -> tuple[torch.Tensor, int]:
    """Sum over query rows of sqrt(JS(P_i || P_j)) for every head pair, and the row count.

    probs: [batch, heads, q, k] attention probabilities. Returns an [heads, heads] symmetric
    matrix with zero diagonal. JS = (A_i + A_j) / 2 - sum_k m log(m + eps), m = (P_i + P_j) / 2,
    A_i = sum_k p_i log(p_i + eps): the per-head terms once, one logarithm per pair and key.
    Queries go in blocks of `row_block` rows, each over the keys up to its last non-zero
    column only (causal attention: a block of early queries reads few keys), and the per-head
    terms are reduced over exactly those columns, so identical heads give exactly 0.
    """
    p = probs.to(torch.float32)
    b, h, q, _ = p.shape
    first, second = torch.triu_indices(h, h, 1, device=p.device)  # pairs i < j, by i then j
    starts = [0, *torch.arange(h - 1, 0, -1).cumsum(0).tolist()]  # where each i's pairs begin
    sums = torch.zeros(first.numel(), dtype=torch.float64, device=p.device)
    # Two work buffers for the largest pair set, reused (the loop is allocation-bound otherwise)
    m_buf, log_buf = (p.new_empty(b * (h - 1) * min(row_block, q) * p.shape[-1]) for _ in range(2))
    # Which keys each query row reads at all, from one sum over batch and heads (probabilities
    # are >= 0: a sum is 0 exactly where every term is; a per-block any() costs 4x as much)
    read = p.sum(dim=(0, 1)).gt_(0)  # [q, k]
    for r0 in range(0, q, row_block):
        used = read[r0 : r0 + row_block].any(0).nonzero()
        if used.numel() == 0:
            continue
        rows = p[:, :, r0 : r0 + row_block, : int(used[-1]) + 1]
        own = torch.linalg.vecdot(rows, torch.log(rows + eps))  # [b, h, rows]
        mix = own.new_empty(b, first.numel(), rows.shape[2])  # sum_k m log(m + eps) per pair
        for i in range(h - 1):
            shape = (b, h - 1 - i, *rows.shape[2:])
            m = m_buf[: math.prod(shape)].view(shape)
            log_m = log_buf[: math.prod(shape)].view(shape)
            torch.lerp(rows[:, i : i + 1], rows[:, i + 1 :], 0.5, out=m)  # one fused pass; exact when P_i = P_j
            torch.add(m, eps, out=log_m).log_()
            torch.linalg.vecdot(m, log_m, out=mix[:, starts[i] : starts[i + 1]])
        js = (own[:, first] + own[:, second]).mul_(0.5).sub_(mix)
        sums += js.clamp_min_(0.0).sqrt_().sum(dim=(0, 2)).to(torch.float64)
    pair_sums = torch.zeros(h, h, dtype=torch.float64, device=p.device)
    pair_sums[first, second] = sums
    return pair_sums + pair_sums.T, b * q


@dataclass
class ModuleStats:
    """What one pass over the calibration chunks collected for one depth-2 module."""

    level1: list[ChannelMoments] = field(default_factory=list)  # each level-1 output, bias excluded
    level2: ChannelMoments | FlapSampleMoments | None = None  # level-2 input channels
    js_sum: torch.Tensor | None = None  # [heads, heads] sum of JS distances
    js_rows: int = 0
    extra: dict = field(default_factory=dict)
    level2_inputs: list[torch.Tensor] = field(default_factory=list)  # per chunk, when recorded
    arity: int = 0  # attention: the length of the module's output tuple
    depth: float = 0.0  # the block's place among the pruned blocks: 0 the first, 1 the last

    @property
    def level1_moments(self) -> list[torch.Tensor]:
        """E[(A_i^T x)^2] per channel of each level-1 module (= diag(A Sigma_X A^T))."""
        return [m.second_moment for m in self.level1]

    @property
    def js(self) -> torch.Tensor:
        """Mean Jensen-Shannon distance between heads (METHOD.md section 2)."""
        return self.js_sum / max(self.js_rows, 1)

    def add_js(self, probs: torch.Tensor) -> None:
        s, rows = js_distance_sums(probs)
        self.js_sum = s if self.js_sum is None else self.js_sum + s
        self.js_rows += rows


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise FloatingPointError(f"{bad} non-finite values (NaN/Inf) in {where}")
