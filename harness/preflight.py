"""The checks that need the model's shape, run on its meta-device skeleton before any weight
loads (config.py holds the schema and the checks that need nothing else): context lengths, the
LoRA targets and rank, the pruning budget, N:M widths, and the memory the run will take against
the memory available."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from harness import depth
from harness.checks import ConfigError
from harness.config import RunConfig
from harness.depth.pipeline import blocks_to_remove
from harness.environment import free_memory
from harness.finetune import lora_targets
from harness.models import adapter_for, loading
from harness.models.base import in_features, out_features
from harness.models.gguf_export import GGUFRefused
from harness.models.gguf_export import check_config as check_gguf
from harness.prune import allocation, module_shapes, n_params, prunable_layers
from harness.remedy import fits_on_data
from harness.sparse.pipeline import check_widths

GB = 1e9


def check_model(cfg: RunConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """Every check on the model's skeleton; returns the memory estimate (for the record)."""
    model = skeleton(OmegaConf.structured(cfg.model), dtype)
    check(cfg, model)
    return check_memory(cfg, model, dtype, device)


def skeleton(model_config, dtype: torch.dtype) -> nn.Module:
    """The model built from its config on the meta device: every shape, no weights."""
    where = loading.model_dir(model_config)
    config = AutoConfig.from_pretrained(where, revision=model_config.get("revision"), trust_remote_code=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=True)
    return model.eval()


def check(cfg: RunConfig, model: nn.Module) -> None:
    """Refuse what the model's shapes make impossible (on a skeleton or the loaded model)."""
    adapter = adapter_for(model)  # names the model_type and the supported ones
    blocks = adapter.layers(model)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    lengths = {"calibration.seqlen": cfg.calibration.seqlen, "remedy.calibration.seqlen": cfg.remedy.calibration.seqlen}
    if cfg.eval.ppl is not None:
        lengths["eval.ppl.seqlen"] = cfg.eval.ppl.seqlen
    if cfg.finetune.name != "none":
        lengths["finetune.data.seqlen"] = cfg.finetune.data.seqlen
    for key, n in lengths.items():
        if context and n > context:
            raise ConfigError(f"{key}={n} exceeds the model's context of {context} tokens; accepted: 2 .. {context}")
    if cfg.finetune.name != "none":
        _check_lora(cfg, model, blocks)
    if cfg.save_gguf is not None:
        try:
            check_gguf(model.config)
        except GGUFRefused as e:
            raise ConfigError(f"save_gguf={cfg.save_gguf}: {e}") from e
    settings = cfg.prune_settings()
    layer_range = prunable_layers(len(blocks), settings.layers)
    if settings.sparsity_type == "depth":
        _check_depth(cfg, model, blocks)
        return
    try:
        if settings.sparsity_type != "structured":
            check_widths(adapter, model, settings, settings.pattern)
            return
        shapes = module_shapes(adapter, model, layer_range, settings.modules, settings.attention_unit)
        allocation.budget(shapes, n_params(model), settings.sparsity, settings.sparsity_mode, settings.allocation,
                          layer_range)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _check_depth(cfg: RunConfig, model: nn.Module, blocks) -> None:
    """The blocks (or sub-blocks) a depth method would remove must exist outside those it protects."""
    settings = cfg.prune_settings()
    method = depth.build(cfg.metric.name, cfg.metric.params)
    if method.unit == "sub-block":
        units = 2 * len(blocks)
        if settings.blocks is not None and settings.blocks > units - 1:
            raise ConfigError(f"prune.blocks={settings.blocks} asks to remove {settings.blocks} of the model's {units} "
                              f"sub-blocks (attention and MLP of {len(blocks)} blocks); metric={cfg.metric.name} "
                              f"keeps at least one; accepted: at most {units - 1}")
        return
    n = blocks_to_remove(model, blocks, settings)
    protected = {"none": 0, "first": 1, "last": 1, "first and last": 2}[method.protected]
    if n > len(blocks) - max(protected, 1):
        key = f"prune.blocks={settings.blocks}" if settings.blocks is not None else f"sparsity={settings.sparsity}"
        raise ConfigError(f"{key} asks to remove {n} of the model's {len(blocks)} blocks; metric={cfg.metric.name} "
                          f"protects {method.protected} and at least one block must stay; accepted: at most "
                          f"{len(blocks) - max(protected, 1)} blocks")


