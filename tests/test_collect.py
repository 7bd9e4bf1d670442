"""Paper layouts from real (tiny) runs: Table 2 (head-only), Figure 3 (head graph), Figure 4."""

import pytest

from harness import collect, records
from harness.collect import plots
from harness.config import compose
from harness.run import run

FAST = ["+debug=fast", "model=tiny-llama", "eval.efficiency=null"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    sweep = [["prune.modules=[attention]", "sparsity_mode=module", "sparsity=0.25", "calibration.n_samples=8"],
             ["prune.modules=[attention]", "sparsity_mode=module", "sparsity=0.5", "calibration.n_samples=8"],
             ["sparsity=0.2", "calibration.n_samples=8"],
             ["sparsity=0.2", "calibration.n_samples=16"]]
    for overrides in sweep:
        run(compose(*FAST, f"out_dir={out}", *overrides))
    return out


def test_table2_counts_pruned_heads(runs):
    df = collect.frame(records.load_complete(runs))
    t = collect.table2(df)["tiny-llama"]
    # 6 blocks x 8 heads in KV groups of 2: ratio 0.25 removes 1 of 4 groups per block = 12 heads, 0.5 = 24
    assert list(t.columns) == ["12 heads ptb", "12 heads wikitext2", "24 heads ptb", "24 heads wikitext2"]
    assert t.index.tolist() == [("ours", "none", "uniform")]


def test_collect_writes_figures_3_and_4(runs, tmp_path):
    written = {p.name for p in collect.collect(runs, tmp_path)}
    assert "table2_tiny-llama.tex" in written
    assert "ppl_vs_calibration_tiny-llama_attention+mlp_c4_0.2_wikitext2.png" in written
    assert any(n.startswith("head_similarity_tiny-llama_block3_") and n.endswith(".pdf") for n in written)


def test_head_graph_rejects_a_block_without_divergences(runs, tmp_path):
    rec = records.load_complete(runs)[0]
    with pytest.raises(ValueError, match="no head divergences for block 99"):
        collect.plot_head_graph(rec, tmp_path, layer=99)


def test_removed_groups_map_to_their_heads(runs):
    rec = next(r for r in records.load_complete(runs) if r["config"]["sparsity"] == 0.5)
    layer = rec["pruning"]["per_layer"][0]
    assert len(layer["head_divergence"]) == 8
    assert plots._heads_per_unit(layer, 8) == 2 and layer["heads_kept"] == 4


def test_tables_never_average_different_settings(runs):
    """Runs that differ in calibration size (or head-only vs full) get their own rows."""
    df = collect.frame(records.load_complete(runs))
    t = collect.table3(df)["tiny-llama"]
    assert t.index.names == ["metric", "remedy", "allocation", "n_samples", "sparsity_mode"]
    full = t.xs("model", level="sparsity_mode")  # the two full-model runs (head-only ones are module mode)
    assert sorted(full.index.get_level_values("n_samples")) == [8, 16]
    assert full["0.2 wikitext2"].notna().all()


def test_where_filters_runs_and_names_bad_columns(runs, tmp_path):
    df = collect.frame(records.load_complete(runs))
    assert set(collect.where(df, ["n_samples=16|99"])["n_samples"]) == {16}
    assert len(collect.where(df, ["modules=attention", "sparsity=0.5"])) == 1
    with pytest.raises(ValueError, match="bad --where 'nope=1'"):
        collect.where(df, ["nope=1"])
    written = collect.collect(runs, tmp_path, conditions=["modules=attention+mlp"])
    assert not any(p.name.startswith("table2_") for p in written)


def _frame(rows):
    import pandas as pd

    return pd.DataFrame([dict(zip(["metric", "remedy", "remedy_params", "sparsity", "ppl.wikitext2"], r, strict=True),
                              model="m", allocation="uniform") for r in rows])


def test_pivot_keeps_a_row_one_configuration_and_bolds_the_lowest_perplexity(tmp_path):
    df = _frame([("ours", "none", "-", 0.2, 10.0), ("ours", "recovery", "damp=0.01", 0.2, 30.0),
                 ("l2", "none", "-", 0.2, 20.0), ("l2", "recovery", "damp=0.01", 0.2, 40.0)])
    # remedy as a column: its parameters follow the column, they are not a row level
    t = collect.pivot(df, ["metric"], ["sparsity", "remedy"], "ppl.wikitext2")
    assert t.index.names == ["metric"] and t.loc["ours", (0.2, "recovery")] == 30.0
    # remedy neither row nor column: it becomes a row level instead of averaging none with recovery
    assert collect.pivot(df, ["metric"], ["sparsity"], "ppl.wikitext2").index.names == ["metric", "remedy"]
    md, tex, _ = collect.write_table(t, tmp_path, "p", lower_better=True)
    assert "| metric   |   0.2 none |   0.2 recovery |" in md.read_text()
    lines = {line.split(" & ")[0]: line for line in tex.read_text().splitlines() if " & " in line}
    assert "\\textbf{10.00}" in lines["ours"] and "\\underline{20.00}" in lines["l2"]
    assert "\\multicolumn{2}{r}{0.2}" in lines["sparsity"]


def test_pivot_splits_rows_whose_parameters_differ_within_a_column():
    df = _frame([("ours", "recovery", "damp=0.01", 0.2, 30.0), ("ours", "recovery", "damp=0.1", 0.2, 50.0)])
    t = collect.pivot(df, ["metric"], ["sparsity", "remedy"], "ppl.wikitext2")
    assert t.index.names == ["metric", "remedy_params"] and sorted(t[(0.2, "recovery")]) == [30.0, 50.0]


def test_pivot_splits_rows_by_attention_unit():
    df = _frame([("ours", "none", "-", 0.2, 30.0), ("ours", "none", "-", 0.2, 50.0)])
    df["attention_unit"] = ["kv_group", "query_head"]
    t = collect.pivot(df, ["metric"], ["sparsity"], "ppl.wikitext2")
    assert t.index.names == ["metric", "attention_unit"] and t.loc[("ours", "query_head"), 0.2] == 50.0
