"""A table cell over repeated calibration seeds, and which cells are significantly worse than
the best (METHOD.md section 12).

A cell holds its runs (seed, value, the run's own 95% evaluation interval, and the raw data a
paired test reads: per-window NLL sums or per-question correctness). It reads as mean +- sd (n)
over seeds, or, for a single run, the value with its evaluation interval. A column's "best"
mark goes to the best cell and to every cell whose paired 95% interval against it contains 0 (ratio 1):
paired by seed where the two cells share at least two seeds (and their differences vary),
else on one run each of the same windows or questions; where neither is possible the cell
is untested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from harness import uncertainty

RAW = "_raw."  # frame columns holding what paired tests read (never written to runs.csv)


@dataclass(frozen=True)
class Run:
    seed: int
    run_id: str
    value: float
    low: float | None  # the run's own evaluation interval (None in records from before intervals)
    high: float | None
    raw: tuple | None  # frame._raw_*: what a paired test on windows / questions reads


@dataclass(frozen=True)
class Cell:
    runs: tuple[Run, ...]
    kind: str  # ppl | acc | avg: how two cells are compared

    def __deepcopy__(self, memo):  # immutable: pandas deep-copies attrs on every operation
        return self

    @cached_property
    def by_seed(self) -> dict[int, float]:
        seeds: dict[int, list[float]] = {}
        for run in self.runs:
            seeds.setdefault(run.seed, []).append(run.value)
        return {s: float(np.mean(v)) for s, v in seeds.items()}

    @cached_property
    def summary(self) -> dict:
        return uncertainty.seed_summary(list(self.by_seed.values()))

    @property
    def mean(self) -> float:
        return self.summary["mean"]

    @property
    def std(self) -> float:
        return self.summary["std"]

    @property
    def n(self) -> int:
        return self.summary["n"]

    @property
    def interval(self) -> tuple[float, float] | None:
        """The t interval over seeds, or one run's evaluation interval."""
        if self.n > 1:
            return self.summary["low"], self.summary["high"]
        run = self.runs[0]
        return None if run.low is None or len(self.runs) > 1 else (run.low, run.high)

    @property
    def eval_halfwidth(self) -> float:
        """Mean half-width of the runs' own evaluation intervals (the evaluation sampling error)."""
        widths = [(r.high - r.low) / 2 for r in self.runs if r.low is not None and r.high is not None]
        return float(np.mean(widths)) if widths else math.nan

    def text(self, digits: int = 2, latex: bool = False) -> str:
        """`252.21 ± 4.10 (5)` over seeds, `278.56 [270.12, 287.30]` for one run, else the value."""
        f = f".{digits}f"
        if self.n > 1:
            return (f"${self.mean:{f}} \\pm {self.std:{f}}$ ({self.n})" if latex
                    else f"{self.mean:{f}} ± {self.std:{f}} ({self.n})")
        if self.interval is not None:
            low, high = self.interval
            return (f"{self.mean:{f}} {{\\scriptsize [{low:{f}}, {high:{f}}]}}" if latex
                    else f"{self.mean:{f}} [{low:{f}}, {high:{f}}]")
        return f"{self.mean:{f}}"


def kind_of(column: str) -> str:
    return "ppl" if column.startswith("ppl.") else "avg" if column == "zs.avg" else "acc"


