"""Calibration sets: sequences of `seqlen` tokens, drawn reproducibly from one source or a mixture.

A calibration names its sources in one string, as a sweep reads it:
  c4                          one source, `n_samples` sequences
  wikitext2+bookcorpus        a mixture, n_samples split evenly (the remainder to the first)
  wikitext2:8+bookcorpus:8    per-source counts, which must sum to n_samples
Each source draws with its own generator seeded by `seed`, so a single source gives exactly
the sequences it gives alone.

Sources. Corpora (wikitext2, ptb, c4, bookcorpus: their train splits): the split's documents
are joined by blank lines and tokenised once (no special tokens), then window starts are drawn
uniformly. `selfgen` (the paper's data-free setting) samples text from the model itself,
starting from its BOS (or EOS) token. `downstream` (downstream.py): the count is of task
examples, as the paper counts them; they are packed into as many windows as they fill.
With `bos=window` (models trained with BOS at the start of every sequence, as Gemma) every
sequence is BOS followed by seqlen-1 tokens of text, as in perplexity evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from harness.data import documents, downstream
from harness.data.tokens import bos_token_id, token_ids

DATASETS = {"wikitext2": ("wikitext2", "train"), "ptb": ("ptb", "train"), "c4": ("c4", "train"),
            "bookcorpus": ("bookcorpus", "train")}
ACCEPTED = (*DATASETS, "selfgen", "downstream")


def sources(spec: str, n_samples: int, key: str = "calibration") -> list[tuple[str, int]]:
    """(source, count) per part of a calibration string; see the module doc (`key`: the config
    section it came from, for the messages)."""
    parts = [part.strip() for part in str(spec).split("+")]
    named = [part.partition(":") for part in parts]
    names = [name for name, _, _ in named]
    for name in names:
        if name not in ACCEPTED:
            raise ValueError(f"{key}.dataset={spec!r}: unknown source {name!r}; accepted: {', '.join(ACCEPTED)}, "
                             "or a mixture such as wikitext2+bookcorpus or wikitext2:8+bookcorpus:8")
    if len(set(names)) < len(names):
        raise ValueError(f"{key}.dataset={spec!r} names a source twice; accepted: each source once")
    counted = [bool(sep) for _, sep, _ in named]
    if any(counted) and not all(counted):
        raise ValueError(f"{key}.dataset={spec!r}: give a count for every source or for none")
    if all(counted):
        try:
            counts = [int(count) for _, _, count in named]
        except ValueError:
            raise ValueError(f"{key}.dataset={spec!r}: counts must be integers, as in wikitext2:8+bookcorpus:8") from None
        if any(c < 1 for c in counts) or sum(counts) != n_samples:
            raise ValueError(f"{key}.dataset={spec!r}: the counts {counts} must be >= 1 and sum to "
                             f"{key}.n_samples={n_samples}")
        return list(zip(names, counts, strict=True))
    if n_samples < len(names):
        raise ValueError(f"{key}.n_samples={n_samples} cannot be split over the {len(names)} sources of {spec!r}")
    base, extra = divmod(n_samples, len(names))
    return [(name, base + (i < extra)) for i, name in enumerate(names)]


@dataclass
class CalibrationSet:
    ids: torch.Tensor  # LongTensor [sequences, seqlen]
    parts: list[dict] = field(default_factory=list)  # per source: what was drawn from where

    def describe(self) -> dict:
        """What the record keeps: the sources, the sequences and a hash that identifies the tokens."""
        data = self.ids.to(torch.int64).contiguous().numpy().tobytes()
        return {"sources": self.parts, "sequences": int(self.ids.shape[0]), "tokens": int(self.ids.numel()),
                "sha256": hashlib.sha256(data).hexdigest()}


def draw(tokenizer, dataset: str, n_samples: int, seqlen: int, seed: int, model=None, data_dir: str | None = None,
         bos: str = "stream", downstream_tasks: Sequence[str] | None = None,
         downstream_split: str = "auto") -> CalibrationSet:
    """The calibration set a config names (see the module doc)."""
    bos_id = bos_token_id(tokenizer, bos)
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"calibration needs n_samples >= 1 and seqlen >= 2; got n_samples={n_samples}, seqlen={seqlen}")
    rows, parts = [], []
    for source, count in sources(dataset, n_samples):
        gen = torch.Generator().manual_seed(seed)
        part = {"source": source, "count": count}
        if source == "selfgen":  # generation starts from BOS anyway
            ids = self_generated(model, tokenizer, count, seqlen, gen)
        elif source == "downstream":
            ids, drawn = downstream.windows(tokenizer, count, seqlen, gen, bos_id, downstream_tasks, downstream_split)
            part.update(drawn)
        else:
            ids = corpus_windows(tokenizer, source, count, seqlen, gen, bos_id, data_dir)
            part["split"] = DATASETS[source][1]
        part["sequences"] = int(ids.shape[0])
        rows.append(ids)
        parts.append(part)
    return CalibrationSet(torch.cat(rows), parts)


def batches(tokenizer, dataset: str, n_samples: int, seqlen: int, seed: int, model=None,
            data_dir: str | None = None, bos: str = "stream") -> torch.Tensor:
    """LongTensor [sequences, seqlen] (`draw` without the description)."""
    return draw(tokenizer, dataset, n_samples, seqlen, seed, model, data_dir, bos).ids


def corpus_windows(tokenizer, source: str, n_samples: int, seqlen: int, gen: torch.Generator, bos_id: int | None,
                   data_dir: str | None) -> torch.Tensor:
    corpus, split = DATASETS[source]
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
        raise ValueError(f"calibration set {source} has {len(ids)} tokens, fewer than seqlen={seqlen}")
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


def check_available(dataset: str, n_samples: int, data_dir: str | None, downstream_tasks: Sequence[str] | None,
                    downstream_split: str, key: str = "calibration", seqlen: int | None = None) -> None:
    """Read every source's text (and the task examples) so that missing data fails before a model
    loads; with `seqlen`, refuse more window tokens than a source has characters (an upper bound on
    its tokens): such windows could only repeat the same text."""
    for source, count in sources(dataset, n_samples, key):
        if source in DATASETS:
            chars = sum(len(d) for d in documents(*DATASETS[source], data_dir))
            if seqlen and count * seqlen > chars:
                raise ValueError(f"{key}.n_samples={n_samples}: {count} windows of {seqlen} tokens from {source} "
                                 f"need {count * seqlen:,} tokens and its text has {chars:,} characters; accepted: "
                                 f"at most {chars // seqlen:,} windows of {seqlen} tokens from {source}")
        elif source == "downstream":
            downstream.sample_pool(downstream_tasks, downstream_split, count, key)
