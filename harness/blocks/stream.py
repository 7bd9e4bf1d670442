"""The calibration stream and each block's own arguments.

A decoder block receives more than hidden states: a causal mask (GPT-2 passes it
positionally), position ids, rotary embeddings, and in models that mix attention types
(Gemma-3, Qwen2 with sliding windows) a different mask and rotary table per layer. Rather
than guessing these from a list of known architectures, we let the model's own forward
hand them over: every block is temporarily replaced by a recorder that keeps what it was
called with and passes its input through unchanged (the arguments depend only on the
token ids, never on earlier blocks' outputs, which the conformance test checks for every
supported model type). The last recorder ends the forward, so neither the blocks nor the
head are computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache

# Arguments that belong to generation, not to one stateless forward of a block.
_CACHE_KWARGS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


class Stop(Exception):
    """Raised from a hook or a recorder to end a forward pass once what is needed was seen."""


@dataclass
class BlockCall:
    """Everything except the hidden states that the model passes to one block for one chunk."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict
    hidden_as_kwarg: bool = False  # the model passes hidden states as `hidden_states=`

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class Replay:
    """A module of the block whose output for this chunk is already known: every later pass
    over the same block and chunk (the MLP's statistics, a remedy's probes, the propagation
    to the next block) returns it instead of running the module.

    A depth-2 module's output is its level-2 map applied to its level-2 input, and the pass
    that observed the module's statistics saw that input: once the module is cut (its
    level-2 map final), output = level2(x[..., kept columns]). Exact: a unit's removal drops
    its columns of x and nothing the kept units read."""

    module: nn.Module  # the block's attention or MLP module (adapter.attention_module / mlp_module)
    output: torch.Tensor
    arity: int = 0  # the module returns a tuple of this length (first the output), 0: a tensor

    def __call__(self, *_args, **_kwargs):
        return (self.output, *[None] * (self.arity - 1)) if self.arity else self.output


@dataclass
class Chunk:
    """One calibration chunk at one block: the hidden states entering it, how it is called, and
    the modules of the block already computed for it (`replays`)."""

    hidden: torch.Tensor
    call: BlockCall
    replays: tuple[Replay, ...] = ()

    def forward(self, block: nn.Module) -> torch.Tensor:
        if not self.replays:
            return self.call(block, self.hidden)
        with forwards_replaced([r.module for r in self.replays], self.replays):
            return self.call(block, self.hidden)

    def replaying(self, replay: Replay) -> Chunk:
        return Chunk(self.hidden, self.call, (*self.replays, replay))


@contextmanager
def forwards_replaced(modules, forwards) -> Iterator[None]:
    """Each module's forward replaced for the duration, by an instance attribute; one a module
    already carried (accelerate's offloading hooks) is put back, else the class's forward."""
    own = [module.__dict__.get("forward") for module in modules]
    for module, forward in zip(modules, forwards, strict=True):
        module.forward = forward
    try:
        yield
    finally:
        for module, forward in zip(modules, own, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _to(value, device: torch.device, memo: dict):
    """Move tensors to `device`, keeping tensors shared between blocks shared (one mask, one copy)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = value.detach().to(device)
        return memo[id(value)]
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


@contextmanager
def _recording(blocks: nn.ModuleList, calls: list[list[BlockCall]], first: list[torch.Tensor],
               device: torch.device, memo: dict) -> Iterator[None]:
    def recorder(k: int):
        def forward(*args, **kwargs):
            hidden_as_kwarg = not args
            hidden = kwargs.pop("hidden_states") if hidden_as_kwarg else args[0]
            rest = args[1:]
            # A cache object is positional in GPT-2 and a keyword elsewhere; with use_cache=False
            # it is None, and a stateless block forward must never see one.
            kwargs = {n: v for n, v in kwargs.items() if n not in _CACHE_KWARGS}
            if any(isinstance(a, Cache) for a in rest):
                raise RuntimeError(f"block {k} was passed a KV cache positionally although use_cache=False")
            calls[k].append(BlockCall(_to(rest, device, memo), _to(kwargs, device, memo), hidden_as_kwarg))
            if k == 0:
                first.append(hidden.detach().to(device))
            if k == len(blocks) - 1:
                raise Stop
            return hidden

        return forward

    with forwards_replaced(blocks, [recorder(k) for k in range(len(blocks))]):
        yield


@torch.no_grad()
def capture(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, chunk_size: int,
            device: torch.device) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """(hidden states entering block 0 per chunk, calls[block][chunk]) for calibration `input_ids`."""
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    first: list[torch.Tensor] = []
    embed_device = model.get_input_embeddings().weight.device
    for ids in input_ids.split(chunk_size):
        memo: dict = {}  # per chunk: tensors shared between blocks stay one tensor
        with _recording(blocks, calls, first, device, memo), suppress(Stop):
            model(input_ids=ids.to(embed_device), use_cache=False)
    if not all(len(c) == len(first) for c in calls):
        seen = [len(c) for c in calls]
        raise RuntimeError(f"the model's forward did not call every block once per chunk (calls per block: {seen})")
    return first, calls


def chunks_at(hidden: list[torch.Tensor], calls: list[BlockCall]) -> list[Chunk]:
    """The stream at one block: each chunk's hidden states with that block's own arguments."""
    return [Chunk(h, c) for h, c in zip(hidden, calls, strict=True)]


_END = BlockCall((), {})  # past the last block nothing calls the stream again


def advance(block: nn.Module, k: int, stream: list[Chunk], calls: list[list[BlockCall]]) -> list[Chunk]:
    """Block k's outputs, as the stream entering block k+1 (with block k+1's arguments)."""
    out = [chunk.forward(block) for chunk in stream]
    return chunks_at(out, calls[k + 1] if k + 1 < len(calls) else [_END] * len(out))
