"""LM-loss gradients of the prunable weights, for LLM-Pruner's Taylor importance.

One backward pass per calibration sequence gives g_n; we keep g = mean_n g_n (the gradient of
the mean loss) and a = mean_n g_n^2 (the Fisher approximation of the Hessian diagonal), for
the level-1 and level-2 weights of the pruned blocks only, in [out, in] layout. One sequence
per backward bounds activation memory; the model must fit on `device` whole (no block
offload here), and stays in eval mode (GPT-2's dropout would make the gradients random).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.models.base import is_conv1d, weight


def taylor_gradients(model: nn.Module, modules: list[nn.Module], input_ids: torch.Tensor,
                     device: torch.device) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    params = {m: m.weight for m in modules}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    g_sum = {m: torch.zeros_like(weight(m), dtype=torch.float32) for m in modules}
    g2_sum = {m: torch.zeros_like(weight(m), dtype=torch.float32) for m in modules}
    try:
        for ids in tqdm(input_ids, desc="taylor gradients", disable=None):
            ids = ids[None].to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for m, p in params.items():
                g = (p.grad.T if is_conv1d(m) else p.grad).float()  # [out, in] like weight(m)
                g_sum[m] += g
                g2_sum[m] += g * g
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
    n = len(input_ids)
    return {m: (g_sum[m] / n, g2_sum[m] / n) for m in modules}
