"""Zero-shot evaluation of a model larger than memory (`model.lazy=true`) through lm-eval.

lm-eval's own HFLM does the tokenising, batching and scoring, exactly as for a model in
memory; only its model call differs. Its loglikelihood loop first runs once with shape-only
logits, which records the batches it will ask for, in order; the real loop then gets each
batch's logits from the last block's outputs of a group of those batches, computed block by
block (blockwise.py: each block read once per group, a group as many tokens as fit a quarter
of the free host memory), with the embeddings, final norm and head held for the duration.
"""

from __future__ import annotations

import time

import torch
from lm_eval.models.huggingface import HFLM

from harness.evaluate.blockwise import group_tokens, known_outputs, last_hidden
from harness.models import adapter_for


class BlockwiseLM(HFLM):
    """lm-eval's HFLM over a LazyCheckpoint's skeleton (module doc). It also reports its
    throughput as ModelCallThroughput does: tokens of the real model calls per second."""

    def __init__(self, store, tokenizer, batch_size: int, add_bos_token: bool, device: torch.device,
                 free_bytes: int | None = None):
        super().__init__(pretrained=store.model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos_token)
        self._device = device  # the skeleton's parameters are on the meta device
        self.store, self.free_bytes = store, free_bytes
        self.blocks = adapter_for(store.model).layers(store.model)
        self.planned: list[torch.Tensor] | None = None  # while recording: the batches asked for
        self.batches: list[torch.Tensor] = []  # the recorded batches the real loop will ask for
        self.hidden: dict[int, torch.Tensor] = {}  # batch index -> last block output, this group
        self.asked = 0
        self.reset()

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        self.planned = []
        try:
            super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            self.batches = self.planned
        finally:
            self.planned = None
        self.hidden, self.asked = {}, 0
        with self.store.outside_blocks(self.device, head=True):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.planned is not None:
            self.planned.append(inps.cpu())
            vocab = self.model.get_output_embeddings().weight.shape[0]
            return torch.zeros((), device=inps.device).expand(*inps.shape, vocab)
        start = time.perf_counter()
        index, self.asked = self.asked, self.asked + 1
        if index >= len(self.batches) or not torch.equal(inps.cpu(), self.batches[index]):
            raise RuntimeError(f"lm-eval asked for batch {index}, which is not the one its recorded loop asked for")
        if index not in self.hidden:
            self.hidden = self._group(index)
        hidden = self.hidden.pop(index)
        with torch.no_grad(), known_outputs(self.blocks, hidden):
            logits = self.model(input_ids=inps, use_cache=False).logits
        self.seconds += time.perf_counter() - start
        self.tokens += inps.numel()
        return logits

    def _group(self, first: int) -> dict[int, torch.Tensor]:
        """The last block's outputs of the batches from `first` on that fit the memory budget."""
        budget = group_tokens(self.model.config.hidden_size, self.free_bytes)
        end, tokens = first, 0
        while end < len(self.batches) and (end == first or tokens + self.batches[end].numel() <= budget):
            tokens += self.batches[end].numel()
            end += 1
        hidden = last_hidden(self.store, [b.to(self.device) for b in self.batches[first:end]], self.device)
        return dict(zip(range(first, end), hidden, strict=True))

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generation needs the whole model in memory; with model.lazy=true lm-eval can score "
                                  "loglikelihood tasks (the seven zero-shot tasks), not generation tasks")