def _check_lora(cfg: RunConfig, model: nn.Module, blocks) -> None:
    try:
        names = lora_targets(model, blocks, cfg.finetune.targets)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    modules = dict(model.named_modules())
    narrowest = min(names, key=lambda n: min(in_features(modules[n]), out_features(modules[n])))
    width = min(in_features(modules[narrowest]), out_features(modules[narrowest]))
    if cfg.finetune.rank > width:
        raise ConfigError(f"finetune.rank={cfg.finetune.rank} exceeds the width of the adapted layer {narrowest} "
                          f"({width}, before pruning), above which a low-rank update is no longer low rank; "
                          f"accepted: 1 .. {width}")


def memory_estimate(cfg: RunConfig, model: nn.Module, dtype: torch.dtype, lazy: bool = False) -> dict[str, int]:
    """Bytes the run holds at its peak, by part (a lower bound: the model's own activations and
    the evaluation's batches come on top). The calibration stream is every sequence's hidden
    states entering and leaving the current block; recovery keeps the dense stream beside it."""
    config = model.config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    width = torch.finfo(dtype).bits // 8
    blocks = adapter_for(model).layers(model)
    weights = n_params(model) * width
    if lazy:  # one block at a time, plus embeddings and head
        weights = weights - sum(n_params(b) for b in blocks) * width + max(n_params(b) for b in blocks) * width
    streams = 2 * (2 if fits_on_data(cfg.remedy.name) else 1)
    cal = cfg.calibration
    parts = {"weights": weights, "calibration stream": streams * cal.n_samples * cal.seqlen * hidden * 4}
    if fits_on_data(cfg.remedy.name) and cfg.remedy.calibration.sampling() != cal.sampling():
        fit = cfg.remedy.calibration
        parts["recovery stream"] = 2 * fit.n_samples * fit.seqlen * hidden * 4
    if cfg.sparsity_type == "depth" and "nll" in depth.build(cfg.metric.name, cfg.metric.params).needs:
        # SLEB's greedy search caches every block's input over the calibration set
        parts["cached block inputs"] = (len(blocks) + 1) * cal.n_samples * cal.seqlen * hidden * 4
    if cfg.finetune.name != "none":
        modules = dict(model.named_modules())
        names = lora_targets(model, blocks, cfg.finetune.targets)
        adapters = sum(cfg.finetune.rank * (in_features(modules[n]) + out_features(modules[n])) for n in names)
        # fp32 adapters, their gradients and AdamW's two moments; the batch's activations for backward
        ft = cfg.finetune
        parts["lora"] = 16 * adapters + 16 * ft.batch_size * ft.data.seqlen * hidden * len(blocks) * 4
    return parts


def check_memory(cfg: RunConfig, model: nn.Module, dtype: torch.dtype, device: torch.device) -> dict:
    """The estimate, refused when it exceeds the memory free on `device` (the record keeps it).
    model.lazy=auto counts one block's weights where the whole model would go lazy
    (loading.lazy_auto's rule, on the parameter count instead of the safetensors headers)."""
    available = free_memory(device)
    whole = n_params(model) * (torch.finfo(dtype).bits // 8)
    lazy = cfg.model.lazy is True or (cfg.model.lazy == "auto" and whole > loading.LAZY_AUTO_SHARE * available)
    parts = memory_estimate(cfg, model, dtype, lazy)
    total = sum(parts.values())
    if total > available:
        detail = ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items())
        raise ConfigError(f"this run needs at least {total / GB:.2f} GB ({detail}) and {available / GB:.2f} GB are "
                          f"free on {device}; lower calibration.n_samples (or remedy.calibration.n_samples, "
                          "finetune.rank / finetune.batch_size), or set model.lazy=true for the weights")
    return {"bytes": total, "parts": parts, "available_bytes": available}
