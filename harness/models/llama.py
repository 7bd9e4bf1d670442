"""LLaMA-family adapter: LLaMA, Vicuna, Mistral, Qwen2, SmolLM2 (separate q/k/v/o, gated MLP).

Attention unit with grouped-query attention: a whole KV group, i.e. one KV head and the
query heads that share it. That keeps every remaining query head paired with its own K/V
and removes K/V parameters too. With n_kv_heads == n_heads the unit is a single head.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.models.base import DepthTwo, channel_range, slice_inputs, slice_outputs

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def attention(block: nn.Module) -> DepthTwo:
    attn = block.self_attn
    hd = attn.head_dim
    n_q = attn.q_proj.out_features // hd
    n_kv = attn.k_proj.out_features // hd
    rep = n_q // n_kv
    hidden = attn.q_proj.in_features
    return DepthTwo(
        kind="attention",
        level1=[attn.q_proj, attn.k_proj, attn.v_proj],
        level2=attn.o_proj,
        n_units=n_kv,
        level1_channels=lambda u: [channel_range(u, rep * hd), channel_range(u, hd), channel_range(u, hd)],
        level2_channels=lambda u: channel_range(u, rep * hd),
        params_per_unit=hidden * hd * (2 * rep + 2),
        heads_per_unit=rep,
        head_dim=hd,
        value_index=2,
        value_rows=lambda u: channel_range(u, hd).view(-1, 1, hd).expand(-1, rep, hd).reshape(-1),
    )


def mlp(block: nn.Module) -> DepthTwo:
    m = block.mlp
    n = m.up_proj.out_features
    return DepthTwo(
        kind="mlp",
        level1=[m.gate_proj, m.up_proj],
        level2=m.down_proj,
        n_units=n,
        level1_channels=lambda u: [torch.as_tensor(u), torch.as_tensor(u)],
        level2_channels=lambda u: torch.as_tensor(u),
        params_per_unit=3 * m.up_proj.in_features,
    )


def prune_attention(block: nn.Module, keep: torch.Tensor) -> None:
    d2 = attention(block)
    for module, idx in zip(d2.level1, d2.level1_channels(keep), strict=True):
        slice_outputs(module, idx)
    slice_inputs(d2.level2, d2.level2_channels(keep))
    # Head counts are implied by the projection widths (view(..., -1, head_dim)); the
    # query-per-KV ratio is unchanged because whole groups go.


def prune_mlp(block: nn.Module, keep: torch.Tensor) -> None:
    d2 = mlp(block)
    for module in d2.level1:
        slice_outputs(module, keep)
    slice_inputs(d2.level2, keep)


def shape(block: nn.Module) -> dict[str, int]:
    a = block.self_attn
    return {"heads": a.q_proj.out_features // a.head_dim, "kv_heads": a.k_proj.out_features // a.head_dim,
            "channels": block.mlp.up_proj.out_features}


def reshape(block: nn.Module, heads: int, kv_heads: int, channels: int) -> None:
    """Give a freshly built block the shapes of a pruned one (for loading saved models)."""
    a = block.self_attn
    hd = a.head_dim
    slice_outputs(a.q_proj, torch.arange(heads * hd))
    slice_outputs(a.k_proj, torch.arange(kv_heads * hd))
    slice_outputs(a.v_proj, torch.arange(kv_heads * hd))
    slice_inputs(a.o_proj, torch.arange(heads * hd))
    prune_mlp(block, torch.arange(channels))


def attention_module(block: nn.Module) -> nn.Module:
    return block.self_attn


def level2_outputs(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    return block.self_attn.o_proj, block.mlp.down_proj
