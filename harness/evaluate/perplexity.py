"""Perplexity with the pruning papers' protocol (METHOD.md section 7).

The split is joined into one stream (corpora.PROTOCOLS), tokenised once as the model's
tokenizer does it (a BOS, where the tokenizer adds one, only at the very start), cut into
non-overlapping windows of `seqlen` tokens with the tail dropped; every window predicts its
seqlen-1 next tokens; ppl = exp(mean cross-entropy over all predicted tokens), accumulated
in float64 from float32 logits.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.data import evaluation_text


@dataclass
class Perplexity:
    value: float
    dataset: str
    split: str
    protocol: str
    seqlen: int
    windows: int
    tokens: int  # tokens fed to the model (windows x seqlen)
    stream_tokens: int  # tokens in the whole tokenised split
    tokens_per_second: float

    def as_dict(self) -> dict:
        return asdict(self)


def windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    n = len(ids) // seqlen
    if max_tokens:
        n = min(n, max_tokens // seqlen)
    if n == 0:
        raise ValueError(f"text of {len(ids)} tokens has no full window of seqlen={seqlen} (max_tokens={max_tokens})")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity_of(model, ids: torch.Tensor, seqlen: int, batch_size: int = 8, max_tokens: int | None = None,
                  desc: str = "perplexity") -> tuple[float, int, float]:
    """(ppl, windows, tokens/s) of a token stream."""
    device = next(model.parameters()).device
    w = windows(ids, seqlen, max_tokens)
    nll, count = 0.0, 0
    start = time.perf_counter()
    for batch in tqdm(w.split(batch_size), desc=desc, disable=None):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss in {desc}")
        nll += loss.item()
        count += batch[:, 1:].numel()
    elapsed = time.perf_counter() - start
    return math.exp(nll / count), len(w), w.numel() / max(elapsed, 1e-9)


def evaluate(model, tokenizer, dataset: str, protocol: str, seqlen: int, batch_size: int = 8,
             max_tokens: int | None = None, data_dir: str | None = None) -> Perplexity:
    text, split = evaluation_text(dataset, protocol, data_dir)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    value, n, tps = perplexity_of(model, ids, seqlen, batch_size, max_tokens, desc=f"ppl {dataset}")
    return Perplexity(value, dataset, split, protocol, seqlen, n, n * seqlen, len(ids), tps)
