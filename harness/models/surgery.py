"""Whole blocks deleted from a model, leaving a real smaller model (METHOD.md section 11).

The blocks are deleted from their ModuleList, the config's layer count is set, every module's
`layer_idx` is re-indexed (the KV cache is indexed by it), and every per-layer list of the
config is sliced by kept index: Gemma-3 and Qwen2 read `layer_types` by position for each
block's mask and rotary table, so an unsliced list gives silently wrong logits, and a list of
the wrong length saves but fails to reload. Qwen2's `max_window_layers` becomes the number of
kept blocks below its old value. The result saves with a stock config.

A sub-block (BlockPruner's unit: one block's attention, or its MLP) is removed inside its block:
the attention or MLP module is replaced by `SkippedAttention` / `SkippedMLP` (they add zero; OPT's
MLP, no module, is cut to zero channels with a zero output bias); a block that loses both is
deleted as above. Blocks of different shapes save through the custom-code route (export.py).
"""

from __future__ import annotations

import torch
from torch import nn

from harness.models import adapter_for
from harness.models.base import DepthTwo
from harness.models.modeling_pruned import SkippedAttention, SkippedMLP

ATTENTION, MLP = "attention", "mlp"
PARTS = (ATTENTION, MLP)  # a block's sub-blocks, in forward order
Unit = tuple[int, str]  # (block index, part)

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count_key(config) -> str:
    return next(k for k in _LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int))


def config_head_dim(config) -> int:
    """The head size the (dense) config describes: its own `head_dim`, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def remove_blocks(model: nn.Module, removed: list[int]) -> list[int]:
    """Delete the blocks `removed` (indices of the current model) in place; returns the kept
    blocks' original indices."""
    blocks = adapter_for(model).layers(model)
    count = len(blocks)
    gone = set(removed)
    if not gone <= set(range(count)):
        raise ValueError(f"blocks {sorted(gone - set(range(count)))} do not exist; the model has {count}")
    if len(gone) >= count:
        raise ValueError(f"removing {len(gone)} of {count} blocks leaves none")
    kept = [k for k in range(count) if k not in gone]
    survivors = [blocks[k] for k in kept]
    for k in sorted(gone, reverse=True):
        del blocks[k]
    for new, block in enumerate(survivors):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, list) and len(value) == count:
            setattr(config, key, [value[k] for k in kept])
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(k < config.max_window_layers for k in kept)
    setattr(config, layer_count_key(config), len(kept))
    return kept


def part_skipped(adapter, block: nn.Module, part: str) -> bool:
    """Whether the block's attention or MLP was removed (by class name: an exported model's class
    is its own copy). OPT's MLP, which is no module, is removed as zero channels."""
    if part == ATTENTION:
        return type(adapter.attention_module(block)).__name__ == SkippedAttention.__name__
    module = adapter.mlp_module(block)
    if module is None:
        return adapter.mlp(block).n_units == 0
    return type(module).__name__ == SkippedMLP.__name__


def present_views(adapter, block: nn.Module) -> list[DepthTwo]:
    """The block's attention and MLP views (models/base.py), less any sub-block removed."""
    return [adapter.attention(block) if part == ATTENTION else adapter.mlp(block)
            for part in PARTS if not part_skipped(adapter, block, part)]


def block_shape(adapter, block: nn.Module) -> dict[str, int]:
    """The adapter's `shape`, with no heads or no channels where a sub-block was removed."""
    if not any(part_skipped(adapter, block, part) for part in PARTS):
        return adapter.shape(block)
    attention = None if part_skipped(adapter, block, ATTENTION) else adapter.attention(block)
    mlp = None if part_skipped(adapter, block, MLP) else adapter.mlp(block)
    return {"heads": attention.n_units * attention.heads_per_unit if attention else 0,
            "kv_heads": attention.n_units if attention else 0, "channels": mlp.n_units if mlp else 0}


def unit_params(adapter, block: nn.Module) -> dict[str, int]:
    """The parameters removing each part of the block deletes (its norms stay)."""
    mlp = adapter.mlp_module(block)
    modules = [mlp] if mlp is not None else [*adapter.mlp(block).level1, adapter.mlp(block).level2]
    return {ATTENTION: _count(adapter.attention_module(block)), MLP: sum(_count(m) for m in modules)}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def remove_sub_blocks(model: nn.Module, units: list[Unit]) -> list[int]:
    """Remove each (block, part) of `units` (indices of the current model); a block losing both
    parts is deleted. Returns the kept blocks' original indices."""
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    parts: dict[int, set[str]] = {}
    for k, part in units:
        if part not in PARTS or not 0 <= k < len(blocks):
            raise ValueError(f"sub-block {(k, part)} does not exist; the model has blocks 0..{len(blocks) - 1}, "
                             f"parts {', '.join(PARTS)}")
        parts.setdefault(k, set()).add(part)
    for k, gone in parts.items():
        if gone == {ATTENTION}:
            _skip_attention(adapter, blocks[k])
        elif gone == {MLP}:
            _cut_mlp(adapter, blocks[k])
    return remove_blocks(model, sorted(k for k, gone in parts.items() if gone == set(PARTS)))


def _skip(block: nn.Module, module: nn.Module, replacement: nn.Module) -> None:
    name = next(n for n, child in block.named_children() if child is module)
    setattr(block, name, replacement)


def _skip_attention(adapter, block: nn.Module) -> None:
    attention = adapter.attention_module(block)
    _skip(block, attention, SkippedAttention(getattr(attention, "layer_idx", 0)))


def _cut_mlp(adapter, block: nn.Module) -> None:
    """The MLP module replaced by one adding zero; where it is no module (OPT), zero channels and
    a zero output bias."""
    module = adapter.mlp_module(block)
    if module is not None:
        _skip(block, module, SkippedMLP())
        return
    adapter.prune_mlp(block, torch.zeros(0, dtype=torch.long))
    down = adapter.mlp(block).level2
    if down.bias is not None:
        with torch.no_grad():
            down.bias.zero_()
