"""Calibration batches: `n_samples` windows of `seqlen` tokens, drawn reproducibly.

Real text: the split's documents are joined by blank lines and tokenised once (no special
tokens), then `n_samples` window starts are drawn uniformly with the seed. With `bos=window`
(models trained with BOS at the start of every sequence, as Gemma) each sample is BOS
followed by seqlen-1 tokens of text, as in perplexity evaluation. `selfgen` (the
paper's data-free setting) samples the text from the model itself, starting from its BOS
(or EOS) token, with the same seed.
"""

from __future__ import annotations

import torch

from harness.data import documents
from harness.data.tokens import token_ids
from harness.evaluate.perplexity import bos_token_id

DATASETS = {"wikitext2": ("wikitext2", "train"), "ptb": ("ptb", "train"), "c4": ("c4", "train")}
ACCEPTED = (*DATASETS, "selfgen")


def batches(tokenizer, dataset: str, n_samples: int, seqlen: int, seed: int, model=None,
            data_dir: str | None = None, bos: str = "stream") -> torch.Tensor:
    """LongTensor [n_samples, seqlen]."""
    bos_id = bos_token_id(tokenizer, bos)
    if dataset not in ACCEPTED:
        raise ValueError(f"unknown calibration dataset {dataset!r}; accepted: {', '.join(ACCEPTED)}")
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"calibration needs n_samples >= 1 and seqlen >= 2; got n_samples={n_samples}, seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    if dataset == "selfgen":  # generation starts from BOS anyway
        return self_generated(model, tokenizer, n_samples, seqlen, gen)
    corpus, split = DATASETS[dataset]
    docs = documents(corpus, split, data_dir)
    # Enough text for the windows without tokenising a whole large corpus.
    budget_chars = n_samples * seqlen * 40
    text, used = [], 0
    for d in docs:
        text.append(d)
        used += len(d)
        if used > budget_chars:
            break
    ids = token_ids(tokenizer, "\n\n".join(text), add_special_tokens=False)
    if len(ids) <= seqlen:
        raise ValueError(f"calibration set {dataset} has {len(ids)} tokens, fewer than seqlen={seqlen}")
    if bos_id is None:
        starts = torch.randint(0, len(ids) - seqlen, (n_samples,), generator=gen)
        return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    starts = torch.randint(0, len(ids) - seqlen + 1, (n_samples,), generator=gen)
    head = torch.tensor([bos_id], dtype=torch.long)
    return torch.stack([torch.cat([head, ids[s : s + seqlen - 1]]) for s in starts.tolist()])


@torch.no_grad()
def self_generated(model, tokenizer, n_samples: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    if model is None:
        raise ValueError("calibration=selfgen needs the model to sample from")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    rows = []
    for _ in range(0, n_samples, 16):
        n = min(16, n_samples - len(rows))
        prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
        out = model.generate(prompt, do_sample=True, top_k=50, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                             pad_token_id=tokenizer.eos_token_id)
        rows.extend(out[:, :seqlen].cpu())
    return torch.stack(rows)
