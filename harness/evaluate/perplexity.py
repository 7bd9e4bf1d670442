"""Perplexity with the pruning papers' protocol (METHOD.md section 7).

The split is joined into one stream (corpora.PROTOCOLS), tokenised once, cut into
non-overlapping windows of `seqlen` tokens with the tail dropped; every window predicts its
seqlen-1 next tokens; ppl = exp(mean cross-entropy over all predicted tokens), accumulated
in float64 from float32 logits. Where the BOS token goes (`bos`, set per model config):
- `stream` (the papers' protocol): as the tokenizer adds it, once, at the stream's start;
- `window`: every window is BOS followed by the next seqlen-1 tokens of the stream (no
  special tokens), so every window still predicts seqlen-1 text tokens. Models trained
  with a BOS at the start of every sequence (Gemma) need it.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from harness import uncertainty
from harness.data import evaluation_text
from harness.data.tokens import bos_token_id, token_ids
from harness.evaluate.blockwise import blockwise_perplexity_of
from harness.evaluate.windows import ppl_of, resumable, window_nll, windows


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
    tokens_per_second: float  # over the windows this attempt ran
    bos: str = "stream"  # BOS_PLACEMENTS
    windows_resumed: int = 0  # windows an interrupted earlier attempt had finished
    # Every window's summed NLL in stream order (uncertainty.encode_floats); each window predicts
    # tokens_per_window tokens, so value == exp(sum / (windows * tokens_per_window)) exactly.
    nll_windows: str = ""
    tokens_per_window: int = 0
    interval: dict | None = None  # uncertainty.ppl_interval: block bootstrap over windows
    interval_delta: dict | None = None  # uncertainty.ppl_delta_interval: the cross-check
    windows_sha256: str = ""  # of the windows' token ids: paired tests check two runs read the same text

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity_of(model, ids: torch.Tensor, seqlen: int, batch_size: int = 8, max_tokens: int | None = None,
                  desc: str = "perplexity", bos_id: int | None = None, progress: dict | None = None,
                  save=lambda: None, save_every_s: float = 30.0) -> tuple[float, int, float]:
    """(ppl, windows, tokens/s) of a token stream (`bos_id`: BOS at the start of every window).

    `progress` makes the loop resumable: after every batch it holds the windows done and
    their summed NLL (an interrupted run writes it with its record); passed back in, the loop
    continues after those windows and gives the same value as one uninterrupted pass. `save`
    is called after the first batch and then every `save_every_s` seconds, for a kill that
    leaves no time to write. tokens/s counts the windows this call ran."""
    device = next(model.parameters()).device
    w = windows(ids, seqlen, max_tokens, bos_id)
    state = resumable(progress, windows_total=len(w), batch_size=batch_size)
    start, last_save = time.perf_counter(), -math.inf
    first = state["resumed_from"] = state["windows_done"]
    for batch in tqdm(w[first:].split(batch_size), desc=desc, disable=None, initial=first // batch_size,
                      total=-(-len(w) // batch_size)):
        batch = batch.to(device)
        nll = window_nll(model(input_ids=batch, use_cache=False).logits, batch)
        if not torch.isfinite(nll).all():
            raise FloatingPointError(f"non-finite loss in {desc}")
        # One update call, so a signal arriving between batches never sees half a step.
        state.update({"windows_done": state["windows_done"] + len(batch),
                      "nll_windows": state["nll_windows"] + nll.tolist(),
                      "tokens": state["tokens"] + batch[:, 1:].numel()})
        if time.perf_counter() - last_save > save_every_s:
            save()
            last_save = time.perf_counter()
    elapsed = time.perf_counter() - start
    value = ppl_of(state["nll_windows"], state["tokens"])
    return value, len(w), (len(w) - first) * seqlen / max(elapsed, 1e-9)


def evaluate(model, tokenizer, dataset: str, protocol: str, seqlen: int, batch_size: int = 8,
             max_tokens: int | None = None, data_dir: str | None = None, bos: str = "stream",
             progress: dict | None = None, save=lambda: None, store=None, device=None) -> Perplexity:
    """`store`: the LazyCheckpoint of a model larger than memory (`model` is then its
    skeleton), evaluated block by block on `device` (evaluate/blockwise.py)."""
    text, split = evaluation_text(dataset, protocol, data_dir)
    bos_id = bos_token_id(tokenizer, bos)
    ids = token_ids(tokenizer, text, add_special_tokens=bos_id is None)
    progress = {} if progress is None else progress
    if store is not None:
        value, n, tps = blockwise_perplexity_of(store, ids, seqlen, batch_size, max_tokens, bos_id, progress, save,
                                                device)
    else:
        value, n, tps = perplexity_of(model, ids, seqlen, batch_size, max_tokens, desc=f"ppl {dataset}",
                                      bos_id=bos_id, progress=progress, save=save)
    nll = progress["nll_windows"]
    digest = hashlib.sha256(windows(ids, seqlen, max_tokens, bos_id).numpy().astype("<i8").tobytes()).hexdigest()
    return Perplexity(value, dataset, split, protocol, seqlen, n, n * seqlen, len(ids), tps, bos,
                      progress["resumed_from"], uncertainty.encode_floats(nll), seqlen - 1,
                      uncertainty.ppl_interval(nll, seqlen - 1), uncertainty.ppl_delta_interval(nll, seqlen - 1),
                      digest)
