"""A structurally pruned causal LM, loadable by plain transformers (`trust_remote_code=True`).

This file is copied into every exported folder that a stock config cannot describe (blocks
of different widths, biases the architecture lacks, GPT-2/OPT with heads removed); it
imports only torch and transformers. The stock model of `config.model_type` is built as
usual, then every module listed in `config.pruned_modules` is given its recorded shapes
(and biases), and the attributes in `config.pruned_attributes` (head counts, split sizes;
`config` for a block that reads head counts from it) are set, so that the checkpoint's
weights load exactly. An attention or MLP listed in `config.skipped_modules` (a sub-block
removed by depth pruning) is replaced by `SkippedAttention` / `SkippedMLP` first. `config.per_layer_config` carries the
per-layer head counts and MLP widths in transformers' own heterogeneous-config format for the
day its modeling reads it.
"""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

BASE_CLASS = "LlamaForCausalLM"  # the stock class of this checkpoint, written by the export
BASE_MODEL_CLASS = "LlamaModel"  # its decoder without the head (AutoModel), written by the export

_Base = getattr(transformers, BASE_CLASS)
_BaseModel = getattr(transformers, BASE_MODEL_CLASS)


class LayerConfig:
    """The model config as one block sees it: `own` values first, everything else (including
    later changes such as the attention implementation) read from and written to the model's."""

    def __init__(self, base, **own):
        self.__dict__.update(_base=base, _own=own)

    def __getattr__(self, name: str):
        d = self.__dict__
        if name.startswith("__") or "_base" not in d:  # copy/pickle probing an empty instance
            raise AttributeError(name)
        return d["_own"][name] if name in d["_own"] else getattr(d["_base"], name)

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__["_own"]:
            self.__dict__["_own"][name] = value
        else:
            setattr(self.__dict__["_base"], name, value)

    def __deepcopy__(self, memo):
        return LayerConfig(copy.deepcopy(self.__dict__["_base"], memo), **copy.deepcopy(self.__dict__["_own"], memo))


def resize(model: nn.Module, modules: dict[str, dict], attributes: dict[str, dict]) -> None:
    """Give `model`'s modules the recorded shapes: `modules[name]` = {"weight": shape, "bias":
    shape or None}; `attributes[name]` = {attribute: value}, with "config" a dict of the
    config values that module reads differently from the model's."""
    for name, shapes in modules.items():
        module = model.get_submodule(name)
        like = module.weight
        module.weight = nn.Parameter(torch.empty(shapes["weight"], dtype=like.dtype, device=like.device))
        if shapes.get("bias") is not None:
            module.bias = nn.Parameter(torch.empty(shapes["bias"], dtype=like.dtype, device=like.device))
        if hasattr(module, "nf"):  # GPT-2's Conv1D stores its weight as [in, out]
            module.nf = shapes["weight"][1]
        if hasattr(module, "out_features"):
            module.out_features, module.in_features = shapes["weight"][0], shapes["weight"][1]
    for name, values in attributes.items():
        module = model.get_submodule(name)
        for key, value in values.items():
            if key == "config":
                module.config = LayerConfig(model.config, **value)
            else:
                setattr(module, key, value)


class SkippedAttention(nn.Module):
    """An attention sub-block removed whole: it adds nothing to the residual stream (a norm after
    it maps zero to zero). It still appends one zero per token to the KV cache, because the model
    reads the cached length (of layer 0) for the next token's position."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                     None)
        cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 may wrap it in an encoder-decoder cache
        if cache is not None:
            # one head of width 1: a layer holding no elements reports length 0
            token = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(token, token, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """An MLP sub-block removed whole: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def skip(model: nn.Module, skipped: dict[str, str]) -> None:
    """Replace each module named in `skipped` ({name: "attention" or "mlp"}) by its skipped form."""
    for name, part in skipped.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        if part == "attention":
            layer_idx = getattr(getattr(owner, child), "layer_idx", None)
            replacement = SkippedAttention(layer_idx if isinstance(layer_idx, int) else int(parent.split(".")[-1]))
        else:
            replacement = SkippedMLP()
        setattr(owner, child, replacement)


def shape_like_pruned(model: nn.Module, config, prefix: str = "") -> None:
    """Apply the recorded removals and shapes (named from the causal LM) to `model`, which is
    the causal LM (prefix "") or its decoder (prefix: the causal LM's name for it)."""

    def own(names: dict) -> dict:
        start = f"{prefix}." if prefix else ""
        return {n.removeprefix(start): v for n, v in names.items() if n.startswith(start)}

    skip(model, own(getattr(config, "skipped_modules", {})))
    resize(model, own(getattr(config, "pruned_modules", {})), own(getattr(config, "pruned_attributes", {})))
    for name, module in model.named_modules():
        if name.endswith("attn.c_proj"):  # GPT-2
            module.register_forward_pre_hook(_rows_back)


def _rows_back(module: nn.Module, args: tuple):
    # vLLM's attention returns [tokens, heads x head size]; GPT-2 flattens an attention output's
    # last two axes, which turns that into one row: give the output projection its rows back.
    x = args[0]
    return (x.view(-1, module.weight.shape[0]), *args[1:]) if x.dim() == 1 else None


def _per_layer_access(config) -> None:
    # The globals are the dense model's; the per-layer values are in `pruned_modules`.
    if getattr(config, "is_heterogeneous", False):
        config.allow_global_per_layer_attribute_access = True


def _anchored(patterns: list[str] | None) -> list[str] | None:
    # vLLM searches these patterns anywhere in a weight's name and drops what matches: GPT-2's
    # "attn.bias" (its causal-mask buffer) would drop every `c_attn.bias`. Anchored at a module
    # boundary they still match the buffers and nothing else.
    return [p if p.startswith(("^", r"\.")) else rf"(?:^|\.){p}" for p in patterns] if patterns else patterns


class PrunedForCausalLM(_Base):
    _keys_to_ignore_on_load_unexpected = _anchored(_Base._keys_to_ignore_on_load_unexpected)

    def __init__(self, config, *args, **kwargs):
        _per_layer_access(config)
        super().__init__(config, *args, **kwargs)
        shape_like_pruned(self, config)


class PrunedModel(_BaseModel):
    """The decoder alone (`AutoModel`), as serving engines that bring their own head build it."""

    _keys_to_ignore_on_load_unexpected = _anchored(_BaseModel._keys_to_ignore_on_load_unexpected)

    def __init__(self, config, *args, **kwargs):
        _per_layer_access(config)
        super().__init__(config, *args, **kwargs)
        shape_like_pruned(self, config, _Base.base_model_prefix)