def cell_frame(df: pd.DataFrame, index: list[str], columns: list[str], values: str | list[str],
               scale: float = 1.0) -> pd.DataFrame:
    """pivot_table's layout (rows `index`, columns `columns`, with `values` as the outer column
    level when a list), but each entry a Cell of the runs in it; empty rows and columns dropped.
    `scale` multiplies values and intervals (accuracies in percent)."""
    names = [values] if isinstance(values, str) else list(values)
    entries: dict[tuple, dict[tuple, Cell]] = {}
    for key, g in df.groupby(index + columns, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row, col = key[:len(index)], key[len(index):]
        for name in names:
            runs = tuple(_run(r, name, scale) for r in g.to_dict("records")
                         if name in r and r[name] is not None and not pd.isna(r[name]))
            if runs:
                entries.setdefault(row, {})[(name, *col) if not isinstance(values, str) else col] = Cell(runs, kind_of(name))
    frame = pd.DataFrame.from_dict(entries, orient="index")
    if frame.empty:
        return frame
    frame.index = _index(frame.index, index)
    column_names = ([None] if not isinstance(values, str) else []) + columns
    frame.columns = _index(frame.columns, column_names)
    return frame.sort_index().sort_index(axis=1)


def _index(keys: pd.Index, names: list[str | None]) -> pd.Index:
    tuples = [k if isinstance(k, tuple) else (k,) for k in keys]
    if len(names) == 1:
        return pd.Index([t[0] for t in tuples], name=names[0])
    return pd.MultiIndex.from_tuples(tuples, names=names)


def _run(row: dict, name: str, scale: float) -> Run:
    low, high = row.get(f"{name}.low"), row.get(f"{name}.high")
    known = low is not None and high is not None and not (pd.isna(low) or pd.isna(high))
    return Run(int(row.get("seed", 0)), row.get("run_id", ""), float(row[name]) * scale,
               float(low) * scale if known else None, float(high) * scale if known else None,
               row.get(RAW + name) if isinstance(row.get(RAW + name), tuple) else None)


def means(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells' means as a float table, the cells kept in attrs["cells"] (write_table reads them)."""
    t = cells.map(lambda c: c.mean if isinstance(c, Cell) else math.nan).astype(float)
    t.attrs["cells"] = cells
    return t


def worse(best: Cell, other: Cell, lower_better: bool) -> bool | None:
    """Whether `other` is significantly worse than `best` (paired, 95%); None where the data
    cannot tell (one run each without per-window / per-question data, different windows, or
    too few windows for an interval)."""
    common = sorted(set(best.by_seed) & set(other.by_seed))
    if len(common) >= 2:
        f = math.log if best.kind == "ppl" else float  # perplexities compare as ratios
        r = uncertainty.paired_seeds([f(other.by_seed[s]) for s in common], [f(best.by_seed[s]) for s in common])
        if r["std"] > 0:  # a constant difference (two seed-invariant methods) says nothing about noise
            direction = r["mean"] > 0 if lower_better else r["mean"] < 0
            if not (r["significant"] and direction):
                return False
            # The seeds share the windows / questions, so their spread leaves out the evaluation's
            # own sampling error: the seed-averaged difference must also clear it.
            verdict = _on_windows(pooled(best, common), pooled(other, common), best.kind, lower_better)
            return True if verdict is None else verdict  # older records: the seeds' evidence only
    pair = _single_runs(best, other, common)
    return None if pair is None else _on_windows(pair[0], pair[1], best.kind, lower_better)


def _on_windows(raw_best, raw_other, kind: str, lower_better: bool) -> bool | None:
    """Whether `other` is worse on the same windows / questions; None where it cannot be told."""
    if not raw_best or not raw_other:
        return None
    try:
        low, high = paired_interval(raw_other, raw_best, kind)
    except ValueError:  # not the same windows / questions
        return None
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return low > 0 if lower_better else high < 0


def pooled(cell: Cell, seeds: list[int]) -> tuple | None:
    """The cell's raw data averaged over `seeds` (same windows / questions, one run per seed):
    mean per-window NLL, or each question's correctness as a fraction of seeds."""
    raws = [_raw_of(cell, s) for s in seeds]
    return pool(raws, cell.kind) if raws and all(raws) else None


def pool(raws: list[tuple], kind: str) -> tuple | None:
    """Several runs' raw data on the same windows / questions, averaged (arrays, not encoded)."""
    if kind == "ppl":
        if len({(r[1], r[2], len(r[0])) for r in raws}) > 1:
            return None  # not the same windows
        return np.mean([_floats(r[0]) for r in raws], axis=0), raws[0][1], raws[0][2]
    if kind == "acc":
        if len({(r[1], r[2]) for r in raws}) > 1:
            return None
        return np.mean([_correct(r) for r in raws], axis=0), raws[0][1], raws[0][2]
    tasks = [dict(r) for r in raws]
    if any(set(t) != set(tasks[0]) for t in tasks):
        return None
    parts = tuple((name, pool([t[name] for t in tasks], "acc")) for name in sorted(tasks[0]))
    return parts if all(part for _, part in parts) else None


def _single_runs(best: Cell, other: Cell, common: list[int]) -> tuple | None:
    """The raw data of one run of each cell to test on windows / questions: the only runs, or
    the runs of the first shared seed (when the per-seed test cannot decide)."""
    if len(best.runs) == 1 and len(other.runs) == 1:
        a, b = best.runs[0].raw, other.runs[0].raw
    elif common:
        a, b = _raw_of(best, common[0]), _raw_of(other, common[0])
    else:
        return None
    return (a, b) if a and b else None


def _raw_of(cell: Cell, seed: int) -> tuple | None:
    runs = [r for r in cell.runs if r.seed == seed]
    return runs[0].raw if len(runs) == 1 else None


def paired(raw_a: tuple, raw_b: tuple, kind: str) -> dict:
    """A against B on the same windows / questions (uncertainty's paired tests): ppl_A / ppl_B
    (`ratio`) for perplexity, acc_A - acc_B (`difference`) for a task or the task average; with
    `low`, `high` and `significant`. ValueError where the windows / questions differ."""
    if kind == "ppl":
        (nll_a, per_window_a, digest_a), (nll_b, per_window_b, digest_b) = raw_a, raw_b
        if per_window_a != per_window_b or (digest_a and digest_b and digest_a != digest_b):
            raise ValueError("different windows")
        return uncertainty.paired_ppl_ratio(_floats(nll_a), _floats(nll_b), per_window_a)
    if kind == "acc":
        if raw_a[2] != raw_b[2]:
            raise ValueError("different questions")
        return uncertainty.paired_accuracy(_correct(raw_a), _correct(raw_b))
    return _paired_average(raw_a, raw_b)


def paired_interval(raw_a: tuple, raw_b: tuple, kind: str) -> tuple[float, float]:
    """95% interval of A - B on the same windows / questions: log(ppl_A / ppl_B) for perplexity,
    the accuracy difference for a task, the difference of task averages for the average."""
    r = paired(raw_a, raw_b, kind)
    return (math.log(r["low"]), math.log(r["high"])) if kind == "ppl" else (r["low"], r["high"])


def _floats(nll) -> np.ndarray:
    """Per-window sums: stored (base64) or pooled over seeds (an array)."""
    return nll if isinstance(nll, np.ndarray) else uncertainty.decode_floats(nll)


def _correct(raw: tuple) -> np.ndarray:
    """Per-question correctness: stored bits, or (pooled over seeds) each question's fraction."""
    bits, n, _ = raw
    return bits if isinstance(bits, np.ndarray) else uncertainty.decode_bits(bits, n)


def _paired_average(raw_a: tuple, raw_b: tuple) -> dict:
    """Difference of task averages: per task the paired difference and its se, combined as
    sqrt(sum se_t^2) / T (tasks have independent questions); `raw` is ((task, data), ...)."""
    a, b = dict(raw_a), dict(raw_b)
    if set(a) != set(b):
        raise ValueError("different tasks")
    tasks = [paired(a[t], b[t], "acc") for t in sorted(a)]
    difference = float(np.mean([t["difference"] for t in tasks]))
    out = uncertainty.normal_interval(difference, uncertainty.average_stderr([t["se"] for t in tasks]))
    low, high = out["low"], out["high"]
    return {"difference": difference, **out,
            "significant": math.isfinite(low) and math.isfinite(high) and not low <= 0 <= high}


def best_marks(cells: pd.DataFrame, lower_better: dict, skip_rows: list) -> tuple[pd.DataFrame, int]:
    """Per column, True for the best cell and every cell not significantly worse than it (rows in
    `skip_rows`, the dense reference, never); and how many cells could not be tested."""
    marks = pd.DataFrame(False, index=cells.index, columns=cells.columns)
    untested = 0
    for c in cells.columns:
        ranked = [(idx, cell) for idx, cell in cells[c].items() if isinstance(cell, Cell) and idx not in skip_rows
                  and not math.isnan(cell.mean)]
        if not ranked or c not in lower_better:  # a descriptive column is never ranked
            continue
        lower = lower_better[c]
        best_idx, best = min(ranked, key=lambda x: x[1].mean if lower else -x[1].mean)
        marks.at[best_idx, c] = True
        for idx, cell in ranked:
            if idx == best_idx:
                continue
            verdict = worse(best, cell, lower)
            untested += verdict is None
            marks.at[idx, c] = verdict is False
    return marks, untested
