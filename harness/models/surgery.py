"""Whole blocks deleted from a model, leaving a real smaller model (METHOD.md section 11).

The blocks are deleted from their ModuleList, the config's layer count is set, every module's
`layer_idx` is re-indexed (the KV cache is indexed by it), and every per-layer list of the
config is sliced by kept index: Gemma-3 and Qwen2 read `layer_types` by position for each
block's mask and rotary table, so an unsliced list gives silently wrong logits, and a list of
the wrong length saves but fails to reload. Qwen2's `max_window_layers` becomes the number of
kept blocks below its old value. The result saves with a stock config.
"""

from __future__ import annotations

from torch import nn

from harness.models import adapter_for

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count_key(config) -> str:
    return next(k for k in _LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int))


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
