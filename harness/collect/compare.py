"""Paired comparison of two methods (`harness collect --compare A B`).

A and B are sets of conditions on the runs frame (`metric=ours,remedy=none`). Runs of A and B
pair up where every other setting agrees (model, sparsity, seed, calibration, evaluation
windows, ...): same seed = same calibration draw, same windows and questions. Per pair:
ppl_A / ppl_B with the paired block-bootstrap interval over windows, and acc_A - acc_B (in
points) per task and for the task average with the paired interval over questions (McNemar's
exact p beside each task). Across the seeds of a setting: the mean per-seed log-ratio /
difference with its t interval (two or more seeds), significant only where the seed-averaged
difference also clears the evaluation's sampling error on the shared windows / questions.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness import uncertainty
from harness.collect.cells import RAW, kind_of, paired, pool
from harness.collect.frame import METHOD, OWNER, SETTINGS, ppl_columns, where

IDENTITY = ["model", *METHOD, *SETTINGS, "sparsity", "seed"]


def parse_side(spec: str) -> list[str]:
    """`metric=ours,remedy=none` -> ["metric=ours", "remedy=none"]."""
    conditions = [c.strip() for c in spec.split(",") if c.strip()]
    bad = [c for c in conditions if "=" not in c]
    if not conditions or bad:
        raise ValueError(f"bad --compare side {spec!r}: expected COLUMN=VALUE[,COLUMN=VALUE...]")
    return conditions


def pair_keys(df: pd.DataFrame, a: list[str], b: list[str]) -> list[str]:
    """The columns two paired runs must agree on: every identifying column the sides do not set
    (nor a parameter column owned by one they set, e.g. remedy_params for remedy)."""
    chosen = {c.partition("=")[0] for c in a + b}
    owned = {col for col, owner in OWNER.items() if owner in chosen}
    return [c for c in IDENTITY if c in df and c not in chosen | owned]


def values_of(df: pd.DataFrame) -> list[str]:
    tasks = [c for c in df.columns if c.startswith("zs.") and not c.endswith((".low", ".high", "average_metrics"))
             and c != "zs.avg"]
    return [*ppl_columns(df), *tasks, *(["zs.avg"] if "zs.avg" in df else [])]


def _paired(raw_a, raw_b, column: str) -> dict | None:
    """The paired estimate and interval of one value: perplexity as a ratio, accuracy in points."""
    if not isinstance(raw_a, tuple) or not isinstance(raw_b, tuple):
        return None
    try:
        r = paired(raw_a, raw_b, kind_of(column))
    except ValueError:  # not the same windows / questions
        return None
    if "ratio" in r:
        return {"estimate": r["ratio"], "low": r["low"], "high": r["high"], "significant": r["significant"]}
    out = {"estimate": 100 * r["difference"], "low": 100 * r["low"], "high": 100 * r["high"],
           "significant": r["significant"]}
    if "mcnemar_p" in r:
        out["mcnemar_p"] = r["mcnemar_p"]
    return out


def compare(df: pd.DataFrame, a: list[str], b: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs, across seeds): one row per matched pair of runs, one row per setting over its seeds.
    Columns per value: `<value>` (ppl ratio A/B, or accuracy difference A-B in points), `.low`,
    `.high`, `.significant` (the 95% interval excludes 0, or ratio 1) and for tasks `.mcnemar_p`."""
    side_a, side_b = where(df, a), where(df, b)
    if side_a.empty or side_b.empty:
        raise ValueError(f"no runs match {a if side_a.empty else b}")
    keys = pair_keys(df, a, b)
    pairs = side_a.merge(side_b, on=keys, suffixes=(" A", " B"))
    if pairs.empty:
        raise ValueError(f"no run of {a} has a partner in {b} with the same {', '.join(keys)}")
    values = [v for v in values_of(df) if f"{v} A" in pairs]
    rows = []
    for _, p in pairs.iterrows():
        row = {k: p[k] for k in keys}
        row["run A"], row["run B"] = p["run_id A"], p["run_id B"]
        for v in values:
            row[f"{v} A"], row[f"{v} B"] = p[f"{v} A"], p[f"{v} B"]
            row[f"{RAW}{v} A"], row[f"{RAW}{v} B"] = p.get(f"{RAW}{v} A"), p.get(f"{RAW}{v} B")
            r = _paired(p.get(f"{RAW}{v} A"), p.get(f"{RAW}{v} B"), v)
            for field, x in (r or {}).items():
                row[v if field == "estimate" else f"{v}.{field}"] = x
        rows.append(row)
    pair_frame = pd.DataFrame(rows).sort_values(keys, kind="stable", ignore_index=True)
    seeds = across_seeds(pair_frame, [k for k in keys if k != "seed"], values)
    return pair_frame[[c for c in pair_frame.columns if not c.startswith(RAW)]], seeds


