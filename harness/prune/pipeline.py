"""The structured track on the block engine (harness/blocks; DESIGN.md, "One run, as data flows").

Calibration tokens go through the embeddings once; from then on only hidden states move,
and each block is called with the arguments the model's own forward gives that block
(blocks/stream.py: masks, positions, rotary tables, per layer). For each block k in the layer
range, module by module in forward order (attention, then MLP):
  [remedy before scoring] -> statistics (observe.py) -> scores -> units to remove
  -> [remedy after selection] -> physical cut
then the pruned block's outputs become block k+1's inputs. Only block k is on the compute
device and only its statistics exist at a time (with a LazyCheckpoint as `store`, only block
k is in memory at all: blocks/engine.py, models/lazy.py). Each module is computed once per block: once cut, it
is replayed from the level-2 inputs its statistics pass recorded (stream.Replay) in the
later passes over the block. A remedy that fits weights (recovery) sees the stream of the
model pruned so far and what the dense block computes on the dense model's stream (one pass
of block k before anything in it is cut: `dense_pass`), on its own calibration set where one
is given (`fit_ids`; the paper recovers on downstream examples, scores on
WikiText-2/BookCorpus), and only once something upstream was cut: before that the module's
input is the dense input and there is nothing to recover. An allocation policy that needs every
module's scores first (adaptive) gets them from one extra scoring pass over the dense model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from harness import metrics as metrics_registry
from harness import remedy as remedies
from harness.blocks.engine import BlockEngine
from harness.blocks.hooks import hooks
from harness.blocks.stats import ModuleStats, check_finite
from harness.blocks.stream import BlockCall, Chunk, Replay, advance
from harness.models import module_view
from harness.models.base import DepthTwo
from harness.prune import allocation as alloc
from harness.prune.gradients import taylor_gradients
from harness.prune.observe import observe
from harness.prune.report import PruneReport
from harness.settings import PruneSettings, n_params, prunable_layers

log = logging.getLogger(__name__)


def module_shapes(adapter, model, layer_range: range, modules: tuple[str, ...],
                  attention_unit: str = "kv_group") -> list[alloc.ModuleShape]:
    """What allocation counts in: one step removes one unit from every group of a module."""
    shapes = []
    for k in layer_range:
        block = adapter.layers(model)[k]
        for kind in modules:
            view = module_view(adapter, block, kind, attention_unit)
            shapes.append(alloc.ModuleShape(k, kind, view.per_group, view.params_per_unit * view.groups))
    return shapes


class Pipeline:
    """What the structured track does to each block, on a BlockEngine (resident or lazy)."""

    def __init__(self, engine: BlockEngine, metric: metrics_registry.Metric, settings: PruneSettings):
        self.engine, self.metric, self.settings = engine, metric, settings
        self.model, self.adapter, self.device, self.blocks = engine.model, engine.adapter, engine.device, engine.blocks
        remedy = remedies.get(settings.remedy)
        remedy.check(settings)
        self.remedy = remedy(settings)
        self.policy = alloc.POLICIES[settings.allocation]
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.removed: dict[tuple[int, str], list[int]] = {}
        self.divergence: dict[int, list[list[float]]] = {}
        self.grads: dict = {}
        self.calls: list[list[BlockCall]] = []  # [block][chunk]: how the model calls each block
        self.cut_upstream = False  # whether any unit before the current module was removed
        self.unchanged_inputs = 0  # modules the remedy skipped: their input was still the dense one
        self.layer_range = prunable_layers(len(self.blocks), settings.layers)

    def view(self, block: nn.Module, kind: str) -> DepthTwo:
        return module_view(self.adapter, block, kind, self.settings.attention_unit)

    # ---- one module ----------------------------------------------------------------------

    def observe_and_score(self, block: nn.Module, view: DepthTwo, stream: list[Chunk], layer: int,
                          keep_level2_inputs: bool = False,
                          fit: remedies.FitContext | None = None) -> tuple[metrics_registry.Ranking, ModuleStats]:
        """Observe one module's statistics and score it; with `fit`, the remedy re-fits the module in
        between (`keep_level2_inputs`: keep each chunk's level-2 input for the replay)."""
        needs = frozenset(self.metric.needs(view.kind)) | self.remedy.needs
        with self.engine.timed("statistics"):
            stats = observe(block, view, self.adapter.attention_module(block), stream, needs, self.grads,
                            self.engine.stats_dtype, self.device, self.settings.flap_faithful,
                            keep_level2_inputs)
        if fit is not None:
            seen = stats.level2_inputs if fit.stream is stream and stats.level2_inputs else None
            with self.engine.timed(self.remedy.name), torch.no_grad():
                self.remedy.before_scoring(fit, seen)
        position, count = layer - self.layer_range.start, len(self.layer_range)
        stats.depth = position / (count - 1) if count > 1 else 0.0
        if stats.js_sum is not None:
            self.divergence[layer] = stats.js.tolist()  # kept for the head-similarity figure
        with self.engine.timed("scoring"):
            ranking = self.metric.rank(view, stats, self.generator)
        check_finite(ranking.scores, f"{self.metric.name} scores of block {layer} {view.kind}")
        return ranking, stats

    def prune_module(self, block: nn.Module, kind: str, n_remove: int, stream: list[Chunk],
                     fit: tuple[list[Chunk], tuple[list, list]] | None, layer: int) -> list[Chunk]:
        """`fit`: the stream the remedy fits on (`stream` itself, or the pruned model's stream
        of its own calibration set) and what the dense module saw (dense_pass), when it keeps a
        dense reference. Returns the stream with this module replayed from the level-2 inputs
        its statistics pass saw (stream.Replay), where the architecture allows."""
        view = self.view(block, kind)
        context = None
        if fit is not None and not self.cut_upstream:
            self.unchanged_inputs += 1
        elif fit is not None:
            context = remedies.FitContext(block, view, *fit, f"block {layer} {kind}", self.engine.stats_dtype, self.device)
            with self.engine.timed(self.remedy.name), torch.no_grad():
                self.remedy.before_observing(context)
        module = self.adapter.attention_module(block) if kind == "attention" else self.adapter.mlp_module(block)
        # Level-2 inputs are kept for the replay, and for the remedy when it fits on this stream.
        keep = module is not None or (context is not None and context.stream is stream)
        ranking, stats = self.observe_and_score(block, view, stream, layer, keep, context)
        columns = None
        if n_remove:
            self.cut_upstream = True
            with self.engine.timed("cut"), torch.no_grad():
                removed = alloc.first_per_group(ranking.removal_order(), view.groups, view.per_group, n_remove)
                self.removed[(layer, kind)] = sorted(removed.tolist())
                mask = torch.ones(view.n_units, dtype=torch.bool)
                mask[removed] = False
                keep = view.all_units()[mask]
                columns = view.level2_channels(keep)
                self.remedy.after_selection(view, keep, stats)
                if kind == "attention":
                    self.adapter.prune_attention(block, keep, self.settings.attention_unit)
                else:
                    self.adapter.prune_mlp(block, keep)
        if module is None or not stats.level2_inputs:
            return stream
        inputs, stats.level2_inputs = stats.level2_inputs, []
        with self.engine.timed("forward"), torch.no_grad():
            outputs = [view.level2(x if columns is None else x.index_select(-1, columns.to(x.device))) for x in inputs]
        return [chunk.replaying(Replay(module, out, stats.arity)) for chunk, out in zip(stream, outputs, strict=True)]

    # ---- the passes ----------------------------------------------------------------------

    def dense_pass(self, block: nn.Module, k: int, stream: list[Chunk], calls: list[list[BlockCall]],
                   kinds: tuple[str, ...]) -> tuple[dict[str, tuple[list, list]], list[Chunk]]:
        """One forward of block k, still dense, over the dense stream: each module's (of `kinds`)
        level-1 input and level-2 output per chunk (what a remedy fits to), and the dense stream
        entering block k+1."""
        inputs: dict[str, tuple[list, list]] = {kind: ([], []) for kind in kinds}
        handles = []
        for kind, (level1, level2) in inputs.items():
            view = self.view(block, kind)
            handles += [view.module_input.register_forward_pre_hook(lambda _m, a, seen=level1: seen.append(a[0].detach())),
                        view.level2.register_forward_hook(lambda _m, _a, out, seen=level2: seen.append(out.detach()))]
        with hooks(handles):
            out = advance(block, k, stream, calls)
        return inputs, out

    def dense_allocation_scores(self, stream: list[Chunk], calls: list[list[BlockCall]]) -> list[torch.Tensor]:
        """Every module's allocation scores on the dense model (for `adaptive`)."""
        scores = []
        for k in tqdm(range(self.layer_range.stop), desc="scoring (dense pass)", disable=None):
            with self.engine.visit(k, write=False) as block:
                if k in self.layer_range:
                    for kind in self.settings.modules:
                        view = self.view(block, kind)
                        ranking, _ = self.observe_and_score(block, view, stream, k)
                        scores.append(alloc.step_scores(ranking.for_allocation(), view.groups))
                with torch.no_grad(), self.engine.timed("forward"):
                    stream = advance(block, k, stream, calls)
        return scores

    def run(self, input_ids: torch.Tensor, fit_ids: torch.Tensor | None = None) -> PruneReport:
        start = time.perf_counter()
        settings = self.settings
        total = n_params(self.model)
        shapes = module_shapes(self.adapter, self.model, self.layer_range, settings.modules, settings.attention_unit)
        ratio, target = alloc.budget(shapes, total, settings.sparsity, settings.sparsity_mode, settings.allocation,
                                     self.layer_range)
        if self.metric.needs_gradients(settings.modules):
            modules = [m for k in self.layer_range for kind in settings.modules
                       for view in [self.view(self.blocks[k], kind)] for m in (*view.level1, view.level2)]
            with self.engine.timed("gradients"):
                self.grads = taylor_gradients(self.model, modules, input_ids, self.device,
                                               self.metric.gradient_moments())
        with self.engine.timed("forward"):
            stream, calls = self.engine.capture(input_ids)
            # The remedy's own data (a second stream, its own block arguments), or the scoring stream.
            separate = self.remedy.fits_on_data and fit_ids is not None
            fit_stream, fit_calls = self.engine.capture(fit_ids) if separate else (stream, calls)
        scores = self.dense_allocation_scores(stream, calls) if self.policy.uses_dense_scores else None
        counts = self.policy.counts(shapes, ratio, target, scores)
        plan = {(shape.layer, shape.kind): n for shape, n in zip(shapes, counts, strict=True)}

        dense_stream = fit_stream if self.remedy.fits_on_data else None
        for k in tqdm(range(self.layer_range.stop), desc=f"pruning ({self.metric.name})", disable=None):
            with self.engine.visit(k, write=True) as block:
                pruned_here = k in self.layer_range
                # Before the first cut the dense stream is the fit stream itself (LLaMA-7B's
                # blocks 0..3): it is advanced once, below, not a second time here.
                lead = dense_stream is not None and not self.cut_upstream and not pruned_here
                dense_inputs = None
                if dense_stream is not None and not lead:  # the block is still dense: its pass over the dense stream first
                    with torch.no_grad(), self.engine.timed("forward"):
                        dense_inputs, dense_stream = self.dense_pass(block, k, dense_stream, fit_calls,
                                                                     settings.modules if pruned_here else ())
                in_block = stream  # gains a replay per module whose level-2 inputs were seen
                if pruned_here:
                    for kind in settings.modules:
                        fit = None if dense_inputs is None else (fit_stream if separate else in_block, dense_inputs[kind])
                        in_block = self.prune_module(block, kind, plan[(k, kind)], in_block, fit, k)
                with torch.no_grad(), self.engine.timed("forward"):
                    stream = advance(block, k, in_block, calls)
                    if separate:
                        fit_stream = advance(block, k, fit_stream, fit_calls)
                if lead:
                    dense_stream = fit_stream if separate else stream
                for chunk in stream:
                    check_finite(chunk.hidden, f"the output of block {k} after pruning")
        remedy_report = self.remedy.finish()
        if self.remedy.fits_on_data:
            remedy_report["unchanged_inputs"] = self.unchanged_inputs
        per_layer = [self.adapter.shape(b) for b in self.blocks]
        return PruneReport(ratio, total, n_params(self.model), per_layer, time.perf_counter() - start, dict(self.engine.times),
                           self.removed, self.divergence, remedy_report)


def prune(model: nn.Module, input_ids: torch.Tensor, metric: metrics_registry.Metric, settings: PruneSettings,
          device: torch.device | None = None, fit_ids: torch.Tensor | None = None, store=None,
          out: Path | None = None) -> PruneReport:
    """Prune `model` in place on calibration `input_ids` [N, seqlen]; a remedy that fits
    weights fits on `fit_ids` [M, seqlen'] when given (else on `input_ids`). See the module doc.
    `store`: the LazyCheckpoint `model` is the skeleton of (models/lazy.py); the pruned
    blocks are then written to `out`/blocks and the model stays on the meta device."""
    if store is not None and metric.needs_gradients(settings.modules):
        raise ValueError(f"metric {metric.name!r} needs gradients of the whole model, which a lazily loaded model "
                         "never holds; accepted with lazy loading: metrics without gradients (not taylor, hywia)")
    device = device or (torch.device("cpu") if store is not None else next(model.parameters()).device)
    engine = BlockEngine(model, device, settings.chunk_size, store, out)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention probabilities for the similarity statistics
    try:
        return Pipeline(engine, metric, settings).run(input_ids, fit_ids)
    finally:
        model.set_attn_implementation(previous)
