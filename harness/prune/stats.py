"""Streaming statistics from forward hooks: nothing is kept per token.

Memory per module: three vectors (float64 on CPU, float32 on GPU) over each level-1 output
and over the level-2 input channels, one h x h divergence matrix per block, and for
recovery two d x d cross products. Peak = those plus one
calibration chunk's activations inside the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class ChannelMoments:
    """Per-channel mean, second moment and variance over tokens (Chan/Welford merge)."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        self.n = 0
        self.mean = torch.zeros(width, dtype=dtype, device=device)
        self.m2 = torch.zeros(width, dtype=dtype, device=device)  # sum of squared deviations
        self.sq = torch.zeros(width, dtype=dtype, device=device)  # sum of squares

    def update(self, x: torch.Tensor) -> None:
        # chunk moments in (at least) float32, merged in the accumulator's precision
        x = x.reshape(-1, x.shape[-1])
        x = x.float() if x.element_size() < 4 else x
        nb = x.shape[0]
        var_b, mean_b = torch.var_mean(x, 0, correction=0)
        mb, m2b = mean_b.to(self.mean.dtype), var_b.to(self.mean.dtype) * nb
        delta = mb - self.mean
        total = self.n + nb
        self.mean += delta * nb / total
        self.m2 += m2b + delta**2 * self.n * nb / total
        self.sq += (m2b + mb**2 * nb)
        self.n = total

    @property
    def second_moment(self) -> torch.Tensor:
        return self.sq / max(self.n, 1)

    @property
    def variance(self) -> torch.Tensor:
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


def js_distance_sums(probs: torch.Tensor, eps: float = 1e-10) -> tuple[torch.Tensor, int]:
    """Sum over query rows of sqrt(JS(P_i || P_j)) for every head pair, and the row count.

    probs: [batch, heads, q, k] attention probabilities (causal: masked keys are exactly 0,
    so they add nothing). Returns an [heads, heads] symmetric matrix with zero diagonal.
    """
    p = probs.to(torch.float32)
    b, h, q, _ = p.shape
    logp = torch.log(p + eps)  # once per head, not once per pair
    out = torch.zeros(h, h, dtype=torch.float64, device=p.device)
    for i in range(h - 1):
        pi, pj = p[:, i : i + 1], p[:, i + 1 :]
        log_m = torch.log(0.5 * (pi + pj) + eps)
        kl_i = (pi * (logp[:, i : i + 1] - log_m)).sum(-1)
        kl_j = (pj * (logp[:, i + 1 :] - log_m)).sum(-1)
        js = (0.5 * (kl_i + kl_j)).clamp_min(0.0)
        d = js.sqrt().sum(dim=(0, 2)).to(torch.float64)
        out[i, i + 1 :] = d
        out[i + 1 :, i] = d
    return out, b * q


@dataclass
class ModuleStats:
    """What one pass over the calibration chunks collected for one depth-2 module."""

    level1: list[ChannelMoments] = field(default_factory=list)  # each level-1 output, bias excluded
    level2: ChannelMoments | FlapSampleMoments | None = None  # level-2 input channels
    js_sum: torch.Tensor | None = None  # [heads, heads] sum of JS distances
    js_rows: int = 0
    extra: dict = field(default_factory=dict)
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
