"""Statistics of one module, observed by hooks while its block runs on the calibration stream.

What a metric or remedy may ask for (its declared `needs`):
  level1  second moment of each level-1 output (q/k/v, gate/up), bias removed
  level2  second moment of the level-2 input (o_proj / down_proj input)
  centered  the level-2 input's mean and variance as well (FLAP's fluctuation, bias compensation)
  js      pairwise Jensen-Shannon distances of the heads' attention distributions
  grad    the Taylor gradients of the whole model (harness/prune/gradients.py)
Only what is needed is observed, and the block stops as soon as it has been seen.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.blocks.hooks import hooks, run_until_stop
from harness.blocks.stats import ChannelMoments, FlapSampleMoments, ModuleStats
from harness.blocks.stream import Chunk, Stop
from harness.models.base import DepthTwo, in_features, weight

NEEDS = frozenset({"level1", "level2", "centered", "js", "grad"})


def _output_moments(moments: ChannelMoments):
    def hook(module, _args, out):
        moments.update(out if module.bias is None else out - module.bias)

    return hook


def observe(block: nn.Module, unit: DepthTwo, attention: nn.Module, chunks: list[Chunk], needs: frozenset[str],
            grads: dict, dtype: torch.dtype, device: torch.device, flap_faithful: bool = False,
            keep_level2_inputs: bool = False) -> ModuleStats:
    """The statistics `needs` asks for of `unit` (a module of `block`; `attention` is the
    block's attention module, whose second output holds the attention probabilities).
    `keep_level2_inputs`: also keep each chunk's level-2 input (`stats.level2_inputs`) when a pass runs,
    for later passes to replay the module from (stream.Replay)."""
    unknown = needs - NEEDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; accepted: {', '.join(sorted(NEEDS))}")
    stats = ModuleStats()
    handles = []
    if "level1" in needs:
        for module in unit.level1:
            moments = ChannelMoments(weight(module).shape[0], dtype, device, centered=False)
            stats.level1.append(moments)
            handles.append(module.register_forward_hook(_output_moments(moments)))
    if "level2" in needs:
        width = in_features(unit.level2)
        stats.level2 = (FlapSampleMoments(width, dtype, device) if flap_faithful
                        else ChannelMoments(width, dtype, device, centered="centered" in needs))
        handles.append(unit.level2.register_forward_pre_hook(lambda _m, a: stats.level2.update(a[0])))
    if "grad" in needs:
        stats.extra["grad"] = grads
    if not needs & {"level1", "level2", "js"}:
        return stats  # nothing to observe: no calibration pass
    if unit.kind == "attention":
        def after_attention(_module, _args, out):
            stats.arity = len(out)
            if "js" in needs:
                if out[1] is None:
                    raise RuntimeError("attention probabilities are unavailable; the pipeline needs eager attention")
                stats.add_js(out[1])
            raise Stop  # the MLP is not needed for attention statistics

        if keep_level2_inputs:
            handles.append(unit.level2.register_forward_pre_hook(lambda _m, a: stats.level2_inputs.append(a[0].detach())))
        handles.append(attention.register_forward_hook(after_attention))
    else:
        def stop(_module, args):
            if keep_level2_inputs:
                stats.level2_inputs.append(args[0].detach())
            raise Stop

        handles.append(unit.level2.register_forward_pre_hook(stop))
    with hooks(handles), torch.no_grad():
        for chunk in chunks:
            run_until_stop(block, chunk)
    return stats
