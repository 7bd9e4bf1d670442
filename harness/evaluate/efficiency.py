"""Efficiency of a (pruned) model: parameters, analytic MACs per token, measured latency."""

from __future__ import annotations

import time

import torch

from harness.models import adapter_for
from harness.models.surgery import present_views
from harness.settings import n_params


def macs_per_token(model, seqlen: int) -> int:
    """Multiply-accumulates per token of a forward pass at context `seqlen`: every linear
    weight once, plus attention scores and mixing (2 x heads x head_dim x seqlen/2 on average,
    causal), plus the LM head; a removed sub-block (models/surgery.py) costs nothing."""
    ad = adapter_for(model)
    total = 0
    for block in ad.layers(model):
        for view in present_views(ad, block):
            total += sum(m.weight.numel() for m in view.level1) + view.level2.weight.numel()
            if view.kind == "attention":
                total += 2 * view.n_units * view.heads_per_unit * view.head_dim * (seqlen // 2)
    return total + model.get_output_embeddings().weight.numel()


@torch.no_grad()
def latency(model, batch_size: int, seqlen: int, repeats: int = 3) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seqlen), device=device)
    model(input_ids=ids, use_cache=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    best = min(times)
    out = {"batch_size": batch_size, "seqlen": seqlen, "latency_s": best, "tokens_per_s": batch_size * seqlen / best}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


def efficiency(model, seqlen: int, batch_size: int = 1, repeats: int = 3) -> dict:
    return {"params": n_params(model), "macs_per_token": macs_per_token(model, seqlen),
            **latency(model, batch_size, seqlen, repeats)}
