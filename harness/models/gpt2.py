"""GPT-2 adapter: fused Conv1D c_attn ([d, 3d], q|k|v), c_proj, GELU MLP c_fc/c_proj, biases.
Multi-head attention: a KV group is one head, so both attention units mean a head."""

from __future__ import annotations

import torch
from torch import nn

from harness.models.base import DepthTwo, channel_mlp, channel_range, check_attention_unit, cut

MODEL_TYPES = ("gpt2",)


def layers(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h


def attention(block: nn.Module, unit: str = "kv_group") -> DepthTwo:
    check_attention_unit(unit)
    attn = block.attn
    hd = attn.head_dim
    width = attn.split_size  # q, k and v each have `split_size` output channels
    n = width // hd
    hidden = attn.c_attn.weight.shape[0]
    return DepthTwo(
        kind="attention",
        level1=[attn.c_attn],
        level2=attn.c_proj,
        n_units=n,
        level1_channels=lambda u: [torch.cat([channel_range(u, hd, k * width) for k in range(3)])],
        level2_channels=lambda u: channel_range(u, hd),
        params_per_unit=4 * hidden * hd + 3 * hd,  # q, k, v, o weights and q/k/v biases
        heads_per_unit=1,
        head_dim=hd,
        value_index=0,
        value_rows=lambda u: channel_range(u, hd, 2 * width),
    )


def mlp(block: nn.Module) -> DepthTwo:
    m = block.mlp
    return channel_mlp([m.c_fc], m.c_proj, 2 * m.c_fc.weight.shape[0] + 1)


def prune_attention(block: nn.Module, keep: torch.Tensor, unit: str = "kv_group") -> None:
    cut(attention(block), keep)
    block.attn.split_size = len(keep) * block.attn.head_dim
    block.attn.num_heads = len(keep)


def prune_mlp(block: nn.Module, keep: torch.Tensor) -> None:
    cut(mlp(block), keep)


def shape(block: nn.Module) -> dict[str, int]:
    n = block.attn.split_size // block.attn.head_dim
    return {"heads": n, "kv_heads": n, "channels": block.mlp.c_fc.weight.shape[1]}


def reshape(block: nn.Module, heads: int, kv_heads: int, channels: int) -> None:
    prune_attention(block, torch.arange(heads))
    prune_mlp(block, torch.arange(channels))


def attention_module(block: nn.Module) -> nn.Module:
    return block.attn


def mlp_module(block: nn.Module) -> nn.Module:
    return block.mlp


def level2_outputs(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    return block.attn.c_proj, block.mlp.c_proj
