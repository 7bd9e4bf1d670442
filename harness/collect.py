"""Records -> pandas -> paper-style tables (Markdown, LaTeX, CSV) and plots.

    python -m harness.collect                       # default tables from results/runs
    python -m harness.collect --rows metric,remedy --cols sparsity --values ppl.wikitext2
    harness collect --runs DIR --out results
    harness collect --wandb ENTITY/PROJECT          # also the records uploaded to a wandb project
    harness collect --where model=smollm2-135m --where "remedy_params=-|damp=0.01,toward=zero" --out DIR

Only complete records are read. Tables go to <out>/tables, plots to <out>/plots:
Table 1 (methods x perplexities, 7 tasks, average; runs with zero-shot), Table 2 (head-only
pruning: pruned heads x perplexities), Table 3 (methods x sparsity x datasets), runs.csv,
perplexity vs sparsity, perplexity vs calibration size (Figure 4, where a sweep varies
n_samples) and the head-similarity graph of one block (Figure 3, runs whose metric
measured head divergences).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from harness import records, sources
from harness.evaluate.tasks import TASKS

log = logging.getLogger(__name__)

METHOD = ["metric", "remedy", "allocation"]
# Settings that change a result besides the method; where the records of a table differ in
# one, it becomes an extra row level, so different configurations are never averaged
# (only repeated seeds are).
SETTINGS = ["metric_params", "remedy_params", "attention_unit", "calibration", "n_samples", "sparsity_mode", "modules",
            "ppl_tokens", "bos"]
# The method part a parameter setting belongs to: with that part as a table column, the
# setting varies with the column, not within a row.
OWNER = {"metric_params": "metric", "remedy_params": "remedy"}


def _params(d: dict, skip: tuple[str, ...] = ()) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()) if k not in skip and v not in (None, False)) or "-"


def rows_of(df: pd.DataFrame, base: list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """`base` plus the model, the method parts and every setting that take several values
    among the runs of one row (equal `base`), so that a row is one configuration and nothing
    different is averaged (repeated seeds are); `exclude` are the table's column keys."""
    rows = list(base)
    for c in ["model", *METHOD, *SETTINGS]:
        if c not in df or c in rows or c in exclude:
            continue
        within = rows + ([OWNER[c]] if OWNER.get(c) in exclude else [])
        if df.groupby(within)[c].nunique().max() > 1:
            rows.append(c)
    return rows


def frame(recs: list[dict]) -> pd.DataFrame:
    """One row per run with flat, human-named columns; a malformed record is reported and skipped."""
    rows = []
    for r in recs:
        try:
            rows.append(_row(r))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            log.warning("ignoring %s: malformed record (%s: %s)", r.get("path") or r.get("run_id"), type(e).__name__, e)
    return pd.DataFrame(rows)


def _row(r: dict) -> dict:
    c, ev, p = r["config"], r.get("eval", {}), r["pruning"]
    row = {
        "model": c["model"]["name"], "metric": c["metric"]["name"], "remedy": c["remedy"]["name"],
        "allocation": c["allocation"]["name"], "calibration": c["calibration"]["dataset"],
        "n_samples": c["calibration"]["n_samples"], "sparsity": c["sparsity"], "sparsity_mode": c["sparsity_mode"],
        "sparsity_achieved": round(p["sparsity_achieved"], 4), "seed": c["seed"], "modules": "+".join(c["prune"]["modules"]),
        "attention_unit": c["prune"].get("attention_unit", "kv_group"), "bos": c["model"].get("bos", "stream"),
        "heads_kept": sum(layer["heads_kept"] for layer in p["per_layer"]), "params": r["model"]["params_after"], "prune_seconds": p["seconds"],
        "run_id": r["run_id"],
        "metric_params": _params(c["metric"].get("params") or {}),
        "remedy_params": _params(c["remedy"], skip=("name",)),
    }
    if "heads_before" in r["model"]:
        row["heads_pruned"] = r["model"]["heads_before"] - row["heads_kept"]
    for name, v in ev.get("ppl", {}).items():
        row[f"ppl.{name}"] = v["value"]
        row[f"ppl.{name}.tokens"] = v["tokens"]
    max_tokens = (c["eval"].get("ppl") or {}).get("max_tokens")
    row["ppl_tokens"] = "all" if max_tokens is None else str(max_tokens)
    zs = ev.get("zeroshot", {})
    avg_metric = ev.get("zeroshot_protocol", {}).get("average_metrics", {})
    for task, v in zs.items():
        row[f"zs.{task}"] = v[avg_metric.get(task, "acc")] if v.get(avg_metric.get(task, "acc")) is not None else v["acc"]
    if "zeroshot_avg" in ev:
        row["zs.avg"] = ev["zeroshot_avg"]
    return row


