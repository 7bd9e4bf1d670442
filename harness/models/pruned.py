"""Save and reload physically pruned models.

The per-layer shapes (heads, KV heads, MLP channels, added level-2 biases) go into the saved
config under `harness_pruning`; `load_pruned` builds the original architecture on the meta
device, reshapes each block to the recorded sizes and loads the weights into it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

PRUNING_KEY = "harness_pruning"


def layer_shapes(model) -> list[dict]:
    from harness.models import adapter_for

    ad = adapter_for(model)
    shapes = []
    for block in ad.layers(model):
        shape = ad.shape(block)
        shape["level2_bias"] = [m.bias is not None for m in ad.level2_outputs(block)]
        shapes.append(shape)
    return shapes


def save_pruned(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    setattr(model.config, PRUNING_KEY, {"layers": layer_shapes(model)})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32):
    from harness.models import adapter_for
    from harness.models.base import ensure_bias

    config = AutoConfig.from_pretrained(path)
    shapes = getattr(config, PRUNING_KEY)["layers"]
    ad = adapter_for(config.model_type)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for block, s in zip(ad.layers(model), shapes, strict=True):
        ad.reshape(block, s["heads"], s["kv_heads"], s["channels"])
        for module, has_bias in zip(ad.level2_outputs(block), s["level2_bias"], strict=True):
            if has_bias:
                ensure_bias(module)
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the recorded shapes (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.eval()


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if isinstance(tied, dict) else tied)
