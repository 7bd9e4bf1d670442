"""Paper-style tables from the runs frame: Table 1 (methods x perplexities, 7 tasks, average),
Table 2 (head-only pruning: pruned heads x perplexities), Table 3 (methods x sparsity x
datasets) and any pivot; each written as Markdown, LaTeX (booktabs) and CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.collect.frame import FAMILIES, METHOD, ppl_columns, rows_of
from harness.evaluate.tasks import DEFAULT_AVERAGE_METRICS, PAPER_NAMES, TASKS


def pivot(df: pd.DataFrame, rows: list[str], cols: list[str], values: str) -> pd.DataFrame:
    if values not in df:
        raise ValueError(f"no column {values!r} in the records; available: {', '.join(df.columns)}")
    return df.pivot_table(index=rows_of(df, rows, exclude=tuple(cols)), columns=cols, values=values, aggfunc="mean")


def table3(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: methods (metric/remedy/allocation) x (sparsity, dataset) perplexities."""
    ppl_cols = ppl_columns(df)
    out = {}
    for model, sub in df.groupby("model"):
        t = sub.pivot_table(index=rows_of(sub, METHOD, exclude=("sparsity",)), columns="sparsity", values=ppl_cols,
                            aggfunc="mean")
        t.columns = [f"{s:g} {c.removeprefix('ppl.')}" for c, s in t.columns]
        out[model] = t.sort_index(axis=1)
    return out


