"""Model loading, architecture adapters (the common depth-2 form) and pruned save/load."""

from __future__ import annotations

from types import ModuleType

from torch import nn

from harness.models import gpt2, llama, opt, phi3

ADAPTERS: dict[str, ModuleType] = {t: m for m in (llama, gpt2, opt, phi3) for t in m.MODEL_TYPES}


class UnsupportedArchitectureError(ValueError):
    pass


def adapter_for(model_or_type: nn.Module | str) -> ModuleType:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"no adapter for model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def module_view(adapter: ModuleType, block: nn.Module, kind: str, attention_unit: str = "kv_group"):
    """Block's `kind` module (attention, mlp) as a DepthTwo view (models/base.py)."""
    return adapter.attention(block, attention_unit) if kind == "attention" else adapter.mlp(block)
