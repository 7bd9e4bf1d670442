"""LM-loss gradients of the prunable weights, for LLM-Pruner's Taylor importance.

One backward pass per calibration sequence gives g_n; we keep g = mean_n g_n (the gradient of
the mean loss, "mean") and a = mean_n g_n^2 (the Fisher approximation of the Hessian
diagonal, "square"), for the level-1 and level-2 weights of the pruned blocks only, in
[out, in] layout, and only the moments the metric reads (element1 needs no `a`). Each
weight's gradient is folded into the sums as soon as backward has produced it and then
freed, so besides the model and the float32 sums only one weight's gradient and one
sequence's activations exist at a time. The model must fit on `device` whole (no block
offload here), and stays in eval mode (GPT-2's dropout would make the gradients random).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.models.base import is_conv1d, weight

MOMENTS = frozenset({"mean", "square"})

Moments = tuple[torch.Tensor | None, torch.Tensor | None]  # (g, a), None where not asked for


def taylor_gradients(model: nn.Module, modules: list[nn.Module], input_ids: torch.Tensor, device: torch.device,
                     moments: frozenset[str] = MOMENTS) -> dict[nn.Module, Moments]:
    if not moments or moments - MOMENTS:
        raise ValueError(f"gradient moments {sorted(moments)!r}; accepted: a non-empty subset of {sorted(MOMENTS)}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    sums: dict[nn.Module, list[torch.Tensor | None]] = {
        m: [torch.zeros_like(weight(m), dtype=torch.float32) if k in moments else None for k in ("mean", "square")]
        for m in modules}

    def fold(module: nn.Module):
        def hook(p: torch.Tensor) -> None:
            g = (p.grad.T if is_conv1d(module) else p.grad).float()  # [out, in] like weight(m)
            g_sum, g2_sum = sums[module]
            if g_sum is not None:
                g_sum += g
            if g2_sum is not None:
                g2_sum.addcmul_(g, g)
            p.grad = None

        return hook

    handles = []
    model.zero_grad(set_to_none=True)  # a gradient left from before would be summed into the first
    try:
        for m in modules:
            m.weight.requires_grad_(True)
            handles.append(m.weight.register_post_accumulate_grad_hook(fold(m)))
        for ids in tqdm(input_ids, desc="taylor gradients", disable=None):
            ids = ids[None].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
    n = len(input_ids)
    return {m: tuple(None if s is None else s.div_(n) for s in sums[m]) for m in modules}
