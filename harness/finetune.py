"""LoRA fine-tuning after pruning (`finetune=lora`), the retraining row of the paper's Table 1.

LLM-Pruner's recipe where it fits a CPU: LoRA rank 8, alpha 16, dropout 0.05 on every linear
layer of every block (q/k/v/o and the MLP), AdamW at lr 1e-4, next-token loss on every token.
Its data (alpaca-cleaned, 2 epochs, batch 64) does not: here the sequences come from the
calibration machinery (`finetune.data`, default C4 windows) and the length is `steps` batches.
The learning rate is constant (no warm-up or decay). The adapters are merged at the end, so
the evaluated, checkpointed and exported model is a plain transformers model again.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.models.base import is_conv1d

METHODS = ("none", "lora")


def linear_names(model: nn.Module, blocks: list[nn.Module]) -> list[str]:
    """The full names of the blocks' linear layers (nn.Linear and GPT-2's Conv1D), in order."""
    inside = {id(m) for block in blocks for m in block.modules()}
    return [name for name, m in model.named_modules()
            if id(m) in inside and (isinstance(m, nn.Linear) or is_conv1d(m))]


def lora_targets(model: nn.Module, blocks: list[nn.Module], targets: list[str] | None) -> list[str]:
    """The modules the adapters go on: every block's linear layers, or those whose last name
    part is in `targets` (e.g. [q_proj, v_proj]); an unknown part is refused naming the known ones."""
    names = linear_names(model, blocks)
    if targets is None:
        return names
    known = sorted({n.rsplit(".", 1)[-1] for n in names})
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        raise ValueError(f"finetune.targets={list(targets)!r} names no linear layer of the blocks"
                         f"{f' ({unknown})' if unknown else ''}; accepted: a non-empty subset of {', '.join(known)}")
    return [n for n in names if n.rsplit(".", 1)[-1] in targets]


def lora_finetune(model: nn.Module, blocks: list[nn.Module], ids: torch.Tensor, *, rank: int, alpha: float,
                  dropout: float, targets: list[str] | None, steps: int, lr: float, batch_size: int, seed: int,
                  device: torch.device) -> tuple[nn.Module, dict]:
    """Train LoRA adapters on `ids` [N, seqlen] for `steps` batches, merge them; returns the
    plain merged model and what the record says about the fine-tuning."""
    from peft import LoraConfig, get_peft_model

    names = lora_targets(model, blocks, targets)
    targeted = set(names)
    conv1d = any(is_conv1d(m) for n, m in model.named_modules() if n in targeted)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                        fan_in_fan_out=conv1d)  # GPT-2's Conv1D stores [in, out]
    frozen_state = {p: p.requires_grad for p in model.parameters()}
    # LoRA's initial A matrices and its dropout masks come from the global RNG: seeded here (and
    # restored after), the same config gives the same fine-tuned model.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        order = torch.empty(0, dtype=torch.long)
        losses: list[float] = []
        start = time.perf_counter()
        peft_model.train()
        try:
            bar = tqdm(range(steps), desc="finetune (lora)", disable=None)
            for _ in bar:
                if len(order) < batch_size:  # a new pass over the sequences, in a new order
                    order = torch.cat([order, torch.randperm(len(ids), generator=generator)])
                batch, order = ids[order[:batch_size]].to(device), order[batch_size:]
                loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        finally:
            peft_model.eval()
    merged = peft_model.merge_and_unload()
    for p, requires_grad in frozen_state.items():
        p.requires_grad_(requires_grad)
    merged.eval()
    entry = {"method": "lora", "rank": rank, "alpha": alpha, "dropout": dropout, "lr": lr, "steps": steps,
             "batch_size": batch_size, "target_modules": len(names),
             "target_names": sorted({n.rsplit(".", 1)[-1] for n in names}),
             "trainable_params": sum(p.numel() for p in trainable), "tokens": steps * batch_size * ids.shape[1],
             "epochs": steps * batch_size / len(ids), "seconds": time.perf_counter() - start,
             "loss_first": losses[0], "loss_last": losses[-1], "losses": losses, "merged": True}
    return merged, entry
