"""Phi-3 adapter: fused qkv_proj (rows q | k | v, grouped-query attention) and fused
gate_up_proj (rows gate | up), no biases.

Phi-3 reads the query width from `config.num_attention_heads`, a value every block shares,
so a pruned block gets its own view of the config with its own head count (`LayerConfig`).
"""

from __future__ import annotations

import torch
from torch import nn

from harness.models.base import (
    DepthTwo,
    channel_range,
    check_attention_unit,
    slice_inputs,
    slice_outputs,
)
from harness.models.modeling_pruned import LayerConfig

MODEL_TYPES = ("phi3",)


def layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _heads(attn: nn.Module) -> tuple[int, int, int]:
    hd = attn.head_dim
    return hd, attn.o_proj.in_features // hd, attn.num_key_value_heads


def attention(block: nn.Module, unit: str = "kv_group") -> DepthTwo:
    check_attention_unit(unit)
    attn = block.self_attn
    hd, n_q, n_kv = _heads(attn)
    rep = n_q // n_kv
    k_at, v_at = n_q * hd, (n_q + n_kv) * hd
    hidden = attn.qkv_proj.in_features
    if unit == "query_head" and rep > 1:  # with one query per KV head both units are a head
        return DepthTwo(
            kind="attention", level1=[attn.qkv_proj], level2=attn.o_proj, n_units=n_q,
            level1_channels=lambda u: [channel_range(u, hd)],
            level2_channels=lambda u: channel_range(u, hd),
            params_per_unit=2 * hidden * hd, head_dim=hd, value_index=0,
            value_rows=lambda u: channel_range(torch.as_tensor(u) // rep, hd, v_at),
            groups=n_kv,
        )
    return DepthTwo(
        kind="attention",
        level1=[attn.qkv_proj],
        level2=attn.o_proj,
        n_units=n_kv,
        level1_channels=lambda u: [torch.cat([channel_range(u, rep * hd), channel_range(u, hd, k_at),
                                              channel_range(u, hd, v_at)])],
        level2_channels=lambda u: channel_range(u, rep * hd),
        params_per_unit=hidden * hd * (2 * rep + 2),
        heads_per_unit=rep,
        head_dim=hd,
        value_index=0,
        value_rows=lambda u: channel_range(u, hd, v_at).view(-1, 1, hd).expand(-1, rep, hd).reshape(-1),
    )


def mlp(block: nn.Module) -> DepthTwo:
    m = block.mlp
    n = m.down_proj.in_features
    return DepthTwo(
        kind="mlp",
        level1=[m.gate_up_proj],
        level2=m.down_proj,
        n_units=n,
        level1_channels=lambda u: [torch.cat([torch.as_tensor(u), n + torch.as_tensor(u)])],
        level2_channels=lambda u: torch.as_tensor(u),
        params_per_unit=3 * m.gate_up_proj.in_features,
        level1_parts=((0, 0), (0, n)),
    )


def _set_head_counts(attn: nn.Module, n_q: int, n_kv: int) -> None:
    attn.num_key_value_heads = n_kv
    attn.num_key_value_groups = n_q // n_kv
    base = attn.config.__dict__["_base"] if isinstance(attn.config, LayerConfig) else attn.config
    attn.config = LayerConfig(base, num_attention_heads=n_q, num_key_value_heads=n_kv)


def _keep_rows(attn: nn.Module, q_heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
    hd, n_q, n_kv = _heads(attn)
    rows = torch.cat([channel_range(q_heads, hd), channel_range(kv_heads, hd, n_q * hd),
                      channel_range(kv_heads, hd, (n_q + n_kv) * hd)])
    slice_outputs(attn.qkv_proj, rows)
    slice_inputs(attn.o_proj, channel_range(q_heads, hd))
    _set_head_counts(attn, len(q_heads), len(kv_heads))


def prune_attention(block: nn.Module, keep: torch.Tensor, unit: str = "kv_group") -> None:
    attn = block.self_attn
    _, n_q, n_kv = _heads(attn)
    keep = torch.as_tensor(keep, dtype=torch.long)
    if unit == "query_head" and n_q > n_kv:
        _keep_rows(attn, keep, torch.arange(n_kv))
    else:
        rep = n_q // n_kv
        _keep_rows(attn, (keep[:, None] * rep + torch.arange(rep)).reshape(-1), keep)


def prune_mlp(block: nn.Module, keep: torch.Tensor) -> None:
    m = block.mlp
    n = m.down_proj.in_features
    keep = torch.as_tensor(keep, dtype=torch.long)
    slice_outputs(m.gate_up_proj, torch.cat([keep, n + keep]))
    slice_inputs(m.down_proj, keep)


def shape(block: nn.Module) -> dict[str, int]:
    _, n_q, n_kv = _heads(block.self_attn)
    return {"heads": n_q, "kv_heads": n_kv, "channels": block.mlp.down_proj.in_features}


def reshape(block: nn.Module, heads: int, kv_heads: int, channels: int) -> None:
    _keep_rows(block.self_attn, torch.arange(heads), torch.arange(kv_heads))
    prune_mlp(block, torch.arange(channels))


def attention_module(block: nn.Module) -> nn.Module:
    return block.self_attn


def mlp_module(block: nn.Module) -> nn.Module:
    return block.mlp


def level2_outputs(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    return block.self_attn.o_proj, block.mlp.down_proj
