"""How a run holds its model: whole in memory, or block by block (`model.lazy`), and how each
is loaded, checkpointed after pruning, resumed by a later attempt and saved. run.py calls these
in its data flow and never asks which way the model is held.

In memory: the model is loaded whole; after pruning it is checkpointed (with `resume=true`) as
the transformers folder `save_model` writes; `save_model` exports it to `<run>/model`.
Block by block: only the skeleton exists (models/lazy.py); the block engine writes each pruned
block under `<run>/pruned_blocks`, which are assembled into `<run>/checkpoint` (always: it is
the only place the pruned model exists) and evaluated from there; `save_model` moves it to
`<run>/model`. A later attempt resumes from a complete checkpoint either way.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoTokenizer

from harness import resume
from harness.models import loading
from harness.models.export import PRUNING_KEY, export, write_card
from harness.models.gguf_export import GGUFRefused, write_gguf
from harness.models.lazy import LazyCheckpoint

log = logging.getLogger(__name__)


@dataclass
class Held:
    """The model a run works on, its tokenizer, and for a model held block by block its
    LazyCheckpoint (`model` is then its meta-device skeleton)."""

    model: nn.Module
    tok: object
    store: LazyCheckpoint | None = None

    @property
    def lazy(self) -> bool:
        return self.store is not None


def load(model_config: dict, device: torch.device, dtype: torch.dtype, lazy: bool) -> Held:
    if lazy:
        store, tok = loading.load_lazy(OmegaConf.create(model_config), dtype)
        return Held(store.model, tok, store)
    return Held(*loading.load(OmegaConf.create(model_config), device, dtype))


def pruned_blocks(folder: Path) -> Path:
    """Where the block engine writes a lazily held model's pruned blocks."""
    return folder / "pruned_blocks"


def checkpoint(held: Held, folder: Path, dtype: torch.dtype, keep: bool) -> Held:
    """The pruned model written to `folder`/checkpoint for a later attempt (in memory: when `keep`,
    i.e. resume=true), and the model to evaluate (block by block: the assembled checkpoint)."""
    target = folder / "checkpoint"
    if not held.lazy:
        if keep:
            resume.save_checkpoint(held.model, held.tok, target)
        return held
    blocks = pruned_blocks(folder)
    resume.write_checkpoint(target, lambda out: held.store.export(held.tok, blocks, out))
    shutil.rmtree(blocks, ignore_errors=True)
    return _open_lazy(target, dtype)


def resumed(folder: Path, dtype: torch.dtype, device: torch.device, lazy: bool) -> Held | None:
    """An earlier attempt's complete checkpoint, or None (an incomplete or broken one is discarded)."""
    target = folder / "checkpoint"
    if lazy:
        return _open_lazy(target, dtype) if (target / resume.CHECKPOINT_DONE).exists() else None
    loaded = resume.load_checkpoint(target, dtype)
    if loaded is None:
        return None
    model, tok = loaded
    return Held(model.to(device).eval(), tok)


def save(held: Held, folder: Path, record: dict) -> Path:
    """The pruned model as `folder`/model, a transformers folder with the model card of `record`."""
    target = folder / "model"
    if not held.lazy:
        return export(held.model, held.tok, target, record)
    checkpoint = folder / "checkpoint"
    write_card(checkpoint, record, getattr(held.model.config, PRUNING_KEY)["route"])
    (checkpoint / resume.CHECKPOINT_DONE).unlink()
    shutil.rmtree(target, ignore_errors=True)
    checkpoint.replace(target)
    return target


def save_gguf(held: Held, folder: Path, model_config: dict, dtype: str) -> dict:
    """The pruned model as `folder`/model.gguf (llama.cpp), or why llama.cpp cannot express it
    (the run keeps everything else: the refusal is recorded, not raised)."""
    try:
        path = write_gguf(held.model, folder / "model.gguf", loading.gguf_source(OmegaConf.create(model_config)), dtype,
                          model_config["name"])
    except GGUFRefused as e:
        log.warning("no GGUF written: %s", e)
        return {"refused": str(e)}
    return {"path": str(path), "dtype": dtype}


def discard_checkpoint(folder: Path) -> None:
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)


def _open_lazy(folder: Path, dtype: torch.dtype) -> Held:
    store = LazyCheckpoint(folder, dtype)
    store.skeleton()
    return Held(store.model, AutoTokenizer.from_pretrained(folder), store)
