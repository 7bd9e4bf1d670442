"""The arithmetic recovery adds to a block, timed apart from the pipeline (`make bench`).

Recovery (paper Algorithms 2-4) cannot cost less per block than: one forward of the dense
block over the dense stream (its targets), the Gram and cross products of its four fits
(attention and MLP, levels 1 and 2) over the calibration tokens, and their four ridge solves.
Added to the run without recovery, these give a lower bound on `ours+recovery / ours` that no
reorganisation of the pipeline can beat: the bench prints it next to the measured ratio. The
products and solves run the remedy's own code (CrossMoments.update, refit) on random inputs of
the block's real widths, chunked as the pipeline chunks the calibration set.
"""

from __future__ import annotations

import copy
import time

import torch

from harness.models import adapter_for
from harness.models.base import in_features, out_features
from harness.prune import PruneSettings
from harness.remedy.recovery import CrossMoments, refit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def recovery_arithmetic(model, n_samples: int, seqlen: int, device: torch.device,
                        repeats: int = 3) -> dict[str, dict[str, float]]:
    """Seconds of recovery's moment products and of its solves (`refit`, weights written into a
    copy of block 0) per module kind of one block, for `n_samples` x `seqlen` calibration tokens:
    the fastest of `repeats` after one untimed round (a floor: one-time costs left out)."""
    adapter = adapter_for(model)
    settings = PruneSettings()
    block = copy.deepcopy(adapter.layers(model)[0]).to(device)
    views = [adapter.attention(block, settings.attention_unit), adapter.mlp(block)]
    chunks = [min(settings.chunk_size, n_samples - start) * seqlen for start in range(0, n_samples, settings.chunk_size)]
    dtype = torch.float64 if device.type == "cpu" else torch.float32  # the pipeline's statistics dtype
    generator = torch.Generator(device=device).manual_seed(0)
    rounds = []
    for _ in range(repeats + 1):
        seconds = {}
        for view in views:
            spent = seconds[view.kind] = {"moments": 0.0, "solves": 0.0}
            for level, modules in ((1, view.level1), (2, [view.level2])):
                width = in_features(modules[0])
                targets = out_features(view.level2) if level == 2 else None
                moments = CrossMoments(width, any(m.bias is not None for m in modules), dtype, device, targets)
                for tokens in chunks:
                    current = torch.randn(tokens, width, device=device, generator=generator)
                    dense = torch.randn(tokens, targets or width, device=device, generator=generator)
                    _sync(device)
                    start = time.perf_counter()
                    moments.update(current, dense)
                    _sync(device)
                    spent["moments"] += time.perf_counter() - start
                start = time.perf_counter()
                refit(modules, moments, settings.damp, f"floor level {level}")
                _sync(device)
                spent["solves"] += time.perf_counter() - start
        rounds.append(seconds)
    return {kind: {part: min(r[kind][part] for r in rounds[1:]) for part in ("moments", "solves")}
            for kind in rounds[0]}


def recovery_floor(ours: dict, unit: float, arithmetic: dict[str, dict[str, float]]) -> dict[str, float]:
    """Lower bounds on `ours+recovery / ours` (the module doc): the run without recovery plus,
    per block, one plain dense forward and the fits' products (`without_solves`), and their
    solves too (`ratio`). Block 0's attention is never re-fitted (nothing before it was cut)."""
    blocks = ours["blocks"]
    counts = {"attention": blocks - 1, "mlp": blocks}
    products = sum(counts[kind] * s["moments"] for kind, s in arithmetic.items())
    solves = sum(counts[kind] * s["solves"] for kind, s in arithmetic.items())
    base = ours["seconds"] + blocks * unit + products
    return {"without_solves": base / ours["seconds"], "ratio": (base + solves) / ours["seconds"],
            "products_s_per_block": products / blocks, "solves_s_per_block": solves / blocks}