def across_seeds(pairs: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """Per setting: the per-seed differences' mean and t interval (perplexity: of log(ppl_A/ppl_B),
    printed as a ratio; accuracy: of acc_A - acc_B in points). The seeds share the windows and
    questions, so their spread leaves out the evaluation's own sampling error: `.significant`
    also needs the seed-averaged difference's paired interval over windows / questions
    (`.eval_low`, `.eval_high`) to exclude no change."""
    rows = []
    for key, g in pairs.groupby(keys, dropna=False) if keys else [((), pairs)]:
        key = key if isinstance(key, tuple) else (key,)
        first = g.groupby("seed").head(1) if "seed" in g else g  # a repeated seed counts once
        row = {**dict(zip(keys, key, strict=True)), "seeds": len(first)}
        for v in values:
            a, b = first[f"{v} A"].to_numpy(dtype=float), first[f"{v} B"].to_numpy(dtype=float)
            ok = ~(np.isnan(a) | np.isnan(b))
            ppl = v.startswith("ppl.")
            r = uncertainty.paired_seeds(np.log(a[ok]), np.log(b[ok])) if ppl else \
                uncertainty.paired_seeds(100 * a[ok], 100 * b[ok])
            show = math.exp if ppl else float
            row[v], row[f"{v}.low"], row[f"{v}.high"] = show(r["mean"]), show(r["low"]), show(r["high"])
            evaluation = _paired(*(pool(list(first[f"{RAW}{v} {side}"]), kind_of(v))
                                   if first[f"{RAW}{v} {side}"].map(lambda x: isinstance(x, tuple)).all() else None
                                   for side in "AB"), v)
            if evaluation:
                row[f"{v}.eval_low"], row[f"{v}.eval_high"] = evaluation["low"], evaluation["high"]
            row[f"{v}.significant"] = r["significant"] and (evaluation is None or evaluation["significant"])
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(row: pd.Series, v: str) -> str:
    if pd.isna(row.get(v)):
        return "-"
    digits = 3 if v.startswith("ppl.") else 2
    text = f"{row[v]:.{digits}f}"
    if not pd.isna(row.get(f"{v}.low")):
        text += f" [{row[f'{v}.low']:.{digits}f}, {row[f'{v}.high']:.{digits}f}]"
    if row.get(f"{v}.significant") is True:
        text += " *"
    return text


def markdown(frame: pd.DataFrame, keys: list[str], values: list[str]) -> str:
    """The comparison as text: a column per value, `estimate [low, high]`, `*` where significant."""
    shown = [k for k in keys if k in frame and frame[k].nunique() > 1 or k in ("model", "sparsity", "seed")]
    shown = [k for k in shown if k in frame]
    body = frame[shown + (["seeds"] if "seeds" in frame else [])].copy()
    for v in values:
        if v in frame:
            label = f"{v.removeprefix('ppl.')} ppl A/B" if v.startswith("ppl.") else f"{v.removeprefix('zs.')} A-B (points)"
            body[label] = [_cell(row, v) for _, row in frame.iterrows()]
    return body.to_markdown(index=False)
