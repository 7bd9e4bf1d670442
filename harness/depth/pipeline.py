"""The depth track on the block engine: whole blocks removed (METHOD.md section 11).

One dense pass over the calibration stream gives what the method reads: each block's influence
(ShortGPT) on raw block inputs and outputs (not HF's hidden_states, whose last entry is after the
final norm), and the hidden state at every sequence's last token entering each block (angular
distance). The greedy searches (SLEB over blocks, BlockPruner over sub-blocks: one block's
attention or MLP) read the calibration NLL with units skipped in place (a whole block not run, a
sub-block's output map returning zeros): each step runs the model once with the units removed
so far skipped, caching every block's input, and each candidate then runs only the blocks from
its own on (half the block forwards of re-running the prefix). The chosen units are deleted
(models/surgery.py); with remedy=replaceme the run chosen by the angular distance is replaced by
a linear map folded into the down projection of the block before it (replaceme.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.blocks.engine import BlockEngine
from harness.blocks.stream import BlockCall, forwards_replaced
from harness.depth.methods import DepthContext, DepthMethod
from harness.depth.replaceme import replace_run
from harness.evaluate.blockwise import known_outputs
from harness.evaluate.windows import window_nll
from harness.models.base import out_features
from harness.models.surgery import PARTS, Unit, remove_sub_blocks, unit_params
from harness.settings import PruneSettings, n_params


def whole(blocks: Iterable[int]) -> frozenset[Unit]:
    """Every sub-block of the blocks given."""
    return frozenset((k, part) for k in blocks for part in PARTS)


@dataclass
class DepthReport:
    removed: list[int]  # whole blocks, original indices, in the order the method chose them
    kept: list[int]
    params_before: int
    params_after: int
    seconds: float
    scores: dict = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    remedy: dict = field(default_factory=dict)
    full_forwards: float = 0.0  # block forwards over the calibration set, in units of whole-model forwards
    sub_blocks: list[Unit] = field(default_factory=list)  # a sub-block method's units, in the order chosen

    @property
    def sparsity_achieved(self) -> float:
        return 1 - self.params_after / self.params_before


def blocks_to_remove(model: nn.Module, blocks: nn.ModuleList, settings: PruneSettings) -> int:
    """`prune.blocks` when set, else the count whose parameters come closest to `sparsity` of the model's."""
    if settings.blocks is not None:
        return settings.blocks
    per_block = sum(n_params(b) for b in blocks) / len(blocks)
    return round(settings.sparsity * n_params(model) / per_block)


class SkippingStream:
    """The calibration set as the block engine streams it, through the blocks one at a time
    (`run_block`), and the NLL of the model with any units (block, part) skipped in place."""

    def __init__(self, engine: BlockEngine, input_ids: torch.Tensor):
        self.engine, self.model, self.blocks = engine, engine.model, engine.blocks
        stream, self.calls = engine.capture(input_ids)
        self.first = [c.hidden for c in stream]
        self.ids = list(input_ids.split(engine.chunk_size))
        self.tokens = sum(ids[:, 1:].numel() for ids in self.ids)
        self.block_forwards = 0
        self._inputs: dict[frozenset[Unit], list[list[torch.Tensor]]] = {}

    def run_block(self, k: int, hidden: list[torch.Tensor], without: Iterable[str] = ()) -> list[torch.Tensor]:
        """Block k over every chunk's hidden states, its parts `without` adding nothing (a block
        without both is not run); counted in `block_forwards`."""
        without = set(without)
        if without >= set(PARTS):
            return hidden
        self.block_forwards += 1
        calls: list[BlockCall] = self.calls[k]
        block = self.blocks[k]
        maps = [self.engine.adapter.level2_outputs(block)[PARTS.index(part)] for part in sorted(without)]
        with forwards_replaced(maps, [_zeros_from(m) for m in maps]):
            return [call(block, h) for call, h in zip(calls, hidden, strict=True)]

    @torch.no_grad()
    def inputs(self, removed: frozenset[Unit]) -> list[list[torch.Tensor]]:
        """Every block's input (per chunk) with `removed` skipped, computed once per set."""
        if removed not in self._inputs:
            hidden, out = self.first, []
            for k in range(len(self.blocks)):
                out.append(hidden)
                hidden = self.run_block(k, hidden, _parts(removed, k))
            out.append(hidden)  # x_L
            self._inputs = {removed: out}  # the previous step's cache is no longer needed
        return self._inputs[removed]

    @torch.no_grad()
    def nll(self, removed: frozenset[Unit], skip: frozenset[Unit] = frozenset()) -> float:
        """Mean NLL per predicted token with the units `removed` and `skip` skipped in place;
        the blocks before `skip`'s first come from the cache for `removed`."""
        start = min((k for k, _ in skip), default=len(self.blocks))
        hidden = self.inputs(removed)[start]
        gone = removed | skip
        for k in range(start, len(self.blocks)):
            hidden = self.run_block(k, hidden, _parts(gone, k))
        total = 0.0
        for ids, last in zip(self.ids, hidden, strict=True):
            ids = ids.to(last.device)
            with known_outputs(self.blocks, last):
                total += float(window_nll(self.model(input_ids=ids, use_cache=False).logits, ids).sum())
        return total / self.tokens

    def block_nll(self, removed: set[int], skip: int | None = None) -> float:
        """`nll` with whole blocks removed and skipped (SLEB's view)."""
        return self.nll(whole(removed), whole([] if skip is None else [skip]))

    def sub_block_nll(self, removed: Iterable[Unit], skip: Unit) -> float:
        return self.nll(frozenset(removed), frozenset([skip]))


