"""The perplexity windows and their sums, shared by the in-memory loop (perplexity.py) and the
block-by-block one (blockwise.py): the stream cut into windows, each window's summed NLL, the
perplexity of those sums, and the progress an interrupted evaluation resumes from."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None, bos_id: int | None = None) -> torch.Tensor:
    """[n, seqlen] windows of the stream; with `bos_id`, each is BOS + seqlen-1 stream tokens."""
    step = seqlen if bos_id is None else seqlen - 1
    n = len(ids) // step
    if max_tokens:
        n = min(n, max_tokens // seqlen)
    if n == 0:
        raise ValueError(f"text of {len(ids)} tokens has no full window of seqlen={seqlen} (max_tokens={max_tokens})")
    w = ids[: n * step].view(n, step)
    return w if bos_id is None else torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], 1)


# Positions go through the log-softmax in pieces of at most this many bytes: a temporary under
# glibc's 32 MiB mmap ceiling is reused from the heap instead of mapped and faulted in afresh
# for every batch (a whole batch's is batch x seqlen x vocab floats, 200 MB for smollm2 at 8 x 128).
NLL_PIECE_BYTES = 16 * 2**20


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64) of each window's next tokens, one value per window. The last position
    has no target: it is ignored rather than sliced off, so the logits are read in place, never
    copied. Each position's NLL is float32 (as cross_entropy gives it); the sums are float64."""
    targets = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], 1).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, NLL_PIECE_BYTES // (4 * flat.shape[1]))
    per_position = torch.cat([F.cross_entropy(flat[i:i + rows].float(), targets[i:i + rows], reduction="none")
                              for i in range(0, len(flat), rows)])
    return per_position.view(batch.shape).double().sum(1)


def ppl_of(nll_windows: list[float], tokens: int) -> float:
    """exp(sum of the windows' NLL / tokens), the sum exact (math.fsum): the stored per-window
    sums give back the recorded value whatever order a reader adds them in."""
    return math.exp(math.fsum(nll_windows) / tokens)


def resumable(progress: dict | None, **layout) -> dict:
    """The progress to continue from: `progress` as it is when an earlier attempt ran the same
    windows in the same `layout` (and kept per-window sums), else emptied to start over."""
    state = progress if progress is not None else {}
    if any(state.get(k) != v for k, v in layout.items()) or "nll_windows" not in state:
        state.update({**layout, "windows_done": 0, "nll_windows": [], "tokens": 0})
        state.pop("nll", None)  # the single sum of an attempt from before per-window sums were kept
    return state
