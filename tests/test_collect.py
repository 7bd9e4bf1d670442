"""Paper layouts from synthetic records (tests/synthetic.py; the end-to-end sweep with its
collection is tests/test_run.py::test_cli_multirun_and_collect): Table 1 (grouped, in
percent), Table 2 (head-only), Table 3, Figure 3 (head graph), Figure 4, pivots."""

import itertools

import pytest

from harness import collect, records
from harness.collect import plots
from tests import synthetic

LLAMA = ["model=tiny-llama", "eval.efficiency=null"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """tiny-llama (6 blocks, 8 heads in KV groups of 2): head-only at ratio 0.25 and 0.5, and
    the whole model at 20% with 8 and 16 calibration sequences."""
    head_only = [*LLAMA, "prune.modules=[attention]", "sparsity_mode=module", "calibration.n_samples=8"]
    recs = [synthetic.record(*head_only, "sparsity=0.25", groups_removed=1, layers=6, divergence=True,
                             ppl={"wikitext2": 300.0, "ptb": 30.0}),
            synthetic.record(*head_only, "sparsity=0.5", groups_removed=2, layers=6, divergence=True,
                             ppl={"wikitext2": 600.0, "ptb": 60.0}),
            synthetic.record(*LLAMA, "sparsity=0.2", "calibration.n_samples=8", groups_removed=1, layers=6,
                             divergence=True),
            synthetic.record(*LLAMA, "sparsity=0.2", "calibration.n_samples=16", groups_removed=1, layers=6,
                             divergence=True, ppl={"wikitext2": 90.0, "ptb": 45.0})]
    return synthetic.write(tmp_path_factory.mktemp("runs"), recs)


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


def test_pivot_keeps_a_row_one_configuration_and_bolds_only_what_the_data_supports(tmp_path):
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
    # one run per cell and no per-window data: the runner-up cannot be tested, so it is not bold
    assert "\\textbf{10.00}" in lines["ours"] and "\\textbf" not in lines["l2"]
    assert "2 cell(s) could not be tested" in md.read_text() and "could not be tested" in tex.read_text()
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


def _accuracies(value: float) -> dict:
    from harness.data.zeroshot_tasks import TASKS

    return {task: value for task in TASKS}


def test_table1_groups_rows_as_the_paper_in_percent_with_the_dense_model_first(tmp_path):
    recs = [synthetic.record("sparsity=0", "metric=random", zeroshot=_accuracies(0.70), ppl={"wikitext2": 12.6, "ptb": 22.1}),
            synthetic.record("metric=ours", zeroshot=_accuracies(0.60)),
            synthetic.record("metric=taylor", zeroshot=_accuracies(0.55)),
            synthetic.record("metric=l2", zeroshot=_accuracies(0.50)),
            synthetic.record("metric=flap", "remedy=bias", zeroshot=_accuracies(0.58))]
    df = collect.frame(recs)
    (name, t), = collect.table1(df).items()
    assert name == "tiny-gpt2_0.2"
    assert t.index.get_level_values("family").tolist() == ["dense", "data-free", "training-aware",
                                                           "inference-aware", "inference-aware"]
    assert list(t.columns) == ["WikiText-2", "PTB", "BoolQ", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c",
                               "OBQA", "Avg"]
    assert t.xs("ours", level="metric")["Avg"].item() == pytest.approx(60.0)  # percent
    assert "mean of the seven accuracies (acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for HellaSwag, ARC-c, " \
           "OBQA)" in t.attrs["caption"]
    md, tex, _ = collect.write_table(t, tmp_path, "t1")
    assert md.read_text().startswith("tiny-gpt2 at 20% sparsity")
    rows = {line.split(" & ")[1].strip(): line for line in tex.read_text().splitlines() if line.count(" & ") > 5}
    assert "\\textbf{60.00 " in rows["ours"] and "\\textbf" not in rows["random"]  # dense is never marked best
    assert "\\caption{" in tex.read_text()


def test_table1_caption_names_only_the_tasks_evaluated():
    arc = {"arc_easy": 0.5, "arc_challenge": 0.3, "openbookqa": 0.3}
    recs = [synthetic.record("metric=ours", "remedy=recovery", "remedy.calibration.dataset=downstream", zeroshot=arc),
            synthetic.record("metric=ours", "remedy=recovery", zeroshot=arc)]
    (t,) = collect.table1(collect.frame(recs)).values()
    assert list(t.columns) == ["WikiText-2", "PTB", "ARC-e", "ARC-c", "OBQA", "Avg"]
    assert "mean of the 3 evaluated accuracies (acc for ARC-e; acc_norm for ARC-c, OBQA)" in t.attrs["caption"]
    # the recovery set labels the rows it tells apart
    assert t.index.get_level_values("remedy_data").tolist() == ["downstream/8", "same"]


def test_latex_escapes_labels_and_caption_and_draws_no_cline_clutter(tmp_path):
    recs = [synthetic.record("metric=second_moment", zeroshot=_accuracies(0.5)),
            synthetic.record("metric=ours", zeroshot=_accuracies(0.6))]
    (t,) = collect.table1(collect.frame(recs)).values()
    _, tex, _ = collect.write_table(t, tmp_path, "t1")
    text = tex.read_text()
    assert "second\\_moment" in text and "20\\% sparsity" in text and "acc\\_norm" in text
    assert "\\cline" not in text and "\\multirow" not in text and "\\textbf{60.00 " in text


def test_perplexity_plot_colours_metrics_styles_remedies_and_draws_the_dense_line(tmp_path, monkeypatch):
    recs = [synthetic.record("sparsity=0", "metric=random", ppl={"wikitext2": 10.0, "ptb": 5.0})]
    recs += [synthetic.record(f"metric={m}", f"remedy={r}", f"sparsity={s}",
                              ppl={"wikitext2": 20.0 * s + i, "ptb": 9.0 + s + i})
             for i, (m, r, s) in enumerate(itertools.product(["ours", "wanda", "l2"], ["none", "bias"], [0.2, 0.5]))]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, stem: figures.append((stem, fig.axes[0])) or [])
    plots.plot_ppl_vs(collect.frame(recs), tmp_path, "sparsity", ["modules", "calibration", "n_samples"], "ppl")
    stem, ax = next((stem, ax) for stem, ax in figures if stem.endswith("wikitext2"))
    curves = [line for line in ax.get_lines() if line.get_marker() not in (None, "None", "", "_")]  # "_": bar caps
    assert len(curves) == 6  # 3 metrics x 2 remedies; the dense run is not a curve
    assert len({line.get_color() for line in curves}) == 3 and len({line.get_linestyle() for line in curves}) == 2
    for metric in ("ours", "wanda", "l2"):  # one colour per metric, whatever its remedy
        assert len({c.get_color() for c in curves if plots._colour(metric) == c.get_color()}) == 1
    dense = [line for line in ax.get_lines() if list(line.get_ydata()) == [10.0, 10.0]]
    assert len(dense) == 1
    assert "dense 10.00" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_sparse_table_puts_patterns_side_by_side_under_the_dense_row(tmp_path):
    masked = ["sparsity=0.5", "eval.efficiency=null"]
    recs = [synthetic.record("sparsity=0", "metric=random", ppl={"wikitext2": 20.0, "ptb": 30.0}),
            synthetic.record(*masked, "sparsity_type=unstructured", "metric=sparsegpt", ppl={"wikitext2": 40.0, "ptb": 50.0}),
            synthetic.record(*masked, "sparsity_type=nm", "nm=2:4", "metric=sparsegpt", ppl={"wikitext2": 60.0, "ptb": 70.0}),
            synthetic.record(*masked, "sparsity_type=nm", "nm=2:4", "metric=mrp_m", ppl={"wikitext2": 55.0, "ptb": 65.0}),
            synthetic.record("sparsity=0.5", "metric=ours", ppl={"wikitext2": 900.0, "ptb": 900.0})]  # structured: not here
    df = collect.frame(recs)
    assert sorted(set(df["sparsity_type"])) == ["nm", "structured", "unstructured"]  # the config's values
    assert len(collect.where(df, ["sparsity_type=nm"])) == 2 and len(collect.where(df, ["nm=2:4"])) == 2
    (t3,) = collect.table3(df).values()  # the structured track only: a masked 50% is another thing
    assert list(t3.index.get_level_values("metric")) == ["ours", "random"] and "structured" in t3.attrs["caption"]
    assert set(df.loc[df["metric"] == "sparsegpt", "family"]) == {"inference-aware"}
    (name, t), = collect.table_sparse(df).items()
    assert list(t.columns) == ["50% ptb", "50% wikitext2", "2:4 ptb", "2:4 wikitext2"]
    assert list(t.index) == ["dense", "mrp_m", "sparsegpt"]
    assert t.loc["dense", "2:4 wikitext2"] == 20.0 and t.loc["sparsegpt", "50% ptb"] == 50.0
    assert t.loc["mrp_m", "2:4 ptb"] == 65.0 and t.isna().sum().sum() == 2  # mrp_m ran 2:4 only
    paths = collect.collect(synthetic.write(tmp_path / "runs", recs), tmp_path)
    assert tmp_path / "tables" / f"sparse_{name}.md" in paths


