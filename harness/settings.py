"""What one pruning run is asked to do, for every track: `PruneSettings` (checked once on
construction; the run schema, harness/config.py, builds it from a composed config, so its
defaults are the schema's), the masking `Pattern`, and the counts every track shares.

The names a plugin registers (remedies, metrics) are checked where the plugins are known:
the run schema and the structured pipeline; this module imports no track and no plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.checks import ConfigError, integer, one_of
from harness.models.base import ATTENTION_UNITS

MODULES = ("attention", "mlp")
SPARSITY_TYPES = ("structured", "unstructured", "nm", "depth")
DEPTH_REMEDIES = ("none", "replaceme")  # the depth track's remedies (harness/depth/replaceme.py)
SPARSITY_MODES = ("model", "module")  # of the whole model's parameters, or a per-module ratio (LLM-Pruner)
ALLOCATIONS = ("uniform", "adaptive")  # prune/allocation.py POLICIES


@dataclass(frozen=True)
class Pattern:
    """What one layer loses: a fraction of every row, or n of every m columns."""

    sparsity: float
    n: int = 0  # n:m when n > 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.n > 0

    def removed_per_row(self, columns: int) -> int:
        return columns // self.m * self.n if self.is_nm else int(columns * self.sparsity)

    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"


def parse_nm(value: str, key: str = "nm") -> tuple[int, int]:
    """'2:4' -> (2, 4): n zeros in each group of m (0 < n < m)."""
    n, sep, m = str(value).partition(":")
    try:
        n_, m_ = int(n), int(m)
    except ValueError:
        n_ = m_ = 0
    if not sep or not 0 < n_ < m_:
        raise ValueError(f"{key}={value!r} is not accepted; accepted: N:M with 0 < N < M, e.g. 2:4 or 4:8")
    return n_, m_


@dataclass(frozen=True)
class PruneSettings:
    sparsity: float = 0.2  # fraction removed, of the whole model (`sparsity_mode=model`) or per module
    sparsity_mode: str = "model"  # SPARSITY_MODES
    allocation: str = "uniform"  # ALLOCATIONS (prune/allocation.py)
    remedy: str = "none"  # harness.remedy.names(), checked by the run schema and the structured pipeline
    layers: tuple[int, int] | None = None  # [start, end) of prunable blocks; None = all
    modules: tuple[str, ...] = MODULES
    damp: float = 1e-2  # recovery: lambda = damp * mean diag X^T X
    ridge_toward: str = "zero"  # recovery's ridge prior: zero (METHOD.md) or the current weights
    chunk_size: int = 8  # calibration sequences per forward
    seed: int = 0
    flap_faithful: bool = False  # FLAP's per-sample reference statistics
    attention_unit: str = "kv_group"  # models.base.ATTENTION_UNITS
    sparsity_type: str = "structured"  # structured (units removed), unstructured or nm (weights masked in place)
    nm: str = "2:4"  # sparsity_type=nm: N zeros in every group of M input columns
    blocks: int | None = None  # sparsity_type=depth: remove this many blocks (None: as many as `sparsity` asks)

    def __post_init__(self):
        sparsity = self.sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 <= sparsity < 1:
            raise ConfigError(f"sparsity={sparsity!r} is outside [0, 1); accepted: a number with 0 <= sparsity < 1")
        one_of("sparsity_mode", self.sparsity_mode, SPARSITY_MODES)
        one_of("allocation", self.allocation, ALLOCATIONS)
        one_of("prune.attention_unit", self.attention_unit, ATTENTION_UNITS)
        mods = self.modules
        if not mods or any(m not in MODULES for m in mods) or len(set(mods)) != len(mods):
            raise ConfigError(f"prune.modules={list(mods)!r}; accepted: a non-empty subset of "
                                f"[{', '.join(MODULES)}], each at most once")
        if self.layers is not None and (len(self.layers) != 2 or not 0 <= self.layers[0] < self.layers[1]):
            raise ConfigError(f"model.layers={list(self.layers)!r}; accepted: [start, end) with "
                                "0 <= start < end, or null for all blocks")
        integer("prune.chunk_size", self.chunk_size, 1)
        integer("seed", self.seed, 0)
        integer("prune.blocks", self.blocks, 0, none="as many blocks as `sparsity` asks")
        self._check_sparsity_type()

    def _check_sparsity_type(self) -> None:
        one_of("sparsity_type", self.sparsity_type, SPARSITY_TYPES)
        if self.blocks is not None and self.sparsity_type != "depth":
            raise ConfigError(f"prune.blocks={self.blocks} counts whole blocks; with sparsity_type={self.sparsity_type} "
                              "accepted: null (or sparsity_type=depth)")
        if self.sparsity_type == "structured":
            return
        if self.sparsity_type == "depth" and self.remedy not in DEPTH_REMEDIES:
            raise ConfigError(f"remedy={self.remedy!r} acts on removed units; with sparsity_type=depth accepted: "
                              f"{', '.join(DEPTH_REMEDIES)}")
        # Masking keeps every shape: the structured track's remedies and allocations do not apply.
        if self.remedy != "none" and self.sparsity_type != "depth":
            raise ConfigError(f"remedy={self.remedy!r} acts on removed units; with sparsity_type="
                                f"{self.sparsity_type} accepted: none")
        if self.allocation != "uniform":
            raise ConfigError(f"allocation={self.allocation!r} is structured-only; with sparsity_type="
                                f"{self.sparsity_type} accepted: uniform (every layer loses the same fraction)")
        if self.sparsity_type == "nm":
            try:
                n, m = parse_nm(self.nm)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            if abs(self.sparsity - n / m) > 1e-9:
                raise ConfigError(f"sparsity={self.sparsity!r} does not match nm={self.nm} (which removes "
                                    f"{n / m:g}); accepted: sparsity={n / m:g}")

    @property
    def pattern(self) -> Pattern:
        """What each masked layer loses (the unstructured / N:M track)."""
        if self.sparsity_type == "nm":
            n, m = parse_nm(self.nm)
            return Pattern(n / m, n, m)
        return Pattern(self.sparsity)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prunable_layers(n_layers: int, layers: tuple[int, int] | None) -> range:
    if layers is None:
        return range(n_layers)
    start, end = layers
    if not (0 <= start < end <= n_layers):
        raise ConfigError(f"model.layers={[start, end]} is outside the model's {n_layers} blocks; "
                            f"accepted: [start, end) with 0 <= start < end <= {n_layers}")
    return range(start, end)
