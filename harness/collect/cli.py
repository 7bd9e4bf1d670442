"""Records -> pandas -> paper-style tables (Markdown, LaTeX, CSV) and plots.

    python -m harness.collect                       # default tables from results/runs
    python -m harness.collect --rows metric,remedy --cols sparsity --values ppl.wikitext2
    harness collect --runs DIR --out results
    harness collect --wandb ENTITY/PROJECT          # also the records uploaded to a wandb project
    harness collect --where model=smollm2-135m --where "remedy_params=-|damp=0.01,toward=zero" --out DIR
    harness collect --compare metric=ours,remedy=none metric=flap,remedy=bias   # paired, per seed and across

Only complete records are read. Tables go to <out>/tables, plots to <out>/plots:
Table 1 (methods x perplexities, 7 tasks, average; runs with zero-shot), Table 2 (head-only
pruning: pruned heads x perplexities), Table 3 (methods x sparsity x datasets), runs.csv,
the scale table (methods x models, perplexity as a ratio to each model's dense run; where 2+
models were pruned at one sparsity), perplexity vs sparsity, perplexity vs calibration size
(Figure 4, where a sweep varies n_samples), that ratio vs model size and the head-similarity
graph of one block (Figure 3, runs whose metric measured head divergences). Cells show
mean +- sd (n) over seeds or one run's 95% interval; the best of each column and every cell
not significantly worse than it are bold.

`--compare A B` writes no tables: it pairs the runs of A and B that agree on everything else
(same model, sparsity, seed, evaluation windows, ...) and prints, per pair, ppl_A/ppl_B and
acc_A - acc_B with paired 95% intervals (windows / questions), then the same across seeds
(t interval of the per-seed differences); <out>/tables/compare_*.{md,csv} keep them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from harness import records
from harness.collect import compare as comparison
from harness.collect import sources
from harness.collect.frame import frame, public, where
from harness.collect.plots import figure3_records, plot_head_graph, plot_ppl_vs, plot_ratio_vs_size
from harness.collect.scale import ratio_frame, table_scale
from harness.collect.tables import (
    is_lower_better,
    pivot,
    table1,
    table2,
    table3,
    table_depth,
    table_sparse,
    write_table,
)


def collect(runs: Path, out: Path, rows: list[str] | None = None, cols: list[str] | None = None,
            values: str | None = None, wandb_project: str | None = None, fig3_run: str | None = None,
            fig3_layer: int | None = None, fig3_tau: float | None = None, conditions: list[str] = (),
            compare: tuple[str, str] | None = None) -> list[Path]:
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
    if compare:
        return write_comparison(df, tables, *compare)
    public(df).to_csv(tables / "runs.csv", index=False)
    written = [tables / "runs.csv"]
    if rows and cols and values:
        written += write_table(pivot(df, rows, cols, values), tables, f"pivot_{values}", is_lower_better(values))
    for model, t in table3(df).items():
        written += write_table(t, tables, f"table3_{model}")
    for key, t in table1(df).items():
        written += write_table(t, tables, f"table1_{key}")
    for model, t in table2(df).items():
        written += write_table(t, tables, f"table2_{model}")
    for model, t in table_sparse(df).items():
        written += write_table(t, tables, f"sparse_{model}")
    for model, t in table_depth(df).items():
        written += write_table(t, tables, f"depth_{model}")
    ratios = ratio_frame(df)
    for sparsity, t in table_scale(ratios).items():
        written += write_table(t, tables, f"scale_{sparsity}")
    plots = out / "plots"
    written += plot_ppl_vs(df, plots, "sparsity", ["modules", "calibration", "n_samples"], "ppl_vs_sparsity")
    written += plot_ppl_vs(df, plots, "n_samples", ["modules", "calibration", "sparsity"], "ppl_vs_calibration")
    written += plot_ratio_vs_size(ratios, plots)
    for rec in figure3_records(recs, fig3_run):
        written += plot_head_graph(rec, plots, fig3_layer, fig3_tau)
    return written


def write_comparison(df, tables: Path, a: str, b: str) -> list[Path]:
    """Print and write the paired comparison of the runs matching `a` and `b` (compare.py)."""
    side_a, side_b = comparison.parse_side(a), comparison.parse_side(b)
    try:
        pairs, seeds = comparison.compare(df, side_a, side_b)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    keys = comparison.pair_keys(df, side_a, side_b)
    values = [v for v in comparison.values_of(df) if v in pairs]
    text = (f"A = {a}\nB = {b}\nPer pair (same {', '.join(keys)}): ppl A/B and accuracy A-B in points, paired 95% "
            f"interval over windows / questions; * = the interval excludes 0 (ratio 1).\n\n"
            f"{comparison.markdown(pairs, keys, values)}\n\nAcross seeds (t interval of the per-seed differences; "
            f"needs 2+ seeds; * = it excludes no change and so does the seed-averaged difference's paired interval "
            f"over the shared windows / questions, in the CSV as eval_low / eval_high):\n\n"
            f"{comparison.markdown(seeds, keys, values)}\n")
    print(text)
    stem = "compare_" + "_vs_".join(side.replace("=", "-").replace(",", "_") for side in (a, b))
    paths = [tables / f"{stem}.md", tables / f"{stem}_pairs.csv", tables / f"{stem}_seeds.csv"]
    paths[0].write_text(text)
    pairs.to_csv(paths[1], index=False)
    seeds.to_csv(paths[2], index=False)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="harness collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("results/runs"), help="folder of <hash>/result.json records")
    ap.add_argument("--out", type=Path, default=Path("results"), help="writes <out>/tables and <out>/plots")
    ap.add_argument("--rows", help="pivot rows, comma-separated (e.g. metric,remedy)")
    ap.add_argument("--cols", help="pivot columns (e.g. sparsity)")
    ap.add_argument("--values", help="pivot values (e.g. ppl.wikitext2, zs.avg)")
    ap.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE[|VALUE]",
                    help="only runs matching (repeatable; columns as in runs.csv)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"),
                    help="paired comparison of two methods, each COLUMN=VALUE[,COLUMN=VALUE] (e.g. metric=ours "
                         "metric=flap,remedy=bias); writes no tables")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the records uploaded to this wandb project")
    ap.add_argument("--fig3-run", help="run id whose head similarity graph to draw (default: first per model)")
    ap.add_argument("--fig3-layer", type=int, help="block of the head similarity graph (default: the middle one)")
    ap.add_argument("--fig3-tau", type=float, help="edge threshold on the JS distance (default: the block's median)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    paths = collect(a.runs, a.out, a.rows.split(",") if a.rows else None, a.cols.split(",") if a.cols else None, a.values,
                    a.wandb, a.fig3_run, a.fig3_layer, a.fig3_tau, a.where, tuple(a.compare) if a.compare else None)
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