def test_hywia_rows_are_labelled_with_their_policy_and_lora_rows_are_retraining():
    recs = [synthetic.record("metric=hywia", "metric.params.policy=softmax"),
            synthetic.record("metric=taylor_mix", "finetune=lora")]
    df = collect.frame(recs)
    assert list(df["metric"]) == ["HyWIA-like (softmax)", "taylor"]
    assert list(df["family"]) == ["training-aware", "retraining"]
    assert list(df["finetune"]) == ["none", "lora(r=8,steps=64)"]


def test_a_dense_run_on_the_masking_track_is_the_dense_row_not_a_method():
    recs = [synthetic.record("sparsity=0", "sparsity_type=unstructured", "metric=magnitude", ppl={"wikitext2": 20.0}),
            synthetic.record("sparsity=0.5", "sparsity_type=unstructured", "metric=wanda", ppl={"wikitext2": 40.0})]
    (t,) = collect.table_sparse(collect.frame(recs)).values()
    assert list(t.index) == ["dense", "wanda"] and list(t.columns) == ["50% wikitext2"] and t.index.name == "method"


def test_parameter_labels_keep_a_zero_and_drop_unset_values():
    from harness.collect.frame import _params

    assert _params({"tau": 0, "alpha": 0.0, "data_free": False, "policy": None}) == "alpha=0.0,tau=0"
    assert _params({"data_free": False}) == "-"


