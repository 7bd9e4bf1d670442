"""Does an ordering hold as models grow? Each pruned run's perplexity as a ratio to its own
model's dense run (same windows: the paired block-bootstrap interval of ppl_pruned / ppl_dense),
so that models of different sizes share one axis: the `scale` table (methods x models, smallest
first) and the plot of that ratio against the dense model's parameter count (plots.py)."""

from __future__ import annotations

import pandas as pd

from harness.collect.cells import RAW, cell_frame, means, paired
from harness.collect.frame import METHOD, ppl_columns, rows_of

# A run and the dense run it is divided by must agree on these; per dataset, their stored
# windows must also be the same (paired() compares the windows' digests).
_SAME_MODEL = ("model", "params_dense", "dtype", "ppl_tokens", "bos")
# Settings of a model rather than of a method: a row spans models that differ here (Gemma-3's
# width runs take query heads, the others KV groups; Gemma-3 puts BOS at every window, Qwen2.5
# once per stream). Where one model has runs of a method under two of them, they split the row.
PER_MODEL = ("attention_unit", "bos")
# Tracks whose `sparsity` is a fraction of the parameters removed (masks remove none).
_REMOVING = ("structured", "depth")
DENSE = "dense."  # ratio_frame's columns holding the dense value each ratio was divided by


def ratio_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The pruned runs (heads, channels or blocks removed) whose model has a dense run on the
    same windows, each `ppl.<dataset>` replaced by ppl / dense ppl with its paired 95% interval
    as `.low` / `.high` and the dense value as `dense.ppl.<dataset>`. The run's own windows stay
    its raw data: two methods of one model compare as ppl_A / ppl_B, the ratio of their ratios.
    A dataset without a dense run on the same windows is NaN."""
    if "params_dense" not in df or not (df["sparsity"] == 0).any():
        return df.iloc[0:0]
    dense = df[df["sparsity"] == 0]
    rows = []
    for row in df[(df["sparsity"] > 0) & df["sparsity_type"].isin(_REMOVING)].to_dict("records"):
        same = dense[(dense[list(_SAME_MODEL)] == pd.Series({k: row[k] for k in _SAME_MODEL})).all(axis=1)]
        if same.empty:
            continue
        for col in ppl_columns(df):
            ratio = _ratio(row, same, col)
            row[col], row[f"{col}.low"], row[f"{col}.high"], row[DENSE + col] = ratio
        rows.append(row)
    return pd.DataFrame(rows)


def _ratio(run: dict, dense: pd.DataFrame, col: str) -> tuple[float, float | None, float | None, float]:
    """(ratio, low, high, dense value) against the first dense run on the same windows; a run
    or dense run from before per-window data gives the plain ratio without an interval."""
    nan = (float("nan"), None, None, float("nan"))
    if pd.isna(run.get(col)):
        return nan
    raw = run.get(RAW + col)
    for reference in dense.dropna(subset=[col]).to_dict("records"):
        raw_dense = reference.get(RAW + col)
        if not (isinstance(raw, tuple) and isinstance(raw_dense, tuple)):
            return run[col] / reference[col], None, None, reference[col]
        try:
            r = paired(raw, raw_dense, "ppl")
        except ValueError:  # other windows: not this dense run
            continue
        return r["ratio"], r["low"], r["high"], reference[col]
    return nan


def method_rows(ratios: pd.DataFrame) -> list[str]:
    """The row keys of the scale table and the plot's lines: the method, plus any setting that
    takes several values among one method's runs (a per-model setting only where it varies
    within one model)."""
    rows = rows_of(ratios, ["sparsity_type", *METHOD], exclude=("model", "params_dense", "sparsity", *PER_MODEL))
    for setting in PER_MODEL:
        if setting in ratios and ratios.groupby([*rows, "model"], dropna=False)[setting].nunique().max() > 1:
            rows.append(setting)
    return rows


def model_sizes(runs: pd.DataFrame) -> pd.Series:
    """Each model's dense parameter count, smallest first (the table's column order, the plot's x)."""
    return runs.groupby("model")["params_dense"].first().sort_values()


def table_scale(ratios: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per sparsity that two or more models were pruned at (ratio_frame's runs): methods x
    (model, smallest first) of the perplexity ratio to dense (lower is better; bold as in every
    table, compared within a model) and the zero-shot average accuracy in %."""
    out = {}
    if ratios.empty:
        return out
    for sparsity, sub in ratios.groupby("sparsity"):
        if sub["model"].nunique() < 2:
            continue
        order = model_sizes(sub)
        rows = method_rows(sub)
        values = [c for c in [*ppl_columns(sub), "zs.avg"] if c in sub and sub[c].notna().any()]
        t = pd.concat([cell_frame(sub, rows, ["model"], [c], 100.0 if c.startswith("zs.") else 1.0) for c in values],
                      axis=1)
        t = t[sorted(t.columns, key=lambda cm: (order.index.get_loc(cm[1]), values.index(cm[0])))]
        names = {"zs.avg": "zero-shot avg"}
        t.columns = [f"{m} {names.get(c, c.removeprefix('ppl.') + ' x dense')}" for c, m in t.columns]
        t = means(t)
        t.attrs["caption"] = _caption(sub, order, sparsity)
        out[f"{sparsity:g}"] = t
    return out


def _caption(pruned: pd.DataFrame, order: pd.Series, sparsity: float) -> str:
    def model_text(model: str) -> str:
        divisors = pruned.loc[pruned["model"] == model, DENSE + "ppl.wikitext2"].dropna().unique() \
            if DENSE + "ppl.wikitext2" in pruned else []
        dense = f", dense WikiText-2 {divisors[0]:.2f}" if len(divisors) == 1 else ""
        return f"{model} {order[model] / 1e6:.0f}M{dense}"

    units = pruned[pruned["sparsity_type"] == "structured"].groupby("model")["attention_unit"].unique()
    mixed = "" if units.map(tuple).nunique() <= 1 else " Attention unit of the width runs: " + "; ".join(
        f"{m} {'/'.join(u)}" for m, u in units.items()) + "."
    depth = ("; a depth run removes the whole number of blocks nearest the target"
             if (pruned["sparsity_type"] == "depth").any() else "")
    return (f"Across model sizes, {sparsity:.0%} of each model's parameters removed (achieved: "
            f"{pruned['sparsity_achieved'].min():.1%} to {pruned['sparsity_achieved'].max():.1%}{depth}): perplexity "
            f"as a ratio to the same model's dense perplexity on the same windows (lower is better; intervals "
            f"paired against the dense run) and zero-shot average accuracy in % (higher is better). Models, "
            f"smallest first: {'; '.join(model_text(m) for m in order.index)}.{mixed}")
