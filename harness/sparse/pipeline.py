"""The unstructured / N:M track: weights masked in place, block by block (METHOD.md section 9).

The calibration stream is the structured track's (harness/prune/stream.py: each block called
with the arguments the model's own forward gives it). For each block in the layer range: one
pass over the stream accumulates the Gram matrix of each depth-2 module's two inputs (the
level-1 maps share one input, the level-2 map has its own), every linear layer of the chosen
modules is pruned from it, then the pruned block runs again to feed the next block. Only one
block's Gram matrices exist at a time; nothing per token is kept.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.models.base import DepthTwo, in_features, set_weight, weight
from harness.prune.observe import hooks
from harness.prune.pipeline import module_view, on_device
from harness.prune.settings import PruneSettings, n_params, prunable_layers
from harness.prune.stats import check_finite
from harness.prune.stream import Chunk, advance, capture, chunks_at
from harness.sparse.masks import Pattern
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


class Gram:
    """sum over tokens of x x^T for one layer input, and the token count."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        self.matrix = torch.zeros(width, width, dtype=dtype, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.matrix.dtype)
        self.matrix.addmm_(x.T, x)
        self.tokens += x.shape[0]


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
                 pattern: Pattern, device: torch.device | None = None) -> SparseReport:
    """Mask `model`'s linear layers in place to `pattern` with `method` on calibration `input_ids`."""
    from harness.models import adapter_for

    start = time.perf_counter()
    device = device or next(model.parameters()).device
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    layer_range = prunable_layers(len(blocks), settings.layers)
    check_widths(adapter, model, settings, pattern)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    times: dict[str, float] = defaultdict(float)
    stream, calls = [], []
    if method.needs_data:
        t0 = time.perf_counter()
        hidden, calls = capture(model, blocks, input_ids, settings.chunk_size, device)
        stream = chunks_at(hidden, calls[0])
        times["forward"] += time.perf_counter() - t0
    per_layer, pruned, zeros = [], 0, 0
    last = layer_range.stop if method.needs_data else 0  # data-free: no block needs running
    for k in tqdm(range(len(blocks)), desc=f"pruning ({method.name}, {pattern.label()})", disable=None):
        entry = {"layer": k, **_shape(adapter.shape(blocks[k]))}
        if k in layer_range:
            with on_device(blocks[k], device) as block:
                views = [module_view(adapter, block, kind) for kind in settings.modules]
                grams = None
                if method.needs_data:
                    t0 = time.perf_counter()
                    grams = input_grams(block, views, stream, dtype, device)
                    times["statistics"] += time.perf_counter() - t0
                t0 = time.perf_counter()
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
                times["prune"] += time.perf_counter() - t0
                if k + 1 < last:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        stream = advance(block, k, stream, calls)
                    times["forward"] += time.perf_counter() - t0
        elif k + 1 < last:
            with on_device(blocks[k], device) as block, torch.no_grad():
                stream = advance(block, k, stream, calls)
        per_layer.append(entry)
    return SparseReport(pattern.label(), pruned, zeros, n_params(model), per_layer, time.perf_counter() - start,
                        dict(times))


def _shape(shape: dict) -> dict:
    return {"heads_kept": shape["heads"], "kv_heads_kept": shape["kv_heads"], "channels_kept": shape["channels"]}
