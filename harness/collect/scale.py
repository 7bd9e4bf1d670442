"""Does an ordering hold as models grow? Each pruned run's perplexity as a ratio to its own
model's dense run (same windows: the paired block-bootstrap interval of ppl_pruned / ppl_dense),
so that models of different sizes share one axis: the `scale` table (methods x models, smallest
first) and the plot of that ratio against the dense model's parameter count (plots.py)."""

from __future__ import annotations

import logging

import pandas as pd

from harness.collect.cells import RAW, cell_frame, means, paired
from harness.collect.frame import METHOD, ppl_columns, rows_of

log = logging.getLogger(__name__)

# A run and the dense run it is divided by must agree on these (the same evaluation windows).
_SAME_EVALUATION = ("model", "ppl_tokens", "bos")
# Per model, not per method: a row spans models that may differ here (Gemma-3's width runs
# take query heads, the others KV groups; Gemma-3 puts BOS at every window, Qwen2.5 once per
# stream); the caption names the attention units where they differ.
PER_MODEL = ("model", "params_dense", "sparsity", "attention_unit", "bos")


def ratio_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The pruned runs whose model has a dense run on the same windows, each `ppl.<dataset>`
    replaced by ppl / dense ppl with its paired 95% interval as `.low` / `.high` (the run's own
    windows stay as its raw data: two methods of one model compare as ppl_A / ppl_B, which is
    the ratio of their ratios)."""
    if "params_dense" not in df or not (df["sparsity"] == 0).any():
        return df.iloc[0:0]
    dense = df[df["sparsity"] == 0].drop_duplicates(list(_SAME_EVALUATION))
    rows = []
    for row in df[df["sparsity"] > 0].to_dict("records"):
        match = dense[(dense[list(_SAME_EVALUATION)] == pd.Series({k: row[k] for k in _SAME_EVALUATION})).all(axis=1)]
        if match.empty:
            continue
        reference = match.iloc[0].to_dict()
        for col in ppl_columns(df):
            if pd.isna(row.get(col)) or pd.isna(reference.get(col)):
                row[col] = float("nan")
                continue
            row[col], row[f"{col}.low"], row[f"{col}.high"] = _ratio(row, reference, col)
        rows.append(row)
    return pd.DataFrame(rows)


def _ratio(run: dict, dense: dict, col: str) -> tuple[float, float | None, float | None]:
    raw_run, raw_dense = run.get(RAW + col), dense.get(RAW + col)
    if isinstance(raw_run, tuple) and isinstance(raw_dense, tuple):
        try:
            r = paired(raw_run, raw_dense, "ppl")
            return r["ratio"], r["low"], r["high"]
        except ValueError:
            log.warning("run %s and its dense run %s have different %s windows: ratio without interval",
                        run["run_id"], dense["run_id"], col)
    return run[col] / dense[col], None, None


def table_scale(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per sparsity that two or more models were pruned at (each with its dense run): methods x
    (model, smallest first) of the perplexity ratio to dense (lower is better; bold as in every
    table, compared within a model) and the zero-shot average accuracy in %."""
    ratios = ratio_frame(df)
    out = {}
    if ratios.empty:
        return out
    for sparsity, sub in ratios.groupby("sparsity"):
        if sub["model"].nunique() < 2:
            continue
        order = sub.groupby("model")["params_dense"].first().sort_values()
        rows = rows_of(sub, ["sparsity_type", *METHOD], exclude=PER_MODEL)
        values = [c for c in [*ppl_columns(sub), "zs.avg"] if c in sub and sub[c].notna().any()]
        t = pd.concat([cell_frame(sub, rows, ["model"], [c], 100.0 if c.startswith("zs.") else 1.0) for c in values],
                      axis=1)
        t = t[sorted(t.columns, key=lambda cm: (order.index.get_loc(cm[1]), values.index(cm[0])))]
        names = {"zs.avg": "zero-shot avg"}
        t.columns = [f"{m} {names.get(c, c.removeprefix('ppl.') + ' x dense')}" for c, m in t.columns]
        t = means(t)
        t.attrs["caption"] = _caption(df, sub, order, sparsity)
        out[f"{sparsity:g}"] = t
    return out


def _caption(df: pd.DataFrame, pruned: pd.DataFrame, order: pd.Series, sparsity: float) -> str:
    dense = df[(df["sparsity"] == 0) & df["model"].isin(order.index)].drop_duplicates("model").set_index("model")
    wiki = "ppl.wikitext2" in dense
    sizes = "; ".join(f"{m} {order[m] / 1e6:.0f}M" + (f", dense WikiText-2 {dense.at[m, 'ppl.wikitext2']:.2f}"
                                                         if wiki and pd.notna(dense.at[m, "ppl.wikitext2"]) else "")
                      for m in order.index)
    units = pruned[pruned["sparsity_type"] == "structured"].groupby("model")["attention_unit"].unique()
    mixed = "" if units.map(tuple).nunique() <= 1 else " Attention unit of the width runs: " + "; ".join(
        f"{m} {'/'.join(u)}" for m, u in units.items()) + "."
    removed = pruned.groupby("model")["sparsity_achieved"]
    return (f"Across model sizes, {sparsity:.0%} of each model's parameters removed (achieved: "
            f"{removed.min().min():.1%} to {removed.max().max():.1%}; a depth run removes the whole number of blocks "
            f"nearest the target): perplexity "
            f"as a ratio to the same model's dense perplexity on the same windows (lower is better; intervals "
            f"paired against the dense run) and zero-shot average accuracy in % (higher is better). Models, "
            f"smallest first: {sizes}.{mixed}")
