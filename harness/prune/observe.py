"""Statistics of one module, observed by hooks while its block runs on the calibration stream.

What a metric or remedy may ask for (its declared `needs`):
  level1  mean and second moment of each level-1 output (q/k/v, gate/up), bias removed
  level2  mean and second moment of the level-2 input (o_proj / down_proj input)
  js      pairwise Jensen-Shannon distances of the heads' attention distributions
  grad    the Taylor gradients of the whole model (harness/prune/gradients.py)
Only what is needed is observed, and the block stops as soon as it has been seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch
from torch import nn

from harness.models.base import DepthTwo, in_features, weight
from harness.prune.stats import ChannelMoments, FlapSampleMoments, ModuleStats
from harness.prune.stream import Chunk, Stop

NEEDS = frozenset({"level1", "level2", "js", "grad"})


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


def _output_moments(moments: ChannelMoments):
    def hook(module, _args, out):
        moments.update(out if module.bias is None else out - module.bias)

    return hook


def observe(block: nn.Module, unit: DepthTwo, attention: nn.Module, chunks: list[Chunk], needs: frozenset[str],
            grads: dict, dtype: torch.dtype, device: torch.device, flap_faithful: bool = False) -> ModuleStats:
    """The statistics `needs` asks for of `unit` (a module of `block`; `attention` is the
    block's attention module, whose second output holds the attention probabilities)."""
    unknown = needs - NEEDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; accepted: {', '.join(sorted(NEEDS))}")
    stats = ModuleStats()
    handles = []
    if "level1" in needs:
        for module in unit.level1:
            moments = ChannelMoments(weight(module).shape[0], dtype, device)
            stats.level1.append(moments)
            handles.append(module.register_forward_hook(_output_moments(moments)))
    if "level2" in needs:
        cls = FlapSampleMoments if flap_faithful else ChannelMoments
        stats.level2 = cls(in_features(unit.level2), dtype, device)
        handles.append(unit.level2.register_forward_pre_hook(lambda _m, a: stats.level2.update(a[0])))
    if "grad" in needs:
        stats.extra["grad"] = grads
    if not needs & {"level1", "level2", "js"}:
        return stats  # nothing to observe: no calibration pass
    if unit.kind == "attention":
        def after_attention(_module, _args, out):
            if "js" in needs:
                if out[1] is None:
                    raise RuntimeError("attention probabilities are unavailable; the pipeline needs eager attention")
                stats.add_js(out[1])
            raise Stop  # the MLP is not needed for attention statistics

        handles.append(attention.register_forward_hook(after_attention))
    else:
        def stop(_module, _args):
            raise Stop

        handles.append(unit.level2.register_forward_pre_hook(stop))
    with hooks(handles), torch.no_grad():
        for chunk in chunks:
            run_until_stop(block, chunk)
    return stats
