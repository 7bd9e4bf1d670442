"""Uncertainty of one run's numbers and of differences between runs (METHOD.md section 12).

A record keeps the raw material (evaluate/perplexity.py, evaluate/zeroshot.py): every
perplexity window's summed NLL and every question's correctness per metric, stored compactly
(base64 of float64 / packed bits). From them, with no re-run:
- a perplexity's interval: bootstrap over blocks of consecutive windows (adjacent windows cut
  one text, so single windows are not independent), seeded, expanded percentile (see
  _percentiles); the delta method on the same blocks is the cross-check;
- an accuracy's interval: p +- z se with lm-eval's se = sqrt(p(1-p)/(n-1)); the task average's
  se = sqrt(sum se_t^2) / T;
- two runs on the same windows / questions, paired: the perplexity ratio with the block
  bootstrap of the per-window differences; the accuracy difference with the normal interval
  of the per-question differences (and McNemar's exact p on the discordant questions);
- repeated calibration seeds: mean, sample sd (ddof 1), n and a t interval; two methods run
  with the same seeds are paired by seed.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000
BLOCK_WINDOWS = 8  # windows per bootstrap block (METHOD.md: blocks of consecutive windows)
BOOTSTRAP_SEED = 0
MIN_BLOCKS = 4  # fewer blocks than this give no interval (a bootstrap over 1-3 units says nothing)


def encode_floats(values: Sequence[float] | np.ndarray) -> str:
    """float64 little-endian, base64: exact and about half the size of JSON numbers."""
    return base64.b64encode(np.asarray(values, dtype="<f8").tobytes()).decode("ascii")


def decode_floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f8")


def encode_bits(values: Sequence[bool] | np.ndarray) -> str:
    """One bit per item (numpy packbits, big-endian within a byte), base64; the count is kept beside it."""
    return base64.b64encode(np.packbits(np.asarray(values, dtype=bool)).tobytes()).decode("ascii")


def decode_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=n).astype(bool)


def _z(level: float) -> float:
    return float(stats.norm.ppf(0.5 + level / 2))


def _blocks(values: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums and sizes of consecutive blocks of `block` windows (the last may be shorter)."""
    starts = np.arange(0, len(values), block)
    return np.add.reduceat(values, starts), np.diff(np.append(starts, len(values)))


def _resampled_blocks(n_blocks: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_blocks, size=(resamples, n_blocks))


def _percentiles(draws: np.ndarray, level: float, units: int) -> tuple[float, float]:
    """The expanded percentile interval (Hesterberg 2015): the plain percentile interval of a
    bootstrap over few units is too narrow (its variance is (n-1)/n of the unbiased one, and it
    has normal tails), so the percentiles are taken at the level whose normal quantile is
    sqrt(n/(n-1)) t_{n-1}: 32 blocks use the 1.9 / 98.1 percentiles for a 95% interval."""
    if units > 1:
        widened = math.sqrt(units / (units - 1)) * stats.t.ppf(0.5 + level / 2, units - 1)
        level = 2 * stats.norm.cdf(widened) - 1
    low, high = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _bootstrap_ratio(sums: np.ndarray, sizes: np.ndarray, tokens_per_window: int, level: float, resamples: int,
                     seed: int) -> tuple[float, float]:
    """Interval of exp(sum S* / sum n*) over resampled blocks; NaN below MIN_BLOCKS blocks."""
    if len(sums) < MIN_BLOCKS:
        return math.nan, math.nan
    idx = _resampled_blocks(len(sums), resamples, seed)
    draws = np.exp(sums[idx].sum(1) / (sizes[idx].sum(1) * tokens_per_window))
    return _percentiles(draws, level, len(sums))


def _excludes(low: float, high: float, value: float) -> bool:
    """Whether a finite interval excludes `value` (a NaN interval excludes nothing)."""
    return math.isfinite(low) and math.isfinite(high) and not low <= value <= high


def ppl_interval(nll: np.ndarray, tokens_per_window: int, level: float = LEVEL, resamples: int = RESAMPLES,
                 block: int = BLOCK_WINDOWS, seed: int = BOOTSTRAP_SEED) -> dict:
    """Percentile interval of exp(sum S* / sum n*) over resampled blocks of windows."""
    sums, sizes = _blocks(np.asarray(nll, dtype=np.float64), block)
    low, high = _bootstrap_ratio(sums, sizes, tokens_per_window, level, resamples, seed)
    return {"low": low, "high": high, "level": level, "method": "block bootstrap (expanded percentile)",
            "block_windows": block,
            "resamples": resamples, "seed": seed}