def test_the_depth_table_puts_width_and_depth_side_by_side_labelled_by_track(tmp_path):
    """Thinner or shallower: structured and depth runs at the same target in one table whose rows
    name their track and whose `removed` columns give the fraction each run removed."""
    recs = [synthetic.record("sparsity=0.2", "metric=ours", ppl={"wikitext2": 40.0, "ptb": 50.0}),
            synthetic.record("sparsity=0.2", "sparsity_type=depth", "metric=shortgpt", ppl={"wikitext2": 90.0, "ptb": 95.0}),
            synthetic.record("sparsity=0.2", "sparsity_type=depth", "metric=angular", "remedy=replaceme",
                             ppl={"wikitext2": 70.0, "ptb": 75.0}),
            synthetic.record("sparsity=0.5", "sparsity_type=unstructured", "metric=wanda")]  # masked: not here
    df = collect.frame(recs)
    assert set(df.loc[df["sparsity_type"] == "depth", "family"]) == {"inference-aware"}
    (name, t), = collect.table_depth(df).items()
    assert list(t.index.get_level_values("sparsity_type")) == ["depth", "depth", "structured"]
    assert t.loc[("depth", "shortgpt", "none", "uniform"), "0.2 wikitext2"] == 90.0
    assert "0.2 removed" in t.columns and "width" in t.attrs["caption"]
    assert collect.table_sparse(df)[name].index.tolist() == ["wanda"]  # the depth runs stay out of the masked table
    paths = collect.collect(synthetic.write(tmp_path / "runs", recs), tmp_path)
    assert tmp_path / "tables" / f"depth_{name}.md" in paths


def test_the_frame_keeps_each_runs_wall_time_from_its_record_timestamps():
    """`run_seconds` (runs.csv) is finished_at - started_at, loading and evaluation included; a
    record without both timestamps has none."""
    timed = {**synthetic.record(*LLAMA, "sparsity=0.2", groups_removed=1, layers=6),
             "started_at": "2026-12-08T00:27:06+00:00", "finished_at": "2026-12-08T01:02:51+00:00"}
    untimed = {k: v for k, v in timed.items() if k != "finished_at"}
    df = collect.frame([timed, untimed])
    assert df["run_seconds"].iloc[0] == 35 * 60 + 45
    assert df["run_seconds"].isna().iloc[1]
