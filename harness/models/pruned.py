"""Save and reload physically pruned models: the folder is the transformers-native export
(export.py), so `save_model=true`, the resume checkpoint and `harness export` write the same
thing and plain transformers reads it back."""

from __future__ import annotations

from pathlib import Path

import torch

from harness.models.export import PRUNING_KEY, export, load


def save_pruned(model, tokenizer, path: str | Path, record: dict | None = None) -> Path:
    return export(model, tokenizer, path, record)


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32):
    return load(path, dtype)


__all__ = ["PRUNING_KEY", "load_pruned", "save_pruned"]