def table_sparse(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model, the unstructured / N:M track (as in the SparseGPT and MRP papers): methods x
    (pattern, dataset) perplexities, with the model's dense runs as the first row."""
    if "sparsity_type" not in df:
        return {}
    masked = df[(df["sparsity_type"] != "structured") & (df["sparsity"] > 0)]  # a dense run masks nothing
    ppl_cols = ppl_columns(masked)
    out = {}
    for model, sub in masked.groupby("model"):
        sub = sub.assign(pattern=[f"{s:.0%}" if kind == "unstructured" else kind
                                  for kind, s in zip(sub["sparsity_type"], sub["sparsity"], strict=True)])
        t = sub.pivot_table(index=rows_of(sub, ["metric"], exclude=("sparsity_type", "sparsity", "pattern")),
                            columns="pattern", values=ppl_cols, aggfunc="mean")
        t.columns = [f"{pattern} {c.removeprefix('ppl.')}" for c, pattern in t.columns]
        t = t.rename_axis(index={"metric": "method"})
        t = t[sorted(t.columns, key=lambda c: (":" in c, c))]  # unstructured first, then N:M
        dense = df[(df["model"] == model) & (df["sparsity"] == 0)]
        if not dense.empty:
            row = {c: dense[f"ppl.{c.split(' ', 1)[1]}"].mean() for c in t.columns}
            key = ("dense",) + ("",) * (t.index.nlevels - 1) if t.index.nlevels > 1 else "dense"
            t = pd.concat([pd.DataFrame([row], index=pd.Index([key], name=t.index.name) if t.index.nlevels == 1
                                        else pd.MultiIndex.from_tuples([key], names=t.index.names)), t])
        t.attrs["caption"] = (f"{model}, weights masked in place (unstructured: every linear layer of the pruned "
                              "blocks loses that fraction per output row; N:M: N zeros in every M consecutive inputs): "
                              "perplexity, lower is better.")
        out[model] = t
    return out


def table1(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per (model, sparsity): the paper's Table 1. Rows grouped as the paper groups them
    (dense, data-free, training-aware, inference-aware, retraining; frame.FAMILIES), columns
    WikiText-2 and PTB perplexity, the seven accuracies and their average in percent (runs
    with zero-shot; the dense runs of the model head every sparsity's table)."""
    if "zs.avg" not in df:
        return {}
    scored = df.dropna(subset=["zs.avg"])
    out = {}
    for (model, sparsity), sub in scored[scored["sparsity"] > 0].groupby(["model", "sparsity"]):
        dense = scored[(scored["model"] == model) & (scored["sparsity"] == 0)]
        rows = pd.concat([dense, sub])
        cols = [c for c in ["ppl.wikitext2", "ppl.ptb", *[f"zs.{t}" for t in TASKS], "zs.avg"] if c in rows]
        t = rows.groupby(["family", *rows_of(rows, METHOD)])[cols].mean()
        t = t.sort_index(key=lambda level: level.map(_family_rank) if level.name == "family" else level)
        t[[c for c in cols if c.startswith("zs.")]] *= 100
        t.columns = [_paper_name(c) for c in cols]
        t.attrs["caption"] = _table1_caption(rows, model, sparsity)
        out[f"{model}_{sparsity:g}"] = t
    return out


def _family_rank(family: str) -> int:
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)


def _paper_name(column: str) -> str:
    names = {"ppl.wikitext2": "WikiText-2", "ppl.ptb": "PTB", "zs.avg": "Avg",
             **{f"zs.{t}": name for t, name in PAPER_NAMES.items()}}
    return names.get(column, column)


def _table1_caption(rows: pd.DataFrame, model: str, sparsity: float) -> str:
    averaged = rows["zs.average_metrics"].dropna().iloc[0] if "zs.average_metrics" in rows else {}
    evaluated = [task for task in TASKS if f"zs.{task}" in rows and rows[f"zs.{task}"].notna().any()]
    by_metric: dict[str, list[str]] = {}
    for task in evaluated:
        by_metric.setdefault(averaged.get(task, DEFAULT_AVERAGE_METRICS[task]), []).append(PAPER_NAMES[task])
    convention = "; ".join(f"{metric} for {', '.join(tasks)}" for metric, tasks in by_metric.items())
    count = "seven" if len(evaluated) == len(TASKS) else f"{len(evaluated)} evaluated"
    return (f"{model} at {sparsity:.0%} sparsity: WikiText-2 and PTB perplexity (lower is better) and zero-shot "
            f"accuracy in % (higher is better). Avg is the mean of the {count} accuracies ({convention}).")


def table2(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model, head-only runs (prune.modules=[attention]): methods x (pruned heads, dataset)."""
    if "heads_pruned" not in df:
        return {}
    heads_only = df[(df["modules"] == "attention") & df["heads_pruned"].notna()]
    ppl_cols = ppl_columns(df)
    out = {}
    for model, sub in heads_only.groupby("model"):
        sub = sub.assign(heads_pruned=sub["heads_pruned"].astype(int))
        t = sub.pivot_table(index=rows_of(sub, METHOD, exclude=("modules", "heads_pruned")), columns="heads_pruned", values=ppl_cols,
                            aggfunc="mean")
        t.columns = [f"{h} heads {c.removeprefix('ppl.')}" for c, h in t.columns]
        out[model] = t[sorted(t.columns, key=lambda c: (int(c.split()[0]), c))]
    return out


def _best_two(col: pd.Series, lower_better: bool) -> tuple:
    ranked = col.dropna().sort_values(ascending=lower_better)
    return tuple(ranked.index[:2])


def to_latex(t: pd.DataFrame, lower_better: dict[str, bool], caption: str | None = None) -> str:
    """booktabs table; per column the best value in bold and the second underlined (among the
    pruned models: a dense reference row is never marked)."""
    body = t.copy().astype(object)
    ranked = t.drop(index="dense", level="family", errors="ignore") if "family" in (t.index.names or []) else t
    for c in t.columns:
        marks = _best_two(ranked[c], lower_better.get(c, True))
        for idx in t.index:
            v = t.at[idx, c]
            cell = "--" if pd.isna(v) else f"{v:.2f}"
            if len(marks) > 0 and idx == marks[0]:
                cell = f"\\textbf{{{cell}}}"
            elif len(marks) > 1 and idx == marks[1]:
                cell = f"\\underline{{{cell}}}"
            body.at[idx, c] = cell
    # Labels and caption are text (second_moment, acc_norm, 20%); the cells carry our markup.
    body.index, body.columns = _tex_index(body.index), _tex_index(body.columns)
    return body.to_latex(escape=False, multirow=False, column_format="l" * t.index.nlevels + "r" * len(t.columns),
                         caption=None if caption is None else _tex(caption)).strip() + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_index(index: pd.Index) -> pd.Index:
    names = [None if n is None else _tex(n) for n in index.names]
    if isinstance(index, pd.MultiIndex):
        return pd.MultiIndex.from_tuples([tuple(_tex(v) for v in key) for key in index], names=names)
    return pd.Index([_tex(v) for v in index], name=names[0])


def _tex(value) -> str:
    """`value` as LaTeX text."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(value))


def _labels(index: pd.Index) -> pd.Index:
    """Column keys as they read in a paper: 0.2, not 0.200000."""
    def fmt(level: pd.Index) -> pd.Index:
        return level.map(lambda v: f"{v:g}") if level.dtype.kind == "f" else level

    if isinstance(index, pd.MultiIndex):
        return index.set_levels([fmt(level) for level in index.levels])
    return fmt(index)


def is_lower_better(name: str) -> bool:
    name = str(name).lower().replace("-", "")
    return "ppl" in name or "wikitext2" in name or "ptb" in name


def write_table(t: pd.DataFrame, out: Path, name: str, lower_better: bool | None = None) -> list[Path]:
    """Markdown, LaTeX and CSV of `t`. Which way is better comes from each column's name
    (perplexities: lower), or from `lower_better` for all columns (a pivot of one value)."""
    out.mkdir(parents=True, exist_ok=True)
    t = t.set_axis(_labels(t.columns), axis=1)
    lower = {c: is_lower_better(c) if lower_better is None else lower_better for c in t.columns}
    paths = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"]
    flat = t.copy()
    if isinstance(flat.columns, pd.MultiIndex):  # pivot with several column keys: "0.2 bias"
        flat.columns = [" ".join(str(k) for k in c) for c in flat.columns]
    flat = flat.reset_index()
    flat = flat.astype(object).where(flat.notna(), None)  # tabulate prints None as missingval
    caption = t.attrs.get("caption")
    markdown = flat.to_markdown(index=False, floatfmt=".2f", missingval="-") + "\n"
    paths[0].write_text(f"{caption}\n\n{markdown}" if caption else markdown)
    paths[1].write_text(to_latex(t, lower, caption))
    t.to_csv(paths[2])
    return paths


