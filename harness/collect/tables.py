"""Paper-style tables from the runs frame: Table 1 (methods x perplexities, 7 tasks, average),
Table 2 (head-only pruning: pruned heads x perplexities), Table 3 (methods x sparsity x
datasets) and any pivot; each written as Markdown, LaTeX (booktabs) and CSV.

Every table is a float table of cell means whose attrs["cells"] holds the cells themselves
(cells.Cell: the runs of each seed, their intervals and raw data): Markdown and LaTeX print
mean +- sd (n) over seeds or one run's 95% interval, and mark the best cell with every cell not
significantly worse than it; the CSV has mean, sd, n and interval columns per value."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.collect.cells import Cell, Run, best_marks, cell_frame, means
from harness.collect.frame import FAMILIES, METHOD, ppl_columns, rows_of
from harness.data.zeroshot_tasks import DEFAULT_AVERAGE_METRICS, PAPER_NAMES, TASKS


def pivot(df: pd.DataFrame, rows: list[str], cols: list[str], values: str) -> pd.DataFrame:
    if values not in df:
        raise ValueError(f"no column {values!r} in the records; available: {', '.join(df.columns)}")
    return means(cell_frame(df, rows_of(df, rows, exclude=tuple(cols)), cols, values, _scale(values)))


def _scale(column: str) -> float:
    """Accuracies print in percent."""
    return 100.0 if column.startswith("zs.") else 1.0


def table3(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model, the structured track: methods (metric/remedy/allocation) x (sparsity, dataset)
    perplexities. Masked runs (unstructured, N:M) have their own table (table_sparse): a
    sparsity means another thing there."""
    if "sparsity_type" in df:
        df = df[df["sparsity_type"] == "structured"]
    ppl_cols = ppl_columns(df)
    out = {}
    for model, sub in df.groupby("model"):
        t = cell_frame(sub, rows_of(sub, METHOD, exclude=("sparsity",)), ["sparsity"], ppl_cols)
        t.columns = [f"{s:g} {c.removeprefix('ppl.')}" for c, s in t.columns]
        t = means(t.sort_index(axis=1))
        t.attrs["caption"] = (f"{model}, structured pruning (heads and channels removed): perplexity by fraction of "
                              "parameters removed, lower is better.")
        out[model] = t
    return out