def _parts(units: frozenset[Unit], k: int) -> set[str]:
    return {part for j, part in units if j == k}


def _zeros_from(module: nn.Module):
    """A forward for `module` that returns zeros of its output's shape."""
    width = out_features(module)

    def forward(x: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], width)
    return forward


@torch.no_grad()
def dense_statistics(cal: SkippingStream) -> tuple[list[float], list[torch.Tensor]]:
    """(influence BI_l per block, x_0 .. x_L at each sequence's last token) from one dense pass
    that keeps nothing per token."""
    hidden, influence, last = cal.first, [], [torch.cat([h[:, -1] for h in cal.first])]
    for k in range(len(cal.blocks)):
        out = cal.run_block(k, hidden)
        ones_minus_cos = sum(float((1 - nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum())
                             for x, y in zip(hidden, out, strict=True))  # float32: fp16 overflows (NaN)
        influence.append(ones_minus_cos / sum(x.shape[0] * x.shape[1] for x in hidden))
        last.append(torch.cat([h[:, -1] for h in out]))
        hidden = out
    return influence, last


@torch.no_grad()
def hf_statistics(cal: SkippingStream) -> tuple[list[float], list[torch.Tensor]]:
    """The same statistics on transformers' `output_hidden_states` (x_0 .. x_{L-1}, then the last
    block's output after the final norm), as the reference implementations read them."""
    sums, tokens, last = None, 0, []
    for ids in cal.ids:
        states = cal.model(input_ids=ids.to(cal.first[0].device), output_hidden_states=True,
                           use_cache=False).hidden_states
        terms = [float((1 - nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum())
                 for x, y in zip(states[:-1], states[1:], strict=True)]
        sums = terms if sums is None else [a + b for a, b in zip(sums, terms, strict=True)]
        tokens += ids.numel()
        last.append([h[:, -1] for h in states])
    return [s / tokens for s in sums], [torch.cat(parts) for parts in zip(*last, strict=True)]


def prune_depth(model: nn.Module, input_ids: torch.Tensor, method: DepthMethod, settings: PruneSettings,
                device: torch.device | None = None) -> DepthReport:
    """Remove whole blocks, or sub-blocks, of `model` (in memory) chosen by `method` on
    calibration `input_ids`."""
    start = time.perf_counter()
    device = device or next(model.parameters()).device
    engine = BlockEngine(model, device, settings.chunk_size)
    blocks = engine.blocks
    count = len(blocks)
    before = n_params(model)
    ctx = DepthContext(count, generator=torch.Generator().manual_seed(settings.seed))
    with engine.timed("statistics"):
        cal = SkippingStream(engine, input_ids)
        if method.needs & {"influence", "last_token"} or settings.remedy == "replaceme":
            statistics = hf_statistics if method.hidden_states == "hf" else dense_statistics
            ctx.influence, ctx.last_token = statistics(cal)
        ctx.nll, ctx.sub_block_nll = cal.block_nll, cal.sub_block_nll
    if method.unit == "sub-block":
        ctx.unit_params = {(k, part): size for k, b in enumerate(blocks)
                           for part, size in unit_params(engine.adapter, b).items()}
        ctx.target_params = settings.sparsity * before
        n = settings.blocks  # prune.blocks counts sub-blocks here; None: nearest the target
    else:
        n = blocks_to_remove(model, blocks, settings)
    with engine.timed("scoring"):
        chosen = method.choose(n, ctx) if n != 0 else []
    if method.unit == "sub-block":  # whole blocks: those that lost both parts, in the order first touched
        units, removed = chosen, [k for k in dict.fromkeys(k for k, _ in chosen) if whole([k]) <= set(chosen)]
    else:
        units, removed = list(whole(chosen)), chosen
    remedy = {}
    if settings.remedy == "replaceme" and removed:
        with engine.timed("replaceme"):
            remedy = replace_run(engine.adapter, cal, removed, settings.damp)
    with engine.timed("cut"):
        kept = remove_sub_blocks(model, units)
    forwards = cal.block_forwards / count
    return DepthReport(removed, kept, before, n_params(model), time.perf_counter() - start, ctx.scores,
                       dict(engine.times), remedy, forwards, units if method.unit == "sub-block" else [])
