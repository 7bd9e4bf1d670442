"""LLaMA-family adapter: LLaMA, Vicuna, Mistral, Qwen2/Qwen3, Gemma-3, SmolLM2 (separate
q/k/v/o, optional q/k/v biases and q/k norms, gated MLP).

Attention units with grouped-query attention:
- `kv_group` (default): one KV head and the query heads that share it. Every remaining query
  head keeps its own K/V and K/V parameters go too. With n_kv_heads == n_heads: one head.
- `query_head`: one query head (its q rows and o_proj columns); every KV head stays and loses
  the same number of queries, so the block remains a standard GQA block with a smaller ratio.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.models.base import (
    DepthTwo,
    channel_mlp,
    channel_range,
    check_attention_unit,
    cut,
    slice_inputs,
    slice_outputs,
)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def attention(block: nn.Module, unit: str = "kv_group") -> DepthTwo:
    check_attention_unit(unit)
    attn = block.self_attn
    hd = attn.head_dim
    n_q = attn.q_proj.out_features // hd
    n_kv = attn.k_proj.out_features // hd
    rep = n_q // n_kv
    hidden = attn.q_proj.in_features
    level1 = [attn.q_proj, attn.k_proj, attn.v_proj]
    if unit == "query_head" and rep > 1:  # with one query per KV head both units are a head
        none = torch.zeros(0, dtype=torch.long)
        return DepthTwo(
            kind="attention", level1=level1, level2=attn.o_proj, n_units=n_q,
            level1_channels=lambda u: [channel_range(u, hd), none, none],
            level2_channels=lambda u: channel_range(u, hd),
            params_per_unit=2 * hidden * hd + (hd if attn.q_proj.bias is not None else 0),
            head_dim=hd, value_index=2,
            value_rows=lambda u: channel_range(torch.as_tensor(u) // rep, hd),
            groups=n_kv,
        )
    bias_rows = sum(w for m, w in ((attn.q_proj, rep * hd), (attn.k_proj, hd), (attn.v_proj, hd)) if m.bias is not None)
    return DepthTwo(
        kind="attention",
        level1=level1,
        level2=attn.o_proj,
        n_units=n_kv,
        level1_channels=lambda u: [channel_range(u, rep * hd), channel_range(u, hd), channel_range(u, hd)],
        level2_channels=lambda u: channel_range(u, rep * hd),
        params_per_unit=hidden * hd * (2 * rep + 2) + bias_rows,
        heads_per_unit=rep,
        head_dim=hd,
        value_index=2,
        value_rows=lambda u: channel_range(u, hd).view(-1, 1, hd).expand(-1, rep, hd).reshape(-1),
    )


def mlp(block: nn.Module) -> DepthTwo:
    m = block.mlp
    return channel_mlp([m.gate_proj, m.up_proj], m.down_proj, 3 * m.up_proj.in_features)


def prune_attention(block: nn.Module, keep: torch.Tensor, unit: str = "kv_group") -> None:
    cut(attention(block, unit), keep)
    _set_head_counts(block.self_attn)


def _set_head_counts(attn: nn.Module) -> None:
    # Head counts are implied by the projection widths (view(..., -1, head_dim)) except the
    # query-per-KV ratio, which repeat_kv reads from the module.
    attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features


def prune_mlp(block: nn.Module, keep: torch.Tensor) -> None:
    cut(mlp(block), keep)


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
    _set_head_counts(a)
    prune_mlp(block, torch.arange(channels))


def attention_module(block: nn.Module) -> nn.Module:
    return block.self_attn


def mlp_module(block: nn.Module) -> nn.Module:
    return block.mlp


def level2_outputs(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    return block.self_attn.o_proj, block.mlp.down_proj