def table_depth(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model with depth runs: thinner or shallower? The structured (width) and depth runs side
    by side, rows labelled by their track, columns (sparsity, dataset) perplexities, the
    fraction each actually removed in its own column (depth removes whole blocks: the nearest
    count to the target)."""
    if "sparsity_type" not in df or not (df["sparsity_type"] == "depth").any():
        return {}
    out = {}
    for model, sub in df[df["sparsity_type"].isin(["structured", "depth"])].groupby("model"):
        if not (sub["sparsity_type"] == "depth").any():
            continue
        rows = rows_of(sub, ["sparsity_type", *METHOD], exclude=("sparsity",))
        measured = [c for c in ("zs.avg", "macs_per_token", "tokens_per_s") if c in sub and sub[c].notna().any()]
        values = [*ppl_columns(sub), *measured, "sparsity_achieved"]
        t = pd.concat([cell_frame(sub, rows, ["sparsity"], [c], _scale(c)) for c in values], axis=1)
        t = t[sorted(t.columns, key=lambda cs: (cs[1], values.index(cs[0])))]  # by sparsity, then value
        names = {"sparsity_achieved": "removed", "zs.avg": "zero-shot avg", "tokens_per_s": "tokens/s",
                 "macs_per_token": "MACs/token"}
        t.columns = [f"{s:g} {names.get(c, c.removeprefix('ppl.'))}" for c, s in t.columns]
        t = means(t)
        t.attrs["caption"] = (f"{model}: width (structured: heads and channels) against depth (whole blocks) at the "
                              "same target fraction of parameters; perplexity, lower is better; zero-shot average "
                              "accuracy in %, higher is better; `removed` (the fraction each run removed), `MACs/token` "
                              "and `tokens/s` (batch 1, one timing, no interval) describe the pruned model and are "
                              "never marked.")
        out[model] = t
    return out


def table_sparse(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model, the unstructured / N:M track (as in the SparseGPT and MRP papers): methods x
    (pattern, dataset) perplexities, with the model's dense runs as the first row."""
    if "sparsity_type" not in df:
        return {}
    masked = df[df["sparsity_type"].isin(["unstructured", "nm"]) & (df["sparsity"] > 0)]  # a dense run masks nothing
    ppl_cols = ppl_columns(masked)
    out = {}
    for model, sub in masked.groupby("model"):
        sub = sub.assign(pattern=[f"{s:.0%}" if kind == "unstructured" else nm
                                  for kind, nm, s in zip(sub["sparsity_type"], sub["nm"], sub["sparsity"], strict=True)])
        t = cell_frame(sub, rows_of(sub, ["metric"], exclude=("sparsity_type", "nm", "sparsity", "pattern")), ["pattern"],
                       ppl_cols)
        t.columns = [f"{pattern} {c.removeprefix('ppl.')}" for c, pattern in t.columns]
        t = t.rename_axis(index={"metric": "method"})
        t = t[sorted(t.columns, key=lambda c: (":" in c, c))]  # unstructured first, then N:M
        dense = df[(df["model"] == model) & (df["sparsity"] == 0)]
        if not dense.empty:
            whole = cell_frame(dense.assign(_all=""), ["_all"], [], ppl_columns(dense))
            row = {c: None if whole.empty else whole.iloc[0].get(f"ppl.{c.split(' ', 1)[1]}") for c in t.columns}
            key = ("dense",) + ("",) * (t.index.nlevels - 1) if t.index.nlevels > 1 else "dense"
            t = pd.concat([pd.DataFrame([row], index=pd.Index([key], name=t.index.name) if t.index.nlevels == 1
                                        else pd.MultiIndex.from_tuples([key], names=t.index.names)), t])
        t = means(t)
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
        parts = [cell_frame(rows, ["family", *rows_of(rows, METHOD)], [], [c], _scale(c)) for c in cols]
        t = pd.concat(parts, axis=1).reindex(columns=cols)
        t = t.sort_index(key=lambda level: level.map(_family_rank) if level.name == "family" else level)
        t.columns = [_paper_name(c) for c in cols]
        t = means(t)
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
        t = cell_frame(sub, rows_of(sub, METHOD, exclude=("modules", "heads_pruned")), ["heads_pruned"], ppl_cols)
        t.columns = [f"{h} heads {c.removeprefix('ppl.')}" for c, h in t.columns]
        out[model] = means(t[sorted(t.columns, key=lambda c: (int(c.split()[0]), c))])
    return out


def _reference_rows(t: pd.DataFrame) -> list:
    """Rows never marked best: the dense model (Table 1's family level, or a row named dense)."""
    if "family" in (t.index.names or []):
        return [idx for idx in t.index if idx[t.index.names.index("family")] == "dense"]
    return [idx for idx in t.index if (idx[0] if isinstance(idx, tuple) else idx) == "dense"]


def _cells(t: pd.DataFrame) -> pd.DataFrame:
    """The table's cells; a plain float table (no attrs) becomes single-value cells."""
    cells = t.attrs.get("cells")
    if cells is not None:
        return cells
    return t.map(lambda v: None if pd.isna(v) else Cell((Run(0, "", float(v), None, None, None),), "acc"))


def marks_of(t: pd.DataFrame, lower_better: dict[str, bool]) -> tuple[pd.DataFrame, int]:
    """cells.best_marks of the table (its dense reference rows never marked)."""
    return best_marks(_cells(t), lower_better, _reference_rows(t))


def marked_text(t: pd.DataFrame, lower_better: dict[str, bool], latex: bool,
                marked: tuple[pd.DataFrame, int] | None = None) -> tuple[pd.DataFrame, int]:
    """Each cell as text (cells.Cell.text), the best of each column and every cell not
    significantly worse than it in bold (`marked`: marks_of, when already computed); and how
    many cells could not be tested."""
    cells = _cells(t)
    marks, untested = marked or marks_of(t, lower_better)
    body = pd.DataFrame("", index=t.index, columns=t.columns, dtype=object)
    for c in t.columns:
        for idx in t.index:
            cell = cells.at[idx, c]
            text = cell.text(latex=latex) if isinstance(cell, Cell) else ("--" if latex else "-")
            if marks.at[idx, c]:
                text = f"\\textbf{{{text}}}" if latex else f"**{text}**"
            body.at[idx, c] = text
    return body, untested


def significance_note(untested: int) -> str:
    note = ("Cells: mean ± sd (n calibration seeds), or one run's value [95% evaluation interval]. Bold: the best "
            "value of each column and every value not significantly worse than it (paired 95% interval: by seed "
            "where two cells share two or more seeds, else on the same windows / questions; no multiplicity "
            "correction).")
    if untested:
        note += f" {untested} cell(s) could not be tested (no paired data) and are not bold."
    return note


def to_latex(t: pd.DataFrame, lower_better: dict[str, bool], caption: str | None = None,
             marked: tuple[pd.DataFrame, int] | None = None) -> str:
    """booktabs table; per column the best value and every value not significantly worse than
    it in bold (among the pruned models: a dense reference row is never marked)."""
    body, untested = marked_text(t, lower_better, latex=True, marked=marked)
    caption = " ".join(part for part in (caption, significance_note(untested)) if part)
    # Labels and caption are text (second_moment, acc_norm, 20%); the cells carry our markup.
    body.index, body.columns = _tex_index(body.index), _tex_index(body.columns)
    return body.to_latex(escape=False, multirow=False, column_format="l" * t.index.nlevels + "r" * len(t.columns),
                         caption=_tex(caption).replace("±", "$\\pm$")).strip() + "\n"


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


# Columns that describe a run rather than rank it: never marked best.
DESCRIPTIVE = (" removed", " tokens/s", " MACs/token")


def is_lower_better(name: str) -> bool:
    name = str(name).lower().replace("-", "")
    return "ppl" in name or "wikitext2" in name or "ptb" in name


def write_table(t: pd.DataFrame, out: Path, name: str, lower_better: bool | None = None) -> list[Path]:
    """Markdown, LaTeX and CSV of `t`. Which way is better comes from each column's name
    (perplexities: lower), or from `lower_better` for all columns (a pivot of one value)."""
    out.mkdir(parents=True, exist_ok=True)
    cells = _cells(t)
    labels = _labels(t.columns)
    t, cells = t.set_axis(labels, axis=1), cells.set_axis(labels, axis=1)
    t.attrs["cells"] = cells
    lower = {c: is_lower_better(c) if lower_better is None else lower_better for c in t.columns
             if not str(c).endswith(DESCRIPTIVE)}
    paths = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"]
    marked = marks_of(t, lower)  # the paired tests run once for both formats
    body, untested = marked_text(t, lower, latex=False, marked=marked)
    if isinstance(body.columns, pd.MultiIndex):  # pivot with several column keys: "0.2 bias"
        body.columns = [" ".join(str(k) for k in c) for c in body.columns]
    caption = " ".join(part for part in (t.attrs.get("caption"), significance_note(untested)) if part)
    align = ("left",) * body.index.nlevels + ("right",) * len(body.columns)
    markdown = body.reset_index().to_markdown(index=False, colalign=align) + "\n"
    paths[0].write_text(f"{caption}\n\n{markdown}")
    paths[1].write_text(to_latex(t, lower, t.attrs.get("caption"), marked))
    statistics_csv(t, cells).to_csv(paths[2])
    return paths


def statistics_csv(t: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Per value column: its mean, then sd and n over seeds, the 95% interval (t over seeds, or
    one run's evaluation interval) and the mean half-width of the runs' evaluation intervals."""
    columns = {}
    for c in t.columns:
        label = " ".join(str(k) for k in c) if isinstance(c, tuple) else str(c)
        col = [cells.at[idx, c] for idx in t.index]
        columns[label] = [x.mean if isinstance(x, Cell) else None for x in col]
        columns[f"{label} std"] = [x.std if isinstance(x, Cell) else None for x in col]
        columns[f"{label} n"] = [x.n if isinstance(x, Cell) else 0 for x in col]
        columns[f"{label} ci_low"] = [x.interval[0] if isinstance(x, Cell) and x.interval else None for x in col]
        columns[f"{label} ci_high"] = [x.interval[1] if isinstance(x, Cell) and x.interval else None for x in col]
        columns[f"{label} eval_halfwidth"] = [x.eval_halfwidth if isinstance(x, Cell) else None for x in col]
    return pd.DataFrame(columns, index=t.index)
