"""The common form every architecture adapter exposes: two depth-2 modules per block.

A depth-2 module (METHOD.md section 1) is a set of parallel level-1 linear maps that read the
module input (q/k/v, or up/gate) and one level-2 map (o_proj, down_proj) that writes back to
the residual stream. A *unit* is what pruning removes as a whole: a head (or a KV group) in
attention, an inner channel in the MLP. All weights are seen as [out, in] ("Linear layout");
GPT-2's Conv1D stores [in, out] and is transposed on the way in and out.

The adapter contract. An architecture adapter is a module of `harness/models/` with
    MODEL_TYPES                         the HF `config.model_type`s it serves
    layers(model)                       the ModuleList of decoder blocks, in forward order
    attention(block, unit) -> DepthTwo  unit: ATTENTION_UNITS ("kv_group" or "query_head")
    mlp(block) -> DepthTwo
    prune_attention(block, keep, unit)  physically keep only units `keep` (sorted ids)
    prune_mlp(block, keep)
    shape(block) -> {heads, kv_heads, channels}
    reshape(block, heads, kv_heads, channels)   give a fresh block a pruned block's shapes
    attention_module(block)             returns (output, attention probabilities) in eager mode
    mlp_module(block)                   the module computing the MLP (returns its output), or None
    level2_outputs(block)               (attention output map, MLP output map)
The attention module's output (first element) and the MLP module's output must be exactly the
level-2 map applied to its input: the pipeline replays them from that input (stream.Replay).
and is listed in `harness.models.ADAPTERS`. How a block is *called* is not part of the
contract: the pipeline records each block's own arguments from the model's forward
(harness/blocks/stream.py). A model type is supported only when `tests/test_adapters.py` passes for
it: block-by-block propagation equals the model's forward, keep-all pruning is the identity,
removing a unit equals masking it, save -> reload is exact, and cached generation equals
the full forward on the pruned model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def weight(module: nn.Module) -> torch.Tensor:
    """The weight in [out, in] layout (a view, not a copy)."""
    return module.weight.T if is_conv1d(module) else module.weight


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Replace the weight values, given in [out, in] layout (same shape as before)."""
    with torch.no_grad():
        weight(module).copy_(w.to(module.weight.dtype))


def in_features(module: nn.Module) -> int:
    return weight(module).shape[1]


def out_features(module: nn.Module) -> int:
    return weight(module).shape[0]


def slice_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only output channels `keep` (physically: a smaller weight and bias)."""
    with torch.no_grad():
        w = weight(module)[keep].contiguous()
        module.weight = nn.Parameter(w.T.contiguous() if is_conv1d(module) else w)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias[keep].contiguous())
    _set_features(module)


def slice_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only input channels `keep`; the bias (on outputs) is untouched."""
    with torch.no_grad():
        w = weight(module)[:, keep].contiguous()
        module.weight = nn.Parameter(w.T.contiguous() if is_conv1d(module) else w)
    _set_features(module)


def _set_features(module: nn.Module) -> None:
    if is_conv1d(module):
        module.nf = module.weight.shape[1]
        if hasattr(module, "nx"):
            module.nx = module.weight.shape[0]
    else:
        module.out_features, module.in_features = module.weight.shape


def ensure_bias(module: nn.Module) -> torch.Tensor:
    """The module's output bias, created as zeros where the architecture has none."""
    if module.bias is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(out_features(module), dtype=w.dtype, device=w.device))
    return module.bias


ATTENTION_UNITS = ("kv_group", "query_head")


def check_attention_unit(unit: str) -> None:
    if unit not in ATTENTION_UNITS:
        raise ValueError(f"unknown prune.attention_unit {unit!r}; accepted: {', '.join(ATTENTION_UNITS)}")


@dataclass
class DepthTwo:
    """One depth-2 module of one block, in the common form."""

    kind: str  # "attention" or "mlp"
    level1: list[nn.Module]
    level2: nn.Module
    n_units: int
    # For a set of units: the level-1 output channels of each level-1 module, and the
    # level-2 input channels, that belong to them. An empty list for a module: its rows are
    # shared by every unit and stay whole (K/V when query heads are the units).
    level1_channels: Callable[[torch.Tensor], list[torch.Tensor]]
    level2_channels: Callable[[torch.Tensor], torch.Tensor]
    params_per_unit: int
    # Attention only: query heads per unit (1 for MHA, the group size for GQA groups), and
    # for each level-2 input channel of the given units the value row (in level1[value_index])
    # that feeds it; used by the data-free head score, where Sigma = I.
    heads_per_unit: int = 1
    head_dim: int = 0
    value_index: int = 0
    value_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Units form `groups` contiguous equal groups and pruning removes the same number from
    # each (query heads of a GQA model: one group per KV head, so every KV head keeps the
    # same number of queries and the model stays a standard GQA model).
    groups: int = 1
    # MLP only: the level-1 factors of a unit, (index into level1, first row): unit u reads
    # row offset + u of that module. Gated MLPs have two (gate, up); a fused gate_up_proj
    # has both in one module.
    level1_parts: tuple[tuple[int, int], ...] = ((0, 0),)

    def all_units(self) -> torch.Tensor:
        return torch.arange(self.n_units)

    @property
    def per_group(self) -> int:
        return self.n_units // self.groups

    def level1_part(self, values: torch.Tensor, part: int) -> torch.Tensor:
        """The entries of a per-row vector of a level-1 module that belong to factor `part`."""
        _, offset = self.level1_parts[part]
        return values[offset : offset + self.n_units]

    @property
    def module_input(self) -> nn.Module:
        """A level-1 module whose input is the depth-2 module's input (for hooks)."""
        return self.level1[0]


def channel_range(units: torch.Tensor, width: int, offset: int = 0) -> torch.Tensor:
    """Channels [offset + u*width, offset + (u+1)*width) for every unit u, in order."""
    units = torch.as_tensor(units, dtype=torch.long)
    return (offset + units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def channel_mlp(level1: list[nn.Module], level2: nn.Module, params_per_unit: int) -> DepthTwo:
    """An MLP whose unit u is row u of every level-1 map and column u of the level-2 map."""
    return DepthTwo(
        kind="mlp",
        level1=level1,
        level2=level2,
        n_units=in_features(level2),
        level1_channels=lambda u: [torch.as_tensor(u)] * len(level1),
        level2_channels=lambda u: torch.as_tensor(u),
        params_per_unit=params_per_unit,
        level1_parts=tuple((i, 0) for i in range(len(level1))),
    )


def cut(view: DepthTwo, keep: torch.Tensor) -> None:
    """Physically keep only units `keep` of a depth-2 module: their level-1 rows (modules with
    no rows of their own stay whole) and their level-2 columns."""
    own_rows = [len(rows) > 0 for rows in view.level1_channels(view.all_units())]  # else shared by every unit
    for module, rows, own in zip(view.level1, view.level1_channels(keep), own_rows, strict=True):
        if own:
            slice_outputs(module, rows)
    slice_inputs(view.level2, view.level2_channels(keep))
