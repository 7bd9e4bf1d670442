"""The unstructured / N:M track on the block engine: weights masked in place, block by block
(METHOD.md section 9).

The block engine (harness/blocks) runs the calibration stream, each block called with the
arguments the model's own forward gives it, resident or lazily loaded (`model.lazy`, where
each masked block is written out as it is done). For each block in the layer range: one
pass over the stream accumulates the Gram matrix of each depth-2 module's two inputs (the
level-1 maps share one input, the level-2 map has its own), every linear layer of the chosen
modules is pruned from it, then the pruned block runs again to feed the next block. Only one
block's Gram matrices exist at a time; nothing per token is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.blocks.engine import BlockEngine
from harness.blocks.hooks import hooks
from harness.blocks.stats import Gram, check_finite
from harness.blocks.stream import Chunk
from harness.models import module_view
from harness.models.base import DepthTwo, in_features, set_weight, weight
from harness.settings import Pattern, PruneSettings, n_params, prunable_layers
from harness.sparse.methods import Method


@dataclass
class SparseReport:
    pattern: str  # "0.5" or "2:4"
    pruned_weights: int  # entries of the pruned linear layers
    zero_weights: int  # of which exactly zero after pruning
    params: int
    per_layer: list[dict]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sparsity_achieved(self) -> float:
        """Zeros over the pruned linear layers' weights (how the unstructured papers count)."""
        return self.zero_weights / max(self.pruned_weights, 1)


def linear_layers(views: list[DepthTwo]) -> list[tuple[nn.Module, int]]:
    """Every distinct linear map of the modules, with the index of the input it reads
    (2v: module v's input, 2v+1: its level-2 input), in forward order."""
    seen, out = set(), []
    for v, view in enumerate(views):
        for module, role in [*((m, 2 * v) for m in view.level1), (view.level2, 2 * v + 1)]:
            if id(module) not in seen:
                seen.add(id(module))
                out.append((module, role))
    return out


def input_grams(block: nn.Module, views: list[DepthTwo], stream: list[Chunk], dtype: torch.dtype,
                device: torch.device) -> list[Gram]:
    grams, handles = [], []
    for view in views:
        for module in (view.module_input, view.level2):
            gram = Gram(in_features(module), dtype, device)
            grams.append(gram)
            handles.append(module.register_forward_pre_hook(lambda _m, args, g=gram: g.update(args[0].detach())))
    with hooks(handles), torch.no_grad():
        for chunk in stream:
            chunk.forward(block)
    return grams


def relative_output_error(old: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W' - W)^T||^2 / ||X W^T||^2 on the calibration inputs."""
    delta = new - old
    return float((delta @ gram * delta).sum() / (old @ gram * old).sum().clamp_min(1e-30))


def check_widths(adapter, model: nn.Module, settings: PruneSettings, pattern: Pattern) -> None:
    """An N:M pattern needs every pruned layer's input width to be a multiple of M."""
    if not pattern.is_nm:
        return
    blocks = adapter.layers(model)
    for k in prunable_layers(len(blocks), settings.layers):
        views = [module_view(adapter, blocks[k], kind) for kind in settings.modules]
        for module, _ in linear_layers(views):
            if in_features(module) % pattern.m:
                name = next(n for n, m in blocks[k].named_modules() if m is module)
                raise ValueError(f"nm={pattern.label()} needs every pruned layer's input width to be a multiple of "
                                 f"{pattern.m}; block {k} {name} has {in_features(module)}")


def prune_sparse(model: nn.Module, input_ids: torch.Tensor, method: Method, settings: PruneSettings,
                 pattern: Pattern, device: torch.device | None = None, store=None, out: Path | None = None
                 ) -> SparseReport:
    """Mask `model`'s linear layers in place to `pattern` with `method` on calibration `input_ids`
    (`store`: the LazyCheckpoint `model` is the skeleton of; the masked blocks go to `out`/blocks)."""
    start = time.perf_counter()
    device = device or (torch.device("cpu") if store is not None else next(model.parameters()).device)
    engine = BlockEngine(model, device, settings.chunk_size, store, out)
    adapter, blocks = engine.adapter, engine.blocks
    layer_range = prunable_layers(len(blocks), settings.layers)
    check_widths(adapter, model, settings, pattern)
    stream, calls = [], []
    if method.needs_data:
        with engine.timed("forward"):
            stream, calls = engine.capture(input_ids)
    per_layer: dict[int, dict] = {}
    pruned, zeros = 0, 0
    # Blocks before the range run only to feed it; data-free methods run none.
    visited = range(layer_range.stop) if method.needs_data else layer_range
    for k in tqdm(visited, desc=f"pruning ({method.name}, {pattern.label()})", disable=None):
        with engine.visit(k, write=k in layer_range) as block:
            entry = per_layer[k] = {"layer": k, **_shape(adapter.shape(block))}
            if k in layer_range:
                views = [module_view(adapter, block, kind) for kind in settings.modules]
                grams = None
                if method.needs_data:
                    with engine.timed("statistics"):
                        grams = input_grams(block, views, stream, engine.stats_dtype, device)
                with engine.timed("prune"):
                    n_pruned, n_zero = _mask_block(block, k, views, grams, method, pattern, engine.stats_dtype, entry)
                pruned, zeros = pruned + n_pruned, zeros + n_zero
            if method.needs_data and k + 1 < layer_range.stop:
                stream = engine.advance(block, k, stream, calls)
    rows = [per_layer.get(k) or {"layer": k, **_shape(adapter.shape(b))} for k, b in enumerate(blocks)]
    return SparseReport(pattern.label(), pruned, zeros, n_params(model), rows, time.perf_counter() - start,
                        dict(engine.times))


def _mask_block(block: nn.Module, k: int, views: list[DepthTwo], grams: list[Gram] | None, method: Method,
                pattern: Pattern, dtype: torch.dtype, entry: dict) -> tuple[int, int]:
    """Mask every linear layer of the block's chosen modules; (their weights, the zeros among
    them); each layer's fraction of zeros and relative output error go into `entry`."""
    pruned = zeros = 0
    entry["sparsity"], entry["output_error"] = {}, {}
    names = {id(m): n for n, m in block.named_modules()}
    for module, role in linear_layers(views):
        old = weight(module).detach().to(dtype)
        gram = grams[role] if grams else None
        new, _ = method.prune(old.clone(), None if gram is None else gram.matrix.clone(),
                              0 if gram is None else gram.tokens, pattern)
        check_finite(new, f"{method.name} weights of block {k} {names[id(module)]}")
        set_weight(module, new)
        stored = weight(module)
        n_zero = int((stored == 0).sum())
        pruned, zeros = pruned + stored.numel(), zeros + n_zero
        entry["sparsity"][names[id(module)]] = n_zero / stored.numel()
        if gram is not None:
            entry["output_error"][names[id(module)]] = relative_output_error(old, new, gram.matrix)
    return pruned, zeros


def _shape(shape: dict) -> dict:
    return {"heads_kept": shape["heads"], "kv_heads_kept": shape["kv_heads"], "channels_kept": shape["channels"]}
