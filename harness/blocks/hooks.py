"""Hooks that read a module's inputs or outputs while its block runs on the calibration stream,
removed when done; a hook may end the block's forward early (`Stop`) once it has seen enough."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch
from torch import nn

from harness.blocks.stream import Chunk, Stop


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until_stop(block: nn.Module, chunk: Chunk) -> None:
    with suppress(Stop):
        chunk.forward(block)


def module_input(block: nn.Module, module: nn.Module, chunk: Chunk) -> torch.Tensor:
    """The input of `module` when `block` runs on `chunk` (the rest of the block is skipped)."""
    seen = {}

    def hook(_module, args):
        seen["x"] = args[0].detach()
        raise Stop

    with hooks([module.register_forward_pre_hook(hook)]):
        run_until_stop(block, chunk)
    return seen["x"]