def ppl_delta_interval(nll: np.ndarray, tokens_per_window: int, level: float = LEVEL,
                       block: int = BLOCK_WINDOWS) -> dict:
    """exp(mean NLL +- t_{B-1} se), se of the ratio estimator sum S / sum n over the same B blocks."""
    sums, sizes = _blocks(np.asarray(nll, dtype=np.float64), block)
    tokens = sizes * tokens_per_window
    mean = sums.sum() / tokens.sum()
    b = len(sums)
    if b < MIN_BLOCKS:
        return {"low": math.nan, "high": math.nan, "level": level, "method": "delta", "block_windows": block,
                "se_log_ppl": math.nan}
    se = math.sqrt(((sums - mean * tokens) ** 2).sum() / (b * (b - 1))) / tokens.mean()
    half = float(stats.t.ppf(0.5 + level / 2, b - 1)) * se
    return {"low": math.exp(mean - half), "high": math.exp(mean + half), "level": level, "method": "delta",
            "block_windows": block, "se_log_ppl": se}


def paired_ppl_ratio(nll_a: np.ndarray, nll_b: np.ndarray, tokens_per_window: int, level: float = LEVEL,
                     resamples: int = RESAMPLES, block: int = BLOCK_WINDOWS, seed: int = BOOTSTRAP_SEED) -> dict:
    """ppl_A / ppl_B of two runs on the same windows, with the block bootstrap of the per-window
    differences d_w = S_w^A - S_w^B; `significant` when the interval excludes 1."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired perplexities need the same windows: {len(a)} vs {len(b)}")
    sums, sizes = _blocks(a - b, block)
    low, high = _bootstrap_ratio(sums, sizes, tokens_per_window, level, resamples, seed)
    ratio = math.exp(sums.sum() / (len(a) * tokens_per_window))
    return {"ratio": ratio, "low": low, "high": high, "level": level, "significant": _excludes(low, high, 1.0),
            "method": "paired block bootstrap (expanded percentile)", "block_windows": block, "resamples": resamples, "seed": seed}


def accuracy_stderr(correct: np.ndarray) -> float:
    """sample sd / sqrt(n) = sqrt(p(1-p)/(n-1)): what lm-eval reports as acc_stderr (records take
    lm-eval's own value; this is the reference the tests and synthetic records use)."""
    n = len(correct)
    return float(np.std(np.asarray(correct, dtype=np.float64), ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def normal_interval(value: float, se: float, level: float = LEVEL) -> dict:
    half = _z(level) * se
    return {"low": value - half, "high": value + half, "level": level, "method": "normal", "se": se}


def average_stderr(stderrs: Sequence[float]) -> float:
    """se of an unweighted mean of T independent task scores: sqrt(sum se_t^2) / T."""
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def paired_accuracy(correct_a: np.ndarray, correct_b: np.ndarray, level: float = LEVEL) -> dict:
    """acc_A - acc_B on the same questions: the normal interval of the per-question differences
    and, for 0/1 correctness, McNemar's exact two-sided p on the discordant questions;
    `significant` needs both (the normal interval alone is too liberal when few questions
    differ). Fractions (a question's correctness averaged over seeds) get the interval only."""
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired accuracies need the same questions: {len(a)} vs {len(b)}")
    d = a.astype(np.float64) - b.astype(np.float64)
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    out = {"difference": float(d.mean()), **normal_interval(float(d.mean()), se, level)}
    significant = _excludes(out["low"], out["high"], 0.0)
    if a.dtype == bool and b.dtype == bool:
        only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
        p = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        out.update(mcnemar_p=float(p), only_a=only_a, only_b=only_b)
        significant = significant and p < 1 - level
    out["significant"] = significant
    return out


def seed_summary(values: Sequence[float], level: float = LEVEL) -> dict:
    """mean, sample sd (ddof 1), n and the t interval of the mean over repeated seeds."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "low": math.nan, "high": math.nan}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "low": mean - half, "high": mean + half}


def paired_seeds(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """Per-seed differences a_s - b_s (same seeds = same calibration): their mean and t interval."""
    summary = seed_summary(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), level)
    summary["significant"] = _excludes(summary["low"], summary["high"], 0.0)
    return summary
