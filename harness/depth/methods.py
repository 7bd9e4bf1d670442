"""Which whole blocks a depth method removes (METHOD.md section 11), behind one registry.

A method reads a `DepthContext`: the blocks' influence (ShortGPT's BI_l, the mean over tokens of
1 - cos(x_l, x_{l+1}) on raw block inputs and outputs), the hidden state at each sequence's last
token entering every block and leaving the last (x_0 .. x_L, for the angular distance), and the
calibration NLL of the model with any set of blocks (SLEB) or sub-blocks (BlockPruner: one
block's attention or MLP) skipped. It returns the blocks, or sub-blocks, to remove, in the order
chosen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from harness.models.surgery import PARTS, Unit
from harness.registry import Registry


@dataclass
class DepthContext:
    n_blocks: int
    influence: list[float] = field(default_factory=list)  # BI_l per block
    last_token: list[torch.Tensor] = field(default_factory=list)  # x_0 .. x_L at each sequence's last token
    # mean calibration NLL per token with the blocks of the set, and the one block given, skipped
    nll: Callable[[set[int], int | None], float] | None = None
    # the same with the sub-blocks of the set, and the one given, skipped
    sub_block_nll: Callable[[list[Unit], Unit], float] | None = None
    unit_params: dict[Unit, int] = field(default_factory=dict)  # parameters each sub-block holds
    target_params: float = 0.0  # parameters to remove (sparsity x the model's)
    generator: torch.Generator | None = None
    scores: dict = field(default_factory=dict)  # what the method scored, for the record


HIDDEN_STATES = ("raw", "hf")


class DepthMethod:
    name: ClassVar[str] = ""  # set by @register
    hidden_states: str = "raw"  # raw block inputs/outputs, or HF's output_hidden_states (last entry normed)
    needs: ClassVar[frozenset[str]] = frozenset()  # influence, last_token, nll
    protected: ClassVar[str] = "none"  # which blocks are never removed, for the record and the checks
    family: ClassVar[str] = "inference-aware"  # the paper's Table 1 groups (collect.frame.FAMILIES)
    unit: ClassVar[str] = "block"  # what it removes: "block", or "sub-block" (a block's attention or MLP)

    def choose(self, n: int | None, ctx: DepthContext) -> list:
        """The n blocks to remove (for a sub-block method: n sub-blocks, or None: as many as come
        nearest `ctx.target_params`), in the order chosen."""
        raise NotImplementedError


log = logging.getLogger(__name__)

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
            log.info("sleb step %d/%d: block %d (calibration NLL %.4f)", len(removed), n, best, nll[best])
            steps.append({str(k): v for k, v in nll.items()})
        ctx.scores["nll_per_step"] = steps
        return removed


@register("blockpruner")
class BlockPruner(DepthMethod):
    """Greedy over sub-blocks: each step removes the attention or MLP whose removal gives the
    lowest calibration NLL given those already removed (attention first on ties, as the
    reference); it stops after n sub-blocks, or where one more would move the removed
    parameters farther from the target. At least one sub-block stays."""

    needs = frozenset({"nll"})
    unit = "sub-block"

    def choose(self, n, ctx):
        size, target = ctx.unit_params, ctx.target_params
        removed: list[Unit] = []
        total, steps = 0, []
        while len(removed) < len(size) - 1 and (n is None or len(removed) < n):
            candidates = [u for u in size if u not in removed]
            if n is None and _farther(total + min(size[u] for u in candidates), total, target):
                break  # even the smallest overshoots more than stopping here
            nll = {u: ctx.sub_block_nll(removed, u) for u in candidates}
            best = min(candidates, key=lambda u: (nll[u], PARTS.index(u[1]), u[0]))
            if n is None and _farther(total + size[best], total, target):
                break
            removed.append(best)
            total += size[best]
            progress = f"{100 * total / target:.1f}% of the target" if n is None else f"{len(removed)} of {n}"
            log.info("blockpruner step %d: %d.%s (calibration NLL %.4f); %s", len(removed), *best, nll[best], progress)
            steps.append({f"{k}.{part}": v for (k, part), v in nll.items()})
        ctx.scores["nll_per_step"] = steps
        return removed


def _farther(after: float, before: float, target: float) -> bool:
    return abs(after - target) >= abs(before - target)


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
