"""OPT adapter (the SparseGPT/Wanda/SliceGPT standard): separate q/k/v/out_proj with biases,
ReLU MLP fc1/fc2 with biases, learned positions. Multi-head attention: a KV group is one
head, so both attention units mean a head."""

from __future__ import annotations

import torch
from torch import nn

from harness.models.base import DepthTwo, channel_mlp, channel_range, check_attention_unit, cut

MODEL_TYPES = ("opt",)


def layers(model: nn.Module) -> nn.ModuleList:
    return model.model.decoder.layers


def attention(block: nn.Module, unit: str = "kv_group") -> DepthTwo:
    check_attention_unit(unit)
    attn = block.self_attn
    head_dim = attn.head_dim
    hidden = attn.q_proj.in_features
    bias = 3 * head_dim if attn.q_proj.bias is not None else 0
    return DepthTwo(
        kind="attention",
        level1=[attn.q_proj, attn.k_proj, attn.v_proj],
        level2=attn.out_proj,
        n_units=attn.q_proj.out_features // head_dim,
        level1_channels=lambda u: [channel_range(u, head_dim)] * 3,
        level2_channels=lambda u: channel_range(u, head_dim),
        params_per_unit=4 * hidden * head_dim + bias,
        head_dim=head_dim,
        value_index=2,
        value_rows=lambda u: channel_range(u, head_dim),
    )


def mlp(block: nn.Module) -> DepthTwo:
    return channel_mlp([block.fc1], block.fc2, 2 * block.fc1.in_features + (block.fc1.bias is not None))


def prune_attention(block: nn.Module, keep: torch.Tensor, unit: str = "kv_group") -> None:
    cut(attention(block, unit), keep)
    block.self_attn.num_heads = len(keep)  # OPT reshapes with num_heads, not -1


def prune_mlp(block: nn.Module, keep: torch.Tensor) -> None:
    cut(mlp(block), keep)


def shape(block: nn.Module) -> dict[str, int]:
    n = block.self_attn.q_proj.out_features // block.self_attn.head_dim
    return {"heads": n, "kv_heads": n, "channels": block.fc1.out_features}


def reshape(block: nn.Module, heads: int, kv_heads: int, channels: int) -> None:
    prune_attention(block, torch.arange(heads))
    prune_mlp(block, torch.arange(channels))


def attention_module(block: nn.Module) -> nn.Module:
    return block.self_attn


def mlp_module(block: nn.Module) -> None:
    return None  # fc1/fc2 sit in the decoder layer itself: no module to replay


def level2_outputs(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    return block.self_attn.out_proj, block.fc2
