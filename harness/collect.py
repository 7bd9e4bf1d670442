"""Records -> pandas -> paper-style tables (Markdown, LaTeX, CSV) and plots.

    python -m harness.collect                       # default tables from results/runs
    python -m harness.collect --rows metric,remedy --cols sparsity --values ppl.wikitext2
    harness collect --runs DIR --out results

Only complete records are read. Tables go to <out>/tables, plots to <out>/plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from harness import records
from harness.evaluate.zeroshot import TASKS

LOWER_IS_BETTER_PREFIX = ("ppl.",)


def frame(recs: list[dict]) -> pd.DataFrame:
    """One row per run with flat, human-named columns."""
    rows = []
    for r in recs:
        c, ev, p = r["config"], r.get("eval", {}), r["pruning"]
        row = {
            "model": c["model"]["name"], "metric": c["metric"]["name"], "remedy": c["remedy"]["name"],
            "allocation": c["allocation"]["name"], "calibration": c["calibration"]["dataset"],
            "n_samples": c["calibration"]["n_samples"], "sparsity": c["sparsity"], "sparsity_mode": c["sparsity_mode"],
            "sparsity_achieved": round(p["sparsity_achieved"], 4), "seed": c["seed"], "modules": "+".join(c["prune"]["modules"]),
            "heads_kept": sum(layer["heads_kept"] for layer in p["per_layer"]), "params": r["model"]["params_after"], "prune_seconds": p["seconds"],
            "run_id": r["run_id"],
        }
        for name, v in ev.get("ppl", {}).items():
            row[f"ppl.{name}"] = v["value"]
            row[f"ppl.{name}.tokens"] = v["tokens"]
        zs = ev.get("zeroshot", {})
        avg_metric = ev.get("zeroshot_protocol", {}).get("average_metrics", {})
        for task, v in zs.items():
            row[f"zs.{task}"] = v[avg_metric.get(task, "acc")] if v.get(avg_metric.get(task, "acc")) is not None else v["acc"]
        if "zeroshot_avg" in ev:
            row["zs.avg"] = ev["zeroshot_avg"]
        rows.append(row)
    return pd.DataFrame(rows)


def pivot(df: pd.DataFrame, rows: list[str], cols: list[str], values: str) -> pd.DataFrame:
    if values not in df:
        raise ValueError(f"no column {values!r} in the records; available: {', '.join(df.columns)}")
    return df.pivot_table(index=rows, columns=cols, values=values, aggfunc="mean")


def table3(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: methods (metric/remedy/allocation) x (sparsity, dataset) perplexities."""
    ppl_cols = [c for c in df.columns if c.startswith("ppl.") and not c.endswith(".tokens")]
    out = {}
    for model, sub in df.groupby("model"):
        t = sub.pivot_table(index=["metric", "remedy", "allocation"], columns="sparsity", values=ppl_cols, aggfunc="mean")
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
        out[f"{model}_{sparsity:g}"] = sub.groupby(["metric", "remedy", "allocation"])[cols].mean()
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


def _is_lower_better(name: str) -> bool:
    return "ppl" in str(name) or "wikitext2" in str(name) or "ptb" in str(name)


def write_table(t: pd.DataFrame, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    lower = {c: _is_lower_better(c) for c in t.columns}
    paths = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"]
    paths[0].write_text(t.to_markdown(floatfmt=".2f") + "\n")
    paths[1].write_text(to_latex(t, lower))
    t.to_csv(paths[2])
    return paths


def plot_ppl_vs_sparsity(df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for model, sub in df.groupby("model"):
        for col in [c for c in sub.columns if c.startswith("ppl.") and not c.endswith(".tokens")]:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for (metric, remedy, allocation), g in sub.groupby(["metric", "remedy", "allocation"]):
                g = g.groupby("sparsity")[col].mean().sort_index()
                ax.plot(g.index, g.values, marker="o", label=f"{metric}/{remedy}/{allocation}")
            ax.set(xlabel="sparsity", ylabel=f"{col.removeprefix('ppl.')} perplexity", yscale="log", title=model)
            ax.legend(fontsize=7)
            fig.tight_layout()
            for ext in ("png", "pdf"):
                p = out / f"ppl_vs_sparsity_{model}_{col.removeprefix('ppl.')}.{ext}"
                fig.savefig(p, dpi=150)
                paths.append(p)
            plt.close(fig)
    return paths


def collect(runs: Path, out: Path, rows: list[str] | None = None, cols: list[str] | None = None,
            values: str | None = None) -> list[Path]:
    recs = records.load_complete(runs)
    if not recs:
        raise SystemExit(f"no complete records under {runs}")
    df = frame(recs)
    tables = out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    df.to_csv(tables / "runs.csv", index=False)
    written = [tables / "runs.csv"]
    if rows and cols and values:
        written += write_table(pivot(df, rows, cols, values), tables, f"pivot_{values}")
    for model, t in table3(df).items():
        written += write_table(t, tables, f"table3_{model}")
    for key, t in table1(df).items():
        written += write_table(t, tables, f"table1_{key}")
    written += plot_ppl_vs_sparsity(df, out / "plots")
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="harness collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("results/runs"), help="folder of <hash>/result.json records")
    ap.add_argument("--out", type=Path, default=Path("results"), help="writes <out>/tables and <out>/plots")
    ap.add_argument("--rows", help="pivot rows, comma-separated (e.g. metric,remedy)")
    ap.add_argument("--cols", help="pivot columns (e.g. sparsity)")
    ap.add_argument("--values", help="pivot values (e.g. ppl.wikitext2, zs.avg)")
    a = ap.parse_args(argv)
    paths = collect(a.runs, a.out, a.rows.split(",") if a.rows else None, a.cols.split(",") if a.cols else None, a.values)
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
