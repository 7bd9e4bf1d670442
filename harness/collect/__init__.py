"""Records -> tables and figures: frame.py (records -> one row per run), tables.py (Tables 1-3,
pivots), plots.py (Figures 3 and 4, perplexity vs sparsity), sources.py (records in a wandb
project), cli.py (`harness collect`), callbacks.py (collect when a sweep ends)."""

from harness.collect.cli import collect, main
from harness.collect.frame import frame, rows_of, where
from harness.collect.plots import plot_head_graph, plot_ppl_vs
from harness.collect.tables import (
           pivot,
           table1,
           table2,
           table3,
           table_depth,
           table_sparse,
           to_latex,
           write_table,
)

__all__ = ["collect", "frame", "main", "pivot", "plot_head_graph", "plot_ppl_vs", "rows_of", "table1", "table2",
           "table3", "table_depth", "table_sparse", "to_latex", "where", "write_table"]
