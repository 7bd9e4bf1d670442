"""The block-by-block pruning pipeline (DESIGN.md, "One run, as data flows").

Calibration tokens go through the embeddings once; from then on only hidden states move,
and each block is called with the arguments the model's own forward gives that block
(harness/stream.py: masks, positions, rotary tables, per layer).
For each block k in the layer range, module by module in forward order (attention, then
MLP): [recovery] -> statistics -> scores -> units to remove -> [bias] -> physical cut; then
the pruned block's outputs become block k+1's inputs. Only block k is on the compute device
and only its statistics exist at a time. Adaptive allocation first needs every module's
scores, so it runs one extra dense scoring pass over all blocks to fix the counts.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from harness import allocation as alloc
from harness import metrics as metrics_registry
from harness.models.base import DepthTwo, check_attention_unit, in_features, weight
from harness.remedy import bias as bias_remedy
from harness.remedy import check as check_remedy
from harness.remedy.recovery import CrossMoments, refit
from harness.stats import ChannelMoments, FlapSampleMoments, ModuleStats, check_finite
from harness.stream import BlockCall, Chunk, Stop, capture, chunks_at

log = logging.getLogger(__name__)
MODULES = ("attention", "mlp")
_END = BlockCall((), {})  # past the last block nothing calls the stream again


@dataclass
class PruneSettings:
    sparsity: float = 0.2
    sparsity_mode: str = "model"
    allocation: str = "uniform"
    remedy: str = "none"
    layers: tuple[int, int] | None = None  # [start, end); None = all blocks
    modules: tuple[str, ...] = MODULES
    damp: float = 1e-2
    ridge_toward: str = "zero"  # recovery's ridge prior: zero (METHOD.md) or the current weights
    chunk_size: int = 8
    seed: int = 0
    flap_faithful: bool = False
    attention_unit: str = "kv_group"  # or query_head (base.ATTENTION_UNITS)


@dataclass
class PruneReport:
    ratio: float | None
    params_before: int
    params_after: int
    per_layer: list[dict]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    removed: dict[tuple[int, str], list[int]] = field(default_factory=dict)  # (layer, module) -> unit ids
    divergence: dict[int, list[list[float]]] = field(default_factory=dict)  # layer -> head x head mean JS distance
    recovery_fits: int = 0  # modules recovery re-fitted (remedy=recovery)
    recovery_fallbacks: list[str] = field(default_factory=list)  # where a solve failed and weights were kept

    @property
    def sparsity_achieved(self) -> float:
        return 1 - self.params_after / self.params_before


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prunable_layers(n_layers: int, layers: tuple[int, int] | None) -> range:
    if layers is None:
        return range(n_layers)
    start, end = layers
    if not (0 <= start < end <= n_layers):
        raise ValueError(f"layer range [{start}, {end}) is outside the model's {n_layers} blocks; accepted: 0 <= start < end <= {n_layers}")
    return range(start, end)


def module_shapes(adapter, model, layer_range: range, modules: tuple[str, ...],
                  attention_unit: str = "kv_group") -> list[alloc.ModuleShape]:
    """What allocation counts in: one step removes one unit from every group of a module."""
    shapes = []
    for k in layer_range:
        block = adapter.layers(model)[k]
        for kind in modules:
            d2 = _view(adapter, block, kind, attention_unit)
            shapes.append(alloc.ModuleShape(k, kind, d2.per_group, d2.params_per_unit * d2.groups))
    return shapes


def _view(adapter, block: nn.Module, kind: str, attention_unit: str = "kv_group") -> DepthTwo:
    return adapter.attention(block, attention_unit) if kind == "attention" else adapter.mlp(block)


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _output_moments(moments: ChannelMoments):
    def hook(module, _args, out):
        moments.update(out if module.bias is None else out - module.bias)

    return hook


def _run_until_stop(block: nn.Module, chunk: Chunk) -> None:
    with suppress(Stop):
        chunk.forward(block)


def _capture(block: nn.Module, module: nn.Module, chunk: Chunk) -> torch.Tensor:
    """The input of `module` when `block` runs on `chunk` (the rest of the block is skipped)."""
    seen = {}

    def hook(_m, args):
        seen["x"] = args[0].detach()
        raise Stop

    with _hooks([module.register_forward_pre_hook(hook)]):
        _run_until_stop(block, chunk)
    return seen["x"]


class Pipeline:
    def __init__(self, model: nn.Module, adapter, metric: metrics_registry.Metric, settings: PruneSettings,
                 device: torch.device):
        check_remedy(settings.remedy)
        check_attention_unit(settings.attention_unit)
        if settings.allocation not in alloc.ALLOCATIONS:
            raise ValueError(f"unknown allocation {settings.allocation!r}; accepted: {', '.join(alloc.ALLOCATIONS)}")
        if settings.sparsity_mode not in alloc.SPARSITY_MODES:
            raise ValueError(f"unknown sparsity_mode {settings.sparsity_mode!r}; accepted: {', '.join(alloc.SPARSITY_MODES)}")
        bad = [m for m in settings.modules if m not in MODULES]
        if bad or not settings.modules:
            raise ValueError(f"unknown prune modules {bad or '[]'}; accepted: a non-empty subset of {list(MODULES)}")
        self.model, self.adapter, self.metric, self.s, self.device = model, adapter, metric, settings, device
        self.stats_dtype = torch.float64 if device.type == "cpu" else torch.float32
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.times: dict[str, float] = defaultdict(float)
        self.removed: dict[tuple[int, str], list[int]] = {}
        self.divergence: dict[int, list[list[float]]] = {}
        self.recovery_fits, self.recovery_fallbacks = 0, []
        self.grads: dict = {}
        self.calls: list[list[BlockCall]] = []  # [block][chunk]: how the model calls each block
        self.blocks = adapter.layers(model)
        self.layer_range = prunable_layers(len(self.blocks), settings.layers)

    def view(self, block: nn.Module, kind: str) -> DepthTwo:
        return _view(self.adapter, block, kind, self.s.attention_unit)

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.times[stage] += time.perf_counter() - t

    # ---- calibration inputs --------------------------------------------------------------

    def capture_inputs(self, input_ids: torch.Tensor) -> list[Chunk]:
        """The stream entering block 0; every block's own arguments go to `self.calls`."""
        hidden, self.calls = capture(self.model, self.blocks, input_ids, self.s.chunk_size, self.device)
        return chunks_at(hidden, self.calls[0])

    def advance(self, block: nn.Module, k: int, h: list[Chunk]) -> list[Chunk]:
        """Block k's outputs, as the stream entering block k+1 (with block k+1's arguments)."""
        out = [c.forward(block) for c in h]
        return chunks_at(out, self.calls[k + 1] if k + 1 < len(self.blocks) else [_END] * len(out))

    # ---- statistics ----------------------------------------------------------------------

    def collect(self, block: nn.Module, d2: DepthTwo, chunks: list[Chunk], needs: frozenset[str]) -> ModuleStats:
        stats = ModuleStats()
        handles = []
        dt, dev = self.stats_dtype, self.device
        if "level1" in needs:
            for module in d2.level1:
                moments = ChannelMoments(weight(module).shape[0], dt, dev)
                stats.level1.append(moments)
                handles.append(module.register_forward_hook(_output_moments(moments)))
        if "level2" in needs:
            cls = FlapSampleMoments if self.s.flap_faithful else ChannelMoments
            stats.level2 = cls(in_features(d2.level2), dt, dev)
            handles.append(d2.level2.register_forward_pre_hook(lambda _m, a: stats.level2.update(a[0])))
        if "grad" in needs:
            stats.extra["grad"] = self.grads
        if not needs & {"level1", "level2", "js"}:
            return stats  # nothing to observe: no calibration pass
        if d2.kind == "attention":
            def after_attention(_m, _args, out):
                if "js" in needs:
                    if out[1] is None:
                        raise RuntimeError("attention probabilities are unavailable; the pipeline needs eager attention")
                    stats.add_js(out[1])
                raise Stop  # the MLP is not needed for attention statistics

            handles.append(self.adapter.attention_module(block).register_forward_hook(after_attention))
        else:
            def stop(_m, _a):
                raise Stop

            handles.append(d2.level2.register_forward_pre_hook(stop))
        with _hooks(handles), torch.no_grad():
            for chunk in chunks:
                _run_until_stop(block, chunk)
        return stats

    def rank(self, block: nn.Module, d2: DepthTwo, chunks: list[Chunk], layer: int) -> tuple[metrics_registry.Ranking, ModuleStats]:
        needs = set(self.metric.needs(d2.kind))
        if self.s.remedy == "bias":
            needs.add("level2")
        with self._timed("statistics"):
            stats = self.collect(block, d2, chunks, frozenset(needs))
        if stats.js_sum is not None:
            self.divergence[layer] = stats.js.tolist()  # kept for the head-similarity figure
        with self._timed("scoring"):
            ranking = self.metric.rank(d2, stats, self.generator)
        check_finite(ranking.scores, f"{self.metric.name} scores of block {layer} {d2.kind}")
        return ranking, stats

    # ---- the passes ----------------------------------------------------------------------

    def dense_allocation_scores(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Adaptive allocation: every module's allocation scores on the dense model."""
        scores = []
        h = chunks
        for k in tqdm(range(self.layer_range.stop), desc="scoring (dense pass)", disable=None):
            home = next(self.blocks[k].parameters()).device
            block = self.blocks[k].to(self.device)
            if k in self.layer_range:
                for kind in self.s.modules:
                    d2 = self.view(block, kind)
                    ranking, _ = self.rank(block, d2, h, k)
                    scores.append(alloc.step_scores(ranking.for_allocation(), d2.groups))
            with torch.no_grad(), self._timed("forward"):
                h = self.advance(block, k, h)
            block.to(home)
        return scores

    def prune_module(self, block: nn.Module, dense: nn.Module | None, kind: str, n_remove: int,
                     h: list[Chunk], hd: list[Chunk] | None, layer: int) -> None:
        d2 = self.view(block, kind)
        if dense is not None:
            with self._timed("recovery"), torch.no_grad():
                self.recover(block, dense, kind, h, hd, layer)
        ranking, stats = self.rank(block, d2, h, layer)
        if n_remove == 0:
            return
        with self._timed("cut"), torch.no_grad():
            removed = alloc.first_per_group(ranking.removal_order(), d2.groups, d2.per_group, n_remove)
            self.removed[(layer, kind)] = sorted(removed.tolist())
            mask = torch.ones(d2.n_units, dtype=torch.bool)
            mask[removed] = False
            keep = d2.all_units()[mask]
            if self.s.remedy == "bias":
                bias_remedy.compensate(d2, keep, stats.level2.mean)
            if kind == "attention":
                self.adapter.prune_attention(block, keep, self.s.attention_unit)
            else:
                self.adapter.prune_mlp(block, keep)

    def recover(self, block: nn.Module, dense: nn.Module, kind: str, h: list[Chunk], hd: list[Chunk], layer: int) -> None:
        d2, d2_dense = self.view(block, kind), self.view(dense, kind)
        for level in (1, 2):
            mods = d2.level1 if level == 1 else [d2.level2]
            probe, probe_dense = (d2.module_input, d2_dense.module_input) if level == 1 else (d2.level2, d2_dense.level2)
            moments = None
            for c, cd in zip(h, hd, strict=True):
                x, xd = _capture(block, probe, c), _capture(dense, probe_dense, cd)
                if moments is None:
                    moments = CrossMoments(x.shape[-1], any(m.bias is not None for m in mods), self.stats_dtype, self.device)
                moments.update(x, xd)
            where = f"block {layer} {kind} level {level}"
            fitted = refit(mods, moments, self.s.damp, where, self.s.ridge_toward)
            self.recovery_fits += sum(fitted)
            self.recovery_fallbacks += [f"{where} module {i}" for i, ok in enumerate(fitted) if not ok]

    def run(self, input_ids: torch.Tensor) -> PruneReport:
        start = time.perf_counter()
        total = n_params(self.model)
        shapes = module_shapes(self.adapter, self.model, self.layer_range, self.s.modules, self.s.attention_unit)
        ratio, target = alloc.budget(shapes, total, self.s.sparsity, self.s.sparsity_mode, self.s.allocation, self.layer_range)
        if any("grad" in self.metric.needs(kind) for kind in self.s.modules):
            from harness.gradients import taylor_gradients

            modules = [m for k in self.layer_range for kind in self.s.modules
                       for d2 in [self.view(self.blocks[k], kind)] for m in (*d2.level1, d2.level2)]
            with self._timed("gradients"):
                self.grads = taylor_gradients(self.model, modules, input_ids, self.device)
        with self._timed("forward"):
            chunks = self.capture_inputs(input_ids)
        if ratio is not None:
            counts = alloc.uniform(shapes, ratio)
        else:
            counts = alloc.adaptive(shapes, self.dense_allocation_scores(chunks), target)
        plan = {(sh.layer, sh.kind): n for sh, n in zip(shapes, counts, strict=True)}

        h, hd = chunks, (chunks if self.s.remedy == "recovery" else None)
        for k in tqdm(range(self.layer_range.stop), desc=f"pruning ({self.metric.name})", disable=None):
            home = next(self.blocks[k].parameters()).device  # a CPU-resident model visits the device block by block
            block = self.blocks[k].to(self.device)
            dense = copy.deepcopy(block) if hd is not None and k in self.layer_range else None
            if k in self.layer_range:
                for kind in self.s.modules:
                    self.prune_module(block, dense, kind, plan[(k, kind)], h, hd, k)
            with torch.no_grad(), self._timed("forward"):
                h = self.advance(block, k, h)
                if hd is not None:
                    hd = self.advance(dense if dense is not None else block, k, hd)
            for c in h:
                check_finite(c.hidden, f"the output of block {k} after pruning")
            block.to(home)
        if self.recovery_fallbacks and not self.recovery_fits:
            raise RuntimeError(f"remedy=recovery: every one of the {len(self.recovery_fallbacks)} fits fell back to the "
                               f"unchanged weights (X^T X singular at every level; remedy.damp={self.s.damp}); "
                               "this would be a no-remedy run recorded as recovery")
        per_layer = [self.adapter.shape(b) for b in self.blocks]
        return PruneReport(ratio, total, n_params(self.model), per_layer, time.perf_counter() - start, dict(self.times),
                           self.removed, self.divergence, self.recovery_fits, self.recovery_fallbacks)


def prune(model: nn.Module, input_ids: torch.Tensor, metric: metrics_registry.Metric, settings: PruneSettings,
          device: torch.device | None = None) -> PruneReport:
    """Prune `model` in place on calibration `input_ids` [N, seqlen]; see the module doc."""
    from harness.models import adapter_for

    device = device or next(model.parameters()).device
    adapter = adapter_for(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention probabilities for the similarity statistics
    try:
        return Pipeline(model, adapter, metric, settings, device).run(input_ids)
    finally:
        model.set_attn_implementation(previous)
