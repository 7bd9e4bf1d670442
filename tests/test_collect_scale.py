"""The scale table and plot (collect/scale.py) from synthetic records: the ratio to dense and
its interval equal a hand computation from the stored windows, models come smallest first,
a row spans models whose width runs used different attention units (but two units within one
model split it), each ratio divides by a dense run on the same windows and dtype, and masked
runs (which remove no parameters) are left out."""

import json
import math

import numpy as np
import pytest

from harness import collect, uncertainty
from harness.collect.cells import RAW
from harness.collect.cli import collect as collect_runs
from harness.collect.scale import ratio_frame, table_scale
from tests import synthetic

# (model, dense parameters, dense ppl, ours ppl, flap ppl): two models given as if of different sizes
MODELS = [("tiny-llama", 9_000_000, 40.0, 90.0, 70.0), ("tiny-gpt2", 2_000_000, 60.0, 300.0, 150.0)]


def _record(model: str, params: int, metric: str, ppl: float, *overrides: str, windows: int = 64) -> dict:
    sparsity = "sparsity=0" if metric == "dense" else "sparsity=0.2"
    r = synthetic.record(f"model={model}", sparsity, f"metric={'random' if metric == 'dense' else metric}",
                         *overrides, ppl={"wikitext2": ppl, "ptb": ppl / 2}, zeroshot={"arc_easy": 0.5},
                         draw=7 if metric == "dense" else 8, windows=windows)  # other difficulty: the ratio varies
    r["model"]["params_before"] = params
    return r


def _records(*extra: str) -> list[dict]:
    recs = []
    for model, params, dense, ours, flap in MODELS:
        unit = ["prune.attention_unit=query_head"] if model == "tiny-gpt2" else []
        recs += [_record(model, params, "dense", dense), _record(model, params, "ours", ours, *unit, *extra),
                 _record(model, params, "flap", flap, *unit, *extra)]
    return recs


def test_ratio_and_its_interval_are_the_paired_windows_against_the_dense_run():
    df = collect.frame(_records())
    ratios = ratio_frame(df)
    assert len(ratios) == 4 and (ratios["sparsity"] > 0).all()
    for model, _, dense, ours, _ in MODELS:
        row = ratios[(ratios["model"] == model) & (ratios["metric"] == "ours")].iloc[0]
        dense_row = df[(df["model"] == model) & (df["sparsity"] == 0)].iloc[0]
        nll, per_window, _ = row[RAW + "ppl.wikitext2"]
        nll_dense = uncertainty.decode_floats(dense_row[RAW + "ppl.wikitext2"][0])
        by_hand = math.exp((uncertainty.decode_floats(nll).sum() - nll_dense.sum()) / (len(nll_dense) * per_window))
        assert row["ppl.wikitext2"] == pytest.approx(ours / dense) == pytest.approx(by_hand)
        reference = uncertainty.paired_ppl_ratio(uncertainty.decode_floats(nll), nll_dense, per_window)
        assert (row["ppl.wikitext2.low"], row["ppl.wikitext2.high"]) == (reference["low"], reference["high"])
        assert row["ppl.wikitext2.low"] < ours / dense < row["ppl.wikitext2.high"]


def test_scale_table_orders_models_by_size_and_keeps_one_row_per_method(tmp_path):
    tables = table_scale(ratio_frame(collect.frame(_records())))
    t = tables["0.2"]
    assert list(t.columns) == ["tiny-gpt2 wikitext2 x dense", "tiny-gpt2 ptb x dense", "tiny-gpt2 zero-shot avg",
                               "tiny-llama wikitext2 x dense", "tiny-llama ptb x dense", "tiny-llama zero-shot avg"]
    assert len(t) == 2  # ours and flap: the models' different attention units do not split a method
    assert t.xs("flap", level="metric")["tiny-gpt2 wikitext2 x dense"].item() == pytest.approx(150 / 60)
    assert "tiny-gpt2 2M" in t.attrs["caption"] and "query_head" in t.attrs["caption"]
    md = collect.write_table(t, tmp_path, "scale_0.2")[0].read_text()
    assert "2.50 [" in md


def test_scale_needs_two_models_and_the_dense_run_on_the_same_windows():
    recs = _records()
    one_model = [r for r in recs if r["config"]["model"]["name"] == "tiny-llama"]
    assert table_scale(ratio_frame(collect.frame(one_model))) == {}
    other_windows = [r for r in recs if r["config"]["sparsity"] == 0] + [
        _record("tiny-llama", 9_000_000, "ours", 90.0, "eval.ppl.max_tokens=512")]
    assert ratio_frame(collect.frame(other_windows)).empty


def test_each_ratio_divides_by_a_dense_run_on_the_same_windows_and_dtype():
    pruned = _record("tiny-llama", 9_000_000, "ours", 90.0)
    other_windows = _record("tiny-llama", 9_000_000, "dense", 50.0, windows=32)
    same_windows = _record("tiny-llama", 9_000_000, "dense", 40.0)
    row = ratio_frame(collect.frame([other_windows, same_windows, pruned])).iloc[0]
    assert row["ppl.wikitext2"] == pytest.approx(90 / 40) and row["dense.ppl.wikitext2"] == 40.0
    assert math.isnan(ratio_frame(collect.frame([other_windows, pruned])).iloc[0]["ppl.wikitext2"])
    bf16 = _record("tiny-llama", 9_000_000, "ours", 90.0, "dtype=bfloat16")
    assert ratio_frame(collect.frame([same_windows, bf16])).empty


def test_masked_runs_are_not_in_the_scale_table_and_two_units_of_one_model_split_a_row():
    recs = _records()
    recs.append(_record("tiny-llama", 9_000_000, "wanda", 70.0, "sparsity_type=unstructured"))
    recs.append(_record("tiny-llama", 9_000_000, "ours", 60.0, "prune.attention_unit=query_head"))
    t = table_scale(ratio_frame(collect.frame(recs)))["0.2"]
    assert "unstructured" not in t.index.get_level_values("sparsity_type")
    assert "attention_unit" in t.index.names and len(t) == 4  # flap and ours, each by KV group and by query head
    ours = t.xs("ours", level="metric")["tiny-llama wikitext2 x dense"]
    assert ours.xs("query_head", level="attention_unit").item() == pytest.approx(60 / 40)
    assert ours.xs("kv_group", level="attention_unit").item() == pytest.approx(90 / 40)


def test_seeds_average_as_ratios_and_the_collector_writes_table_and_plot(tmp_path):
    recs = _records()
    recs.append(_record("tiny-llama", 9_000_000, "ours", 100.0, "seed=1"))
    for r in recs:
        (tmp_path / "runs" / r["run_id"]).mkdir(parents=True)
        (tmp_path / "runs" / r["run_id"] / "result.json").write_text(json.dumps(r))
    written = collect_runs(tmp_path / "runs", tmp_path)
    names = {p.name for p in written}
    assert {"scale_0.2.md", "ppl_ratio_vs_size_0.2_wikitext2.png"} <= names
    t = table_scale(ratio_frame(collect.frame(recs)))["0.2"]
    cell = t.attrs["cells"].loc[("structured", "ours", "none", "uniform"), "tiny-llama wikitext2 x dense"]
    assert cell.n == 2 and cell.mean == pytest.approx(np.mean([90 / 40, 100 / 40]))
