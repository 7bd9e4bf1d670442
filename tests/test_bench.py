"""The benchmark script runs end to end at tiny sizes; its exponent fit is exact on power laws."""

import json

import pytest
import torch

from bench.run import fit_exponent, run


def test_fit_exponent_recovers_a_power_law():
    xs = [4, 8, 16, 32]
    assert fit_exponent(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert fit_exponent(xs, [0.5 * x for x in xs]) == pytest.approx(1.0)


def test_smoke_benchmark_writes_json_and_markdown(tmp_path):
    result = run(smoke=True, out=tmp_path)
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["fits"].keys() == {"none", "recovery"}
    assert {c["metric"] for c in on_disk["metrics"]} >= {"ours", "taylor", "flap", "wanda", "random"}
    assert all(c["seconds"] > 0 and c["per_block_seconds"]["forward"] > 0 for c in result["metrics"])
    assert [s["sparsity"] for s in result["speed"]] == [0.0, 0.2, 0.5]
    assert result["speed"][2]["params"] < result["speed"][0]["params"]
    assert "## Scaling (ours)" in (tmp_path / "bench.md").read_text()
    targets = on_disk["ours_targets"]["llama-shaped h256 x4"]
    low, high = targets["range"]["ours_over_flap"]
    assert low <= targets["ours_over_flap"] <= high and low > 0  # a median of per-repeat ratios
    assert targets["statistics_scoring_in_block_forwards"] > 0 and targets["repeats"] == 3
    assert targets["floor_ratio"] > targets["floor_without_solves"] > 1
    assert "floor without the solves" in (tmp_path / "bench.md").read_text()


def test_recovery_floor_counts_every_fit_but_block_0_attention():
    from bench.recovery_floor import recovery_floor

    arithmetic = {"attention": {"moments": 1.0, "solves": 2.0}, "mlp": {"moments": 3.0, "solves": 4.0}}
    floor = recovery_floor({"blocks": 3, "seconds": 10.0}, 1.0, arithmetic)
    # products 2 x 1 + 3 x 3 = 11, solves 2 x 2 + 3 x 4 = 16; 10 + 3 plain forwards + 11 = 24
    assert floor == pytest.approx({"without_solves": 2.4, "ratio": 4.0, "products_s_per_block": 11 / 3,
                                   "solves_s_per_block": 16 / 3})


def test_recovery_arithmetic_times_the_fits_recovery_makes(monkeypatch):
    """The floor's products and solves are those of a real recovery run: the same moment
    shapes (width, intercept, targets) per block, and the model it reads is left untouched."""
    import torch

    from bench.recovery_floor import recovery_arithmetic
    from bench.run import named_model
    from harness import metrics
    from harness.prune import PruneSettings, prune
    from harness.remedy.recovery import CrossMoments

    built = []
    original = CrossMoments.__init__

    def recording(self, width, augment, dtype, device, targets=None):
        built.append((width, augment, targets))
        original(self, width, augment, dtype, device, targets)

    monkeypatch.setattr(CrossMoments, "__init__", recording)
    model = named_model("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = recovery_arithmetic(model, 3, 16, torch.device("cpu"), repeats=1)
    assert seconds.keys() == {"attention", "mlp"}
    assert all(s["moments"] > 0 and s["solves"] > 0 for s in seconds.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    floor_fits, built[:] = list(built), []
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    prune(model, ids, metrics.build("ours"), PruneSettings(sparsity=0.2, sparsity_mode="module", remedy="recovery"),
          torch.device("cpu"))
    # block 0 re-fits its MLP only (nothing was cut before its attention), then block 1 all four
    # fits, each before its own cut: block 0's widths
    assert len(floor_fits) == 8 and built[2:6] == floor_fits[:4] == floor_fits[4:]  # two rounds


def test_smoke_export_speed_measures_dense_and_pruned_in_plain_transformers(tmp_path):
    from bench.export_speed import run as export_speed

    rows = export_speed(smoke=True, out=tmp_path)["rows"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.2, 0.5] and rows[0]["route"] == "dense"
    assert rows[2]["params"] < rows[1]["params"] < rows[0]["params"]
    assert all(r["forward_tokens_per_s_batch8"] > 0 and r["generate_seconds"] > 0 for r in rows)
    assert "| speed-up |" in (tmp_path / "export_speed.md").read_text()


def test_smoke_uncertainty_cost_times_both_loops_and_a_collection(tmp_path):
    from bench.run import named_model
    from bench.uncertainty_cost import batch_sum_perplexity
    from bench.uncertainty_cost import run as uncertainty_cost
    from harness.evaluate.perplexity import perplexity_of

    model = named_model("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (4 * 128,), generator=torch.Generator().manual_seed(0))
    # the reference loop it is timed against computes the same perplexity
    assert batch_sum_perplexity(model, ids, 128, 3) == pytest.approx(perplexity_of(model, ids, 128, 3)[0], rel=1e-6)
    r = uncertainty_cost(smoke=True, out=tmp_path)
    assert r["perplexity"]["ratio"] > 0 and r["zeroshot"]["ratio"] > 0 and r["collect"]["records"] == 20
    assert "Collecting 20 full-size records" in (tmp_path / "uncertainty.md").read_text()


def test_named_models_load_from_the_config_tree():
    from bench.run import named_model

    assert named_model("tiny-llama").config.model_type == "llama"


def test_the_prepared_gpu_check_runs_end_to_end_in_smoke_mode(tmp_path):
    """bench/gpu.py on tiny sizes (a CPU here): every stage, both files; parity compares a
    device with itself, so it must find the same units (the real check runs on a lent GPU)."""
    from bench.gpu import main as gpu_check

    gpu_check(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["metric"], r["remedy"]) for r in result["resident"]] == [
        ("ours", "none"), ("ours", "recovery"), ("flap", "none"), ("wanda", "none"), ("taylor", "none")]
    assert result["blockwise"]["placement"] == "blockwise" and result["blockwise"]["seconds"] > 0
    assert [r["same_removed_units"] for r in result["parity"]] == [True] * 4
    assert result["finished"] == ["parity", "resident", "blockwise"]
    report = (tmp_path / "gpu.md").read_text()
    assert "| blockwise | ours | none |" in report and "- ours, resident, whole model:" in report
    seconds = {(r["metric"], r["remedy"]): r["seconds"] for r in result["resident"]}
    ratio = seconds[("ours", "recovery")] / seconds[("ours", "none")]
    assert f"- ours+recovery / ours, resident: {ratio:.2f} (set on the CPU: <= 2, " in report
    assert f"- ours / flap, resident: {seconds[('ours', 'none')] / seconds[('flap', 'none')]:.2f}" in report


def test_gpu_targets_read_only_the_rows_that_were_measured():
    from bench.gpu import targets

    rows = [{"metric": "ours", "remedy": "none", "seconds": 120.0}, {"metric": "flap", "remedy": "none", "seconds": 100.0},
            {"metric": "ours", "remedy": "recovery", "error": "OutOfMemoryError: ..."}]
    assert targets({"resident": rows, "blockwise": {"peak_gpu_gb": 20.0}}) == [
        "- ours, resident, whole model: 120.0 s (target < 180 s: met)",
        "- ours, block-wise, peak GPU memory: 20.0 GB (target < 16 GB: NOT met)",
        "- ours / flap, resident: 1.20 (set on the CPU: <= 1.2, met)"]


def test_a_failing_gpu_check_case_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    """One call on a lent machine must bring back every case it could run: a case that raises
    (out of GPU memory, say) is a row with its error, the files are written, the exit is 1."""
    import bench.gpu as gpu

    monkeypatch.setattr(gpu, "METHODS", [("ours", "none"), ("no-such-metric", "none"), ("flap", "none")])
    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--smoke", "--out", str(tmp_path)])
    assert exit_.value.code == 1
    result = json.loads((tmp_path / "gpu.json").read_text())
    failed = result["resident"][1]
    assert failed["metric"] == "no-such-metric" and "no-such-metric" in failed["error"]
    assert result["resident"][2]["seconds"] > 0 and result["finished"] == ["parity", "resident", "blockwise"]
    assert "no-such-metric | none | - | - | - | ConfigError" in (tmp_path / "gpu.md").read_text()


def test_smoke_lazy_memory_prunes_a_sharded_checkpoint_in_a_fresh_process(tmp_path):
    from bench.lazy_memory import run as lazy_memory

    r = lazy_memory(smoke=True, out=tmp_path)
    assert r["params_after"] < r["params_before"] and r["peak_rss"] >= r["baseline_rss"] > 0
    assert r["bytes"]["checkpoint"] == r["bytes"]["block"] * r["shape"]["num_hidden_layers"] + r["bytes"]["outside"] + r["bytes"]["head"]
    assert "peak RSS while pruning" in (tmp_path / "lazy_memory.md").read_text()


def test_smoke_lazy_real_runs_the_harness_resident_and_lazy_with_one_result(tmp_path):
    """The two runs are separate processes, each measured; their records must agree (the same
    units removed, parameters and perplexity) and the report says so."""
    from bench.lazy_real import run as lazy_real

    r = lazy_real(smoke=True, out=tmp_path)
    assert r["same_units_removed"] and r["same_params"] and r["params_after"] < r["params_before"]
    assert r["lazy_setting"] == {"resident": False, "lazy": True}  # each run took the setting it reports
    assert r["ppl_abs_difference"] < 1e-3 * r["ppl"]["resident"]
    assert r["resident"]["peak_rss"] > 100 * 2**20 and r["lazy"]["peak_rss"] > 100 * 2**20  # torch alone
    assert r["lazy"]["seconds"] > r["lazy"]["prune_seconds"] > 0
    assert f"{r['ppl']['lazy']:.4f}" in (tmp_path / "lazy_real.md").read_text()


def test_smoke_depth_cost_counts_each_method_and_the_searches_against_the_references(tmp_path):
    from bench.depth_cost import run as depth_cost

    r = depth_cost(smoke=True, out=tmp_path)
    by = {m["method"]: m for m in r["methods"]}
    assert by["last"]["full_forwards"] == 0 and by["shortgpt"]["full_forwards"] == 1.0
    for search in ("sleb", "blockpruner"):
        assert 0 < by[search]["full_forwards"] < r["reference_full_forwards"][search]
    assert "blockpruner as the reference runs it" in (tmp_path / "depth.md").read_text()


def test_smoke_serving_speed_times_the_dense_model_in_plain_transformers(tmp_path):
    from bench.serving import run as serving

    r = serving(smoke=True, out=tmp_path)
    speed = r["rows"]["dense"]["transformers"]
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0 and r["engines"] == ["transformers"]
    assert "| dense |" in (tmp_path / "serving.md").read_text()
