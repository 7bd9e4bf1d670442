"""The block engine: how any track runs a model block by block, once.

    engine = BlockEngine(model, device, chunk_size, store=None, out=None)
    stream, calls = engine.capture(input_ids)        # the stream entering block 0, every block's arguments
    for k in ...:
        with engine.visit(k, write=...) as block:    # block k on the compute device
            ...                                      # what the track does to a block (hooks, statistics, a cut)
            stream = engine.advance(block, k, stream, calls)

Resident or lazy is the engine's business: with a LazyCheckpoint as `store` (models/lazy.py),
the capture reads only the weights outside the blocks, `visit` reads block k from the
checkpoint, writes it to `out`/blocks after the track changed it (`write`), and frees it; on a
resident model `visit` moves block k to the device and back. Stage times accumulate in
`times` (`timed`); statistics accumulate in `stats_dtype` (blocks/stats.py).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from harness.blocks.stats import accumulator_dtype, check_finite
from harness.blocks.stream import BlockCall, Chunk, advance, capture, chunks_at
from harness.models import adapter_for


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """A resident model visits the compute device one block at a time."""
    home = next(block.parameters()).device
    try:
        yield block.to(device)
    finally:
        block.to(home)


class BlockEngine:
    def __init__(self, model: nn.Module, device: torch.device, chunk_size: int, store=None, out: Path | None = None):
        if store is not None and out is None:
            raise ValueError("a lazily loaded model needs `out`, the folder its changed blocks are written to")
        self.model, self.device, self.chunk_size, self.store, self.out = model, device, chunk_size, store, out
        self.adapter = adapter_for(model)
        self.blocks = self.adapter.layers(model)
        self.stats_dtype = accumulator_dtype(device)
        self.times: dict[str, float] = defaultdict(float)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[stage] += time.perf_counter() - start

    def capture(self, input_ids: torch.Tensor) -> tuple[list[Chunk], list[list[BlockCall]]]:
        """The stream entering block 0 (chunks of `chunk_size` sequences) and every block's own
        arguments for it ([block][chunk])."""
        with contextlib.nullcontext() if self.store is None else self.store.outside_blocks(self.device):
            hidden, calls = capture(self.model, self.blocks, input_ids, self.chunk_size, self.device)
        return chunks_at(hidden, calls[0]), calls

    def visit(self, k: int, write: bool) -> contextlib.AbstractContextManager[nn.Module]:
        """Block k on the compute device for the duration (a lazy model's: read from the
        checkpoint, then freed, and first written to `out` when `write`)."""
        if self.store is None:
            return on_device(self.blocks[k], self.device)
        return self.store.block(k, self.blocks[k], self.device, self.out if write else None)

    def advance(self, block: nn.Module, k: int, stream: list[Chunk], calls: list[list[BlockCall]],
                check: str | None = None) -> list[Chunk]:
        """Block k's outputs on `stream`, as the stream entering block k+1 (`check`: refuse a
        non-finite output, naming it)."""
        with torch.no_grad(), self.timed("forward"):
            out = advance(block, k, stream, calls)
        if check:
            for chunk in out:
                check_finite(chunk.hidden, check)
        return out