def where(df: pd.DataFrame, conditions: list[str]) -> pd.DataFrame:
    """Keep the rows matching every `column=value` condition (`a|b`: any of the values)."""
    for cond in conditions:
        key, sep, values = cond.partition("=")
        if not sep or key not in df:
            raise ValueError(f"bad --where {cond!r}: expected COLUMN=VALUE[|VALUE...] with COLUMN one of {', '.join(df.columns)}")
        df = df[df[key].astype(str).isin(values.split("|"))]
    return df


def pivot(df: pd.DataFrame, rows: list[str], cols: list[str], values: str) -> pd.DataFrame:
    if values not in df:
        raise ValueError(f"no column {values!r} in the records; available: {', '.join(df.columns)}")
    return df.pivot_table(index=rows_of(df, rows, exclude=tuple(cols)), columns=cols, values=values, aggfunc="mean")


def table3(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: methods (metric/remedy/allocation) x (sparsity, dataset) perplexities."""
    ppl_cols = _ppl_columns(df)
    out = {}
    for model, sub in df.groupby("model"):
        t = sub.pivot_table(index=rows_of(sub, METHOD, exclude=("sparsity",)), columns="sparsity", values=ppl_cols,
                            aggfunc="mean")
        t.columns = [f"{s:g} {c.removeprefix('ppl.')}" for c, s in t.columns]
        out[model] = t.sort_index(axis=1)
    return out


def table1(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per (model, sparsity): methods x [WikiText-2, PTB, 7 tasks, Avg] (runs with zero-shot)."""
    cols = [c for c in ["ppl.wikitext2", "ppl.ptb", *[f"zs.{t}" for t in TASKS], "zs.avg"] if c in df]
    if "zs.avg" not in cols:
        return {}
    out = {}
    for (model, sparsity), sub in df.dropna(subset=["zs.avg"]).groupby(["model", "sparsity"]):
        out[f"{model}_{sparsity:g}"] = sub.groupby(rows_of(sub, METHOD))[cols].mean()
    return out


def table2(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model, head-only runs (prune.modules=[attention]): methods x (pruned heads, dataset)."""
    if "heads_pruned" not in df:
        return {}
    heads_only = df[(df["modules"] == "attention") & df["heads_pruned"].notna()]
    ppl_cols = _ppl_columns(df)
    out = {}
    for model, sub in heads_only.groupby("model"):
        sub = sub.assign(heads_pruned=sub["heads_pruned"].astype(int))
        t = sub.pivot_table(index=rows_of(sub, METHOD, exclude=("modules", "heads_pruned")), columns="heads_pruned", values=ppl_cols,
                            aggfunc="mean")
        t.columns = [f"{h} heads {c.removeprefix('ppl.')}" for c, h in t.columns]
        out[model] = t[sorted(t.columns, key=lambda c: (int(c.split()[0]), c))]
    return out


def _best_two(col: pd.Series, lower_better: bool) -> tuple:
    s = col.dropna().sort_values(ascending=lower_better)
    return tuple(s.index[:2])


def to_latex(t: pd.DataFrame, lower_better: dict[str, bool]) -> str:
    """booktabs table; per column the best value in bold and the second underlined."""
    body = t.copy().astype(object)
    for c in t.columns:
        marks = _best_two(t[c], lower_better.get(c, True))
        for idx in t.index:
            v = t.at[idx, c]
            cell = "--" if pd.isna(v) else f"{v:.2f}"
            if len(marks) > 0 and idx == marks[0]:
                cell = f"\\textbf{{{cell}}}"
            elif len(marks) > 1 and idx == marks[1]:
                cell = f"\\underline{{{cell}}}"
            body.at[idx, c] = cell
    return body.to_latex(escape=False, column_format="l" * t.index.nlevels + "r" * len(t.columns)).strip() + "\n"


def _labels(index: pd.Index) -> pd.Index:
    """Column keys as they read in a paper: 0.2, not 0.200000."""
    def fmt(level: pd.Index) -> pd.Index:
        return level.map(lambda v: f"{v:g}") if level.dtype.kind == "f" else level

    if isinstance(index, pd.MultiIndex):
        return index.set_levels([fmt(level) for level in index.levels])
    return fmt(index)


def _is_lower_better(name: str) -> bool:
    return "ppl" in str(name) or "wikitext2" in str(name) or "ptb" in str(name)


def write_table(t: pd.DataFrame, out: Path, name: str, lower_better: bool | None = None) -> list[Path]:
    """Markdown, LaTeX and CSV of `t`. Which way is better comes from each column's name
    (perplexities: lower), or from `lower_better` for all columns (a pivot of one value)."""
    out.mkdir(parents=True, exist_ok=True)
    t = t.set_axis(_labels(t.columns), axis=1)
    lower = {c: _is_lower_better(c) if lower_better is None else lower_better for c in t.columns}
    paths = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"]
    flat = t.copy()
    if isinstance(flat.columns, pd.MultiIndex):  # pivot with several column keys: "0.2 bias"
        flat.columns = [" ".join(str(k) for k in c) for c in flat.columns]
    flat = flat.reset_index()
    flat = flat.astype(object).where(flat.notna(), None)  # tabulate prints None as missingval
    paths[0].write_text(flat.to_markdown(index=False, floatfmt=".2f", missingval="-") + "\n")
    paths[1].write_text(to_latex(t, lower))
    t.to_csv(paths[2])
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")  # the canvas grows to hold an outside legend
    fig.clear()
    return paths


def _ppl_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("ppl.") and not c.endswith(".tokens")]


def plot_ppl_vs(df: pd.DataFrame, out: Path, x: str, fixed: list[str], stem: str) -> list[Path]:
    """One figure per (model, fixed..., dataset): perplexity against `x`, a line per method;
    only where some method has at least two values of `x`."""
    plt = _pyplot()
    paths = []
    for key, sub in df.groupby(["model", *fixed]):
        methods = rows_of(sub, METHOD, exclude=(x, *fixed))
        key = key if isinstance(key, tuple) else (key,)
        if sub.groupby(methods)[x].nunique().max() < 2:
            continue
        lines = list(sub.groupby(methods))
        for col in _ppl_columns(sub):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for i, (method, g) in enumerate(lines):
                g = g.groupby(x)[col].mean().dropna().sort_index()
                # ten colours, then the next line style: every method stays distinguishable
                ax.plot(g.index, g.values, marker="o", linestyle=("-", "--", ":", "-.")[i // 10 % 4],
                        label="/".join(map(str, method)))
            settings = " ".join(f"{f}={k:g}" if isinstance(k, float) else f"{f}={k}"
                                for f, k in zip(fixed, key[1:], strict=True))
            ax.set(xlabel=x, ylabel=f"{col.removeprefix('ppl.')} perplexity", yscale="log")
            ax.set_title(f"{key[0]}\n{settings}", fontsize=9)
            if x == "n_samples":
                ax.set_xscale("log", base=2)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), ncol=1 + (len(lines) - 1) // 16)
            suffix = "_".join(f"{k:g}" if isinstance(k, float) else str(k) for k in key)
            paths += _save(fig, out, f"{stem}_{suffix}_{col.removeprefix('ppl.')}")
            plt.close(fig)
    return paths


def _heads_per_unit(layer: dict, n_heads: int) -> int:
    removed = len(layer["attention_units_removed"])
    return (n_heads - layer["heads_kept"]) // removed if removed else 1


def plot_head_graph(rec: dict, out: Path, layer: int | None = None, tau: float | None = None) -> list[Path]:
    """Figure 3: the heads of one block as nodes, an edge where their mean JS distance is below
    tau (default: the median over the block's head pairs); removed heads are drawn filled."""
    import math

    plt = _pyplot()
    layers = {lay["layer"]: lay for lay in rec["pruning"]["per_layer"] if "head_divergence" in lay}
    if not layers:
        return []
    if layer is None:
        layer = sorted(layers)[len(layers) // 2]
    if layer not in layers:
        raise ValueError(f"run {rec['run_id']} has no head divergences for block {layer}; blocks with them: {sorted(layers)}")
    lay = layers[layer]
    div = lay["head_divergence"]
    n = len(div)
    pairs = [(div[i][j], i, j) for i in range(n) for j in range(i + 1, n)]
    if tau is None:
        tau = sorted(d for d, _, _ in pairs)[len(pairs) // 2]
    hpu = _heads_per_unit(lay, n)
    removed = {u * hpu + k for u in lay["attention_units_removed"] for k in range(hpu)}
    pos = [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for d, i, j in pairs:
        if d < tau:
            ax.plot([pos[i][0], pos[j][0]], [pos[i][1], pos[j][1]], color="tab:blue", lw=0.6 + 2.5 * (1 - d / tau), zorder=1)
    for i, (px, py) in enumerate(pos):
        ax.scatter(px, py, s=420, zorder=2, color="tab:red" if i in removed else "white", edgecolors="black")
        ax.annotate(str(i), (px, py), ha="center", va="center", fontsize=8, zorder=3)
    cfg = rec["config"]
    ax.set_title(f"{cfg['model']['name']} block {layer}: JS distance < {tau:.3f}\n(filled: removed by {cfg['metric']['name']})", fontsize=9)
    ax.set_axis_off()
    ax.set_aspect("equal")
    paths = _save(fig, out, f"head_similarity_{cfg['model']['name']}_block{layer}_{rec['run_id']}")
    plt.close(fig)
    return paths


def _figure3_records(recs: list[dict], run_id: str | None) -> list[dict]:
    """The run to draw per model: `run_id`, else the first run (by id) with head divergences."""
    if run_id is not None:
        chosen = [r for r in recs if r["run_id"] == run_id]
        if not chosen:
            raise ValueError(f"no complete record with run id {run_id!r}")
        return chosen
    first: dict[str, dict] = {}
    for r in sorted(recs, key=lambda r: r["run_id"]):
        if any("head_divergence" in lay for lay in r["pruning"]["per_layer"]):
            first.setdefault(r["config"]["model"]["name"], r)
    return list(first.values())


def collect(runs: Path, out: Path, rows: list[str] | None = None, cols: list[str] | None = None,
            values: str | None = None, wandb_project: str | None = None, fig3_run: str | None = None,
            fig3_layer: int | None = None, fig3_tau: float | None = None, conditions: list[str] = ()) -> list[Path]:
    recs = records.load_complete(runs)
    if wandb_project:
        recs = sources.merge(recs, sources.wandb_records(wandb_project))
    if not recs:
        raise SystemExit(f"no complete records under {runs}" + (f" or in wandb project {wandb_project}" if wandb_project else ""))
    df = where(frame(recs), list(conditions))
    if df.empty:
        raise SystemExit(f"no record matches {list(conditions)}")
    recs = [r for r in recs if r["run_id"] in set(df["run_id"])]
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    df.to_csv(tables / "runs.csv", index=False)
    written = [tables / "runs.csv"]
    if rows and cols and values:
        written += write_table(pivot(df, rows, cols, values), tables, f"pivot_{values}", _is_lower_better(values))
    for model, t in table3(df).items():
        written += write_table(t, tables, f"table3_{model}")
    for key, t in table1(df).items():
        written += write_table(t, tables, f"table1_{key}")
    for model, t in table2(df).items():
        written += write_table(t, tables, f"table2_{model}")
    plots = out / "plots"
    written += plot_ppl_vs(df, plots, "sparsity", ["modules", "calibration", "n_samples"], "ppl_vs_sparsity")
    written += plot_ppl_vs(df, plots, "n_samples", ["modules", "calibration", "sparsity"], "ppl_vs_calibration")
    for rec in _figure3_records(recs, fig3_run):
        written += plot_head_graph(rec, plots, fig3_layer, fig3_tau)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="harness collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("results/runs"), help="folder of <hash>/result.json records")
    ap.add_argument("--out", type=Path, default=Path("results"), help="writes <out>/tables and <out>/plots")
    ap.add_argument("--rows", help="pivot rows, comma-separated (e.g. metric,remedy)")
    ap.add_argument("--cols", help="pivot columns (e.g. sparsity)")
    ap.add_argument("--values", help="pivot values (e.g. ppl.wikitext2, zs.avg)")
    ap.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE[|VALUE]",
                    help="only runs matching (repeatable; columns as in runs.csv)")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the records uploaded to this wandb project")
    ap.add_argument("--fig3-run", help="run id whose head similarity graph to draw (default: first per model)")
    ap.add_argument("--fig3-layer", type=int, help="block of the head similarity graph (default: the middle one)")
    ap.add_argument("--fig3-tau", type=float, help="edge threshold on the JS distance (default: the block's median)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    paths = collect(a.runs, a.out, a.rows.split(",") if a.rows else None, a.cols.split(",") if a.cols else None, a.values,
                    a.wandb, a.fig3_run, a.fig3_layer, a.fig3_tau, a.where)
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
