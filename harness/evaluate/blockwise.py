"""Evaluating a model larger than memory (`model.lazy=true`), one block at a time.

Perplexity: the same windows, targets and float64 NLL sum as perplexity.py, but the windows
go through the model in groups: a group's hidden states pass block by block (each block read
from the checkpoint, run over the group in batches, freed), and the model's own forward then
turns the last block's outputs into logits (every block's forward replaced by the known
result, so only the embeddings, the final norm and the head run). A group is as many windows
as fit a quarter of the free host memory (two copies of the hidden states in float32); every
group reads the whole checkpoint once.

Zero-shot: blockwise_lm.BlockwiseLM, whose batches go through the blocks in groups the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from harness.blocks.stream import advance, capture, chunks_at, forwards_replaced
from harness.environment import free_memory
from harness.evaluate.windows import ppl_of, resumable, window_nll, windows
from harness.models import adapter_for


def group_tokens(hidden_size: int, free_bytes: int | None = None) -> int:
    """Tokens whose hidden states (two float32 copies) fit a quarter of the free host memory."""
    free_bytes = free_memory(torch.device("cpu")) if free_bytes is None else free_bytes
    return free_bytes // 4 // (2 * hidden_size * 4)


def group_windows(hidden_size: int, seqlen: int, batch_size: int, free_bytes: int | None = None) -> int:
    return max(batch_size, group_tokens(hidden_size, free_bytes) // seqlen // batch_size * batch_size)


@torch.no_grad()
def last_hidden(store, batches: list[torch.Tensor], device: torch.device, read_outside: bool = False) -> list[torch.Tensor]:
    """The last block's output for each batch of token ids, every block read once. The capture
    runs the weights outside the blocks: with `read_outside` they are read for it and freed
    before the blocks run, else they must be in memory already (store.outside_blocks)."""
    model = store.model
    blocks = adapter_for(model).layers(model)
    hidden, calls = [], [[] for _ in blocks]
    with store.outside_blocks(device) if read_outside else contextlib.nullcontext():
        for batch in batches:
            first, per_block = capture(model, blocks, batch, len(batch), device)
            hidden += first
            for k, block_calls in enumerate(per_block):
                calls[k] += block_calls
    stream = chunks_at(hidden, calls[0])
    for k, block in enumerate(blocks):
        with store.block(k, block, device):
            stream = advance(block, k, stream, calls)
    return [chunk.hidden for chunk in stream]


@contextmanager
def known_outputs(blocks: nn.ModuleList, last: torch.Tensor) -> Iterator[None]:
    """Every block passes its input through, the last returns `last`: the model's forward
    then computes only what lies outside the blocks."""
    def passthrough(*a, **kw):
        return a[0] if a else kw["hidden_states"]

    with forwards_replaced(blocks, [passthrough] * (len(blocks) - 1) + [lambda *a, **kw: last]):
        yield


@torch.no_grad()
def blockwise_perplexity_of(store, ids: torch.Tensor, seqlen: int, batch_size: int = 8, max_tokens: int | None = None,
                            bos_id: int | None = None, progress: dict | None = None, save=lambda: None,
                            device: torch.device | None = None,
                            free_bytes: int | None = None) -> tuple[float, int, float]:
    """(ppl, windows, tokens/s) as perplexity_of, for a LazyCheckpoint's skeleton; resumable
    by group through `progress` like perplexity_of."""
    model, device = store.model, device or torch.device("cpu")
    blocks = adapter_for(model).layers(model)
    w = windows(ids, seqlen, max_tokens, bos_id)
    group = group_windows(model.config.hidden_size, seqlen, batch_size, free_bytes)
    state = resumable(progress, windows_total=len(w), group=group)
    first = state["resumed_from"] = state["windows_done"]
    start = time.perf_counter()
    for part in w[first:].split(group):
        batches = list(part.split(batch_size))
        outputs = last_hidden(store, batches, device, read_outside=True)
        nll: list[float] = []
        with store.outside_blocks(device, head=True):
            for batch, last in zip(batches, outputs, strict=True):
                batch = batch.to(device)
                with known_outputs(blocks, last):
                    loss = window_nll(model(input_ids=batch, use_cache=False).logits, batch)
                if not torch.isfinite(loss).all():
                    raise FloatingPointError("non-finite loss in the block-wise perplexity")
                nll += loss.tolist()
        state.update({"windows_done": state["windows_done"] + len(part), "nll_windows": state["nll_windows"] + nll,
                      "tokens": state["tokens"] + part[:, 1:].numel()})
        save()
    value = ppl_of(state["nll_windows"], state["tokens"])
    return value, len(w), (len(w) - first) * seqlen / max(time.perf_counter() - start, 1e-9)
