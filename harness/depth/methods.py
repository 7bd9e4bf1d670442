"""Which whole blocks a depth method removes (METHOD.md section 11), behind one registry.

A method reads a `DepthContext`: the blocks' influence (ShortGPT's BI_l, the mean over tokens of
1 - cos(x_l, x_{l+1}) on raw block inputs and outputs), the hidden state at each sequence's last
token entering every block and leaving the last (x_0 .. x_L, for the angular distance), and the
calibration NLL of the model with any set of blocks skipped (SLEB). It returns the blocks to
remove, in the order chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from harness.registry import Registry


@dataclass
class DepthContext:
    n_blocks: int
    influence: list[float] = field(default_factory=list)  # BI_l per block
    last_token: list[torch.Tensor] = field(default_factory=list)  # x_0 .. x_L at each sequence's last token
    # mean calibration NLL per token with the blocks of the set, and the one block given, skipped
    nll: Callable[[set[int], int | None], float] | None = None
    generator: torch.Generator | None = None
    scores: dict = field(default_factory=dict)  # what the method scored, for the record


HIDDEN_STATES = ("raw", "hf")


class DepthMethod:
    name: ClassVar[str] = ""  # set by @register
    hidden_states: str = "raw"  # raw block inputs/outputs, or HF's output_hidden_states (last entry normed)
    needs: ClassVar[frozenset[str]] = frozenset()  # influence, last_token, nll
    protected: ClassVar[str] = "none"  # which blocks are never removed, for the record and the checks
    family: ClassVar[str] = "inference-aware"  # the paper's Table 1 groups (collect.frame.FAMILIES)

    def choose(self, n: int, ctx: DepthContext) -> list[int]:
        raise NotImplementedError


_REGISTRY: Registry[type[DepthMethod]] = Registry("depth method", __name__, "metric")
register, names, build = _REGISTRY.register, _REGISTRY.names, _REGISTRY.build


@register("shortgpt")
class ShortGPT(DepthMethod):
    """The n blocks of lowest influence, in one shot (no re-scoring, no protected block)."""

    needs = frozenset({"influence"})

    def __init__(self, hidden_states: str = "raw"):
        self.hidden_states = _convention(hidden_states)

    def choose(self, n, ctx):
        ctx.scores["influence"] = ctx.influence
        return sorted(range(ctx.n_blocks), key=lambda k: (ctx.influence[k], k))[:n]


def _convention(value: str) -> str:
    if value not in HIDDEN_STATES:
        raise ValueError(f"metric.params.hidden_states={value!r} is not accepted; accepted: raw (block inputs and "
                         "outputs), hf (transformers' output_hidden_states, whose last entry is after the final norm: "
                         "the references' convention)")
    return value


def angular_distances(last_token: list[torch.Tensor], n: int) -> list[float]:
    """d_n(s) = mean over sequences of arccos(cos(x_s, x_{s+n})) / pi, s = 0 .. L-n."""
    out = []
    for s in range(len(last_token) - n):
        cos = torch.nn.functional.cosine_similarity(last_token[s].double(), last_token[s + n].double(), dim=-1)
        out.append(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()))
    return out


@register("angular")
class Angular(DepthMethod):
    """Gromov et al.: the run [s, s+n) of least angular distance between its input and output at
    the last token, s >= 1 (block 0 is never removed)."""

    needs = frozenset({"last_token"})
    protected = "first"

    def __init__(self, hidden_states: str = "raw"):
        self.hidden_states = _convention(hidden_states)

    def choose(self, n, ctx):
        d = angular_distances(ctx.last_token, n)
        ctx.scores["angular_distance"] = d
        s = min(range(1, len(d)), key=lambda i: (d[i], i))
        return list(range(s, s + n))


@register("sleb")
class SLEB(DepthMethod):
    """Greedy: each step removes the block whose skipping gives the lowest calibration NLL given
    those already removed; the first and last blocks are protected (as the reference)."""

    needs = frozenset({"nll"})
    protected = "first and last"

    def choose(self, n, ctx):
        removed: list[int] = []
        steps = []
        for _ in range(n):
            candidates = [k for k in range(1, ctx.n_blocks - 1) if k not in removed]
            nll = {k: ctx.nll(set(removed), k) for k in candidates}
            best = min(candidates, key=lambda k: (nll[k], k))
            removed.append(best)
            steps.append({str(k): v for k, v in nll.items()})
        ctx.scores["nll_per_step"] = steps
        return removed


@register("random")
class RandomBlocks(DepthMethod):
    """n blocks drawn uniformly (the run's seed)."""

    family = "data-free"

    def choose(self, n, ctx):
        return sorted(torch.randperm(ctx.n_blocks, generator=ctx.generator)[:n].tolist())


@register("last")
class LastBlocks(DepthMethod):
    """The n blocks before the final one: [L-1-n, L-1)."""

    protected = "last"
    family = "data-free"

    def choose(self, n, ctx):
        return list(range(ctx.n_blocks - 1 - n, ctx.n_blocks - 1))
