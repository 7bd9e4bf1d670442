"""Seeds, intervals and paired tests in the collector, from synthetic records (tests/synthetic.py):
mean +- sd (n) equals numpy, the CSV keeps mean / sd / n / interval columns, bold goes to the best
cell and to every cell not significantly worse, --compare pairs runs by seed, and records from
before per-window data still collect."""

import math

import numpy as np
import pytest

from harness import collect, records, uncertainty
from harness.collect import plots
from harness.collect.cli import main as collect_main
from tests import synthetic

SEEDS = range(5)


def _seeded(metric: str, values: list[float], *overrides: str, **kw) -> list[dict]:
    return [synthetic.record(f"metric={metric}", f"seed={s}", *overrides, ppl={"wikitext2": v, "ptb": v / 2}, **kw)
            for s, v in zip(SEEDS, values, strict=True)]


OURS = [252.2, 248.0, 256.9, 250.1, 253.7]
FLAP = [253.0, 249.5, 257.2, 251.0, 255.0]  # ~ +1 on every seed: paired by seed, a consistent loss
L2 = [400.0, 390.0, 410.0, 420.0, 405.0]


def test_seeds_aggregate_as_mean_sd_n_in_every_format(tmp_path):
    df = collect.frame(_seeded("ours", OURS) + _seeded("l2", L2))
    t = collect.table3(df)["tiny-gpt2"]
    cell = t.attrs["cells"].loc[("ours", "none", "uniform"), "0.2 wikitext2"]
    assert (cell.mean, cell.std, cell.n) == (pytest.approx(np.mean(OURS)), pytest.approx(np.std(OURS, ddof=1)), 5)
    assert t.loc[("ours", "none", "uniform"), "0.2 wikitext2"] == pytest.approx(np.mean(OURS))
    md, tex, csv = collect.write_table(t, tmp_path, "t3")
    assert f"{np.mean(OURS):.2f} ± {np.std(OURS, ddof=1):.2f} (5)" in md.read_text()
    assert f"${np.mean(OURS):.2f} \\pm {np.std(OURS, ddof=1):.2f}$ (5)" in tex.read_text()
    import pandas as pd

    table = pd.read_csv(csv, index_col=[0, 1, 2])
    row = table.loc[("ours", "none", "uniform")]
    assert row["0.2 wikitext2"] == pytest.approx(np.mean(OURS)) and row["0.2 wikitext2 n"] == 5
    assert row["0.2 wikitext2 std"] == pytest.approx(np.std(OURS, ddof=1))
    t_interval = uncertainty.seed_summary(OURS)
    assert (row["0.2 wikitext2 ci_low"], row["0.2 wikitext2 ci_high"]) == (pytest.approx(t_interval["low"]),
                                                                             pytest.approx(t_interval["high"]))
    assert row["0.2 wikitext2 eval_halfwidth"] > 0  # the evaluation's own error, beside the seeds' spread


def test_bold_goes_to_every_cell_the_data_cannot_separate_from_the_best(tmp_path):
    noisy = [255.0, 240.0, 262.0, 246.0, 258.0]  # mean 252.2 too, but no consistent sign against ours
    df = collect.frame(_seeded("ours", OURS) + _seeded("flap", FLAP) + _seeded("wanda", noisy) + _seeded("l2", L2))
    t = collect.pivot(df, ["metric"], ["sparsity"], "ppl.wikitext2")
    md, tex, _ = collect.write_table(t, tmp_path, "p", lower_better=True)
    lines = {line.split("|")[1].strip(): line for line in md.read_text().splitlines() if line.startswith("|")}
    best = min(("ours", "flap", "wanda"), key=lambda m: t.loc[m, 0.2])
    assert "**" in lines[best]
    assert "**" in lines["wanda"] or best == "wanda"  # not separable from the best
    assert "**" not in lines["flap"]  # ~1 worse on every one of the 5 paired seeds: significant
    assert "**" not in lines["l2"]
    assert "not significantly worse" in md.read_text()


def test_single_runs_are_tested_on_their_paired_windows(tmp_path):
    same_text = {"draw": 7, "windows": 64}
    recs = [synthetic.record("metric=ours", ppl={"wikitext2": 100.0}, **same_text),
            synthetic.record("metric=flap", ppl={"wikitext2": 100.5}, **same_text),  # same windows, +0.5%
            synthetic.record("metric=l2", ppl={"wikitext2": 100.5}, draw=8, windows=64, noise=0.3)]
    t = collect.pivot(collect.frame(recs), ["metric"], ["sparsity"], "ppl.wikitext2")
    md, _, _ = collect.write_table(t, tmp_path, "p", lower_better=True)
    lines = {line.split("|")[1].strip(): line for line in md.read_text().splitlines() if line.startswith("|")}
    # flap's windows differ from ours' by the same 0.5% everywhere: a real difference, however small
    assert "**" in lines["ours"] and "**" not in lines["flap"]
    # l2's windows have their own noise: 0.5% is inside the paired interval
    assert "**" in lines["l2"]
    assert "[" in lines["ours"]  # a single run shows its evaluation interval


def test_records_without_per_window_data_still_collect(tmp_path):
    old = [synthetic.record("metric=ours", raw=False, ppl={"wikitext2": 100.0, "ptb": 50.0}),
           synthetic.record("metric=l2", raw=False, ppl={"wikitext2": 120.0, "ptb": 60.0})]
    written = collect.collect(synthetic.write(tmp_path / "runs", old), tmp_path)
    md = next(p for p in written if p.name == "table3_tiny-gpt2.md").read_text()
    assert "**100.00**" in md and " 120.00 |" in md and "could not be tested" in md
    df = collect.frame(old)
    assert "ppl.wikitext2.low" not in df


def test_compare_pairs_runs_by_seed_and_reports_the_paired_ratio(tmp_path, capsys):
    shared = {"windows": 64}
    recs = ([synthetic.record("metric=ours", f"seed={s}", ppl={"wikitext2": 100.0 + s}, **shared) for s in SEEDS]
            + [synthetic.record("metric=flap", "remedy=bias", f"seed={s}", ppl={"wikitext2": 110.0 + s}, **shared)
               for s in SEEDS]
            + [synthetic.record("metric=l2", "seed=0", ppl={"wikitext2": 100.0}, **shared)])
    runs = synthetic.write(tmp_path / "runs", recs)
    df = collect.frame(records.load_complete(runs))
    from harness.collect import compare

    pairs, seeds = compare.compare(df, ["metric=ours", "remedy=none"], ["metric=flap", "remedy=bias"])
    assert len(pairs) == 5 and sorted(pairs["seed"]) == list(SEEDS)
    for _, p in pairs.iterrows():  # same seed = same windows' noise: the ratio is the perplexities' ratio
        assert p["ppl.wikitext2"] == pytest.approx((100.0 + p["seed"]) / (110.0 + p["seed"]))
        assert p["ppl.wikitext2.significant"] and p["ppl.wikitext2.high"] < 1
    ratios = [math.log((100.0 + s) / (110.0 + s)) for s in SEEDS]
    assert seeds.loc[0, "ppl.wikitext2"] == pytest.approx(math.exp(np.mean(ratios)))
    assert seeds.loc[0, "seeds"] == 5 and seeds.loc[0, "ppl.wikitext2.significant"]
    collect_main(["--runs", str(runs), "--out", str(tmp_path), "--compare", "metric=ours,remedy=none",
                  "metric=flap,remedy=bias"])
    out = capsys.readouterr().out
    assert "Across seeds" in out and "*" in out
    assert (tmp_path / "tables" / "compare_metric-ours_remedy-none_vs_metric-flap_remedy-bias_pairs.csv").exists()
    with pytest.raises(SystemExit, match="no runs match"):
        collect_main(["--runs", str(runs), "--out", str(tmp_path), "--compare", "metric=ours", "metric=nothing"])


def test_compare_of_accuracies_pairs_the_same_questions():
    arc = {"arc_easy": 0.50, "arc_challenge": 0.30, "openbookqa": 0.30}
    better = {k: v + 0.1 for k, v in arc.items()}
    recs = [synthetic.record("metric=ours", zeroshot=better, draw=1, questions=500),
            synthetic.record("metric=l2", zeroshot=arc, draw=2, questions=500)]
    from harness.collect import compare

    pairs, _ = compare.compare(collect.frame(recs), ["metric=ours"], ["metric=l2"])
    assert pairs.loc[0, "zs.arc_easy"] == pytest.approx(10.0)
    assert pairs.loc[0, "zs.avg"] == pytest.approx(10.0) and pairs.loc[0, "zs.avg.significant"]
    assert 0 <= pairs.loc[0, "zs.arc_easy.mcnemar_p"] < 0.05


def test_plots_draw_seed_spread_as_error_bars(tmp_path, monkeypatch):
    recs = _seeded("ours", OURS) + _seeded("ours", [v * 2 for v in OURS], "sparsity=0.5")
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, stem: figures.append((stem, fig.axes[0])) or [])
    plots.plot_ppl_vs(collect.frame(recs), tmp_path, "sparsity", ["modules", "calibration", "n_samples"], "ppl")
    _, ax = next((stem, ax) for stem, ax in figures if stem.endswith("wikitext2"))
    bars = [c for c in ax.collections if c.get_segments()]
    (segments,) = [c.get_segments() for c in bars]
    lengths = sorted(abs(s[1][1] - s[0][1]) for s in segments)
    sd = np.std(OURS, ddof=1)
    assert lengths == [pytest.approx(2 * sd), pytest.approx(4 * sd)]  # mean +- sd at 0.2 and 0.5


def test_a_seed_reaches_every_random_choice_of_a_run():
    from harness.config import as_dict, compose, typed

    run = typed(compose("+debug=fast", "seed=3", "remedy=recovery", "finetune=lora"))
    config = as_dict(run)
    assert config["calibration"]["seed"] == config["remedy"]["calibration"]["seed"] == 3
    assert config["finetune"]["data"]["seed"] == 3 and run.prune_settings().seed == 3


def test_console_summary_and_tracker_scalars_carry_the_intervals():
    from harness import tracking
    from harness.record_entries import scalars

    rec = synthetic.record("metric=ours", zeroshot={"arc_easy": 0.5, "openbookqa": 0.3}, ppl={"wikitext2": 100.0})
    _printable(rec)
    ppl, arc = rec["eval"]["ppl"]["wikitext2"], rec["eval"]["zeroshot"]["arc_easy"]
    text = tracking.summary_text(rec)
    assert f"100.000  [95% {ppl['interval']['low']:.2f}, {ppl['interval']['high']:.2f}]" in text
    assert f"acc 0.5000 +- {arc['acc_stderr']:.4f}" in text and "2-task average" in text
    flat = scalars(rec["eval"])
    assert flat["ppl.wikitext2.ci_low"] == ppl["interval"]["low"] and flat["zeroshot.arc_easy.acc_stderr"] > 0
    old = synthetic.record("metric=ours", raw=False, zeroshot={"arc_easy": 0.5})
    _printable(old)
    assert "[95%" not in tracking.summary_text(old) and "ppl.wikitext2.ci_low" not in scalars(old["eval"])


def _printable(rec: dict) -> None:
    """The entries a real record has that the console summary reads and synthetic records skip."""
    rec["pruning"].update(sparsity_target=0.2, sparsity_mode="model", module_ratio=0.2)
    rec["model"]["id"] = rec["model"]["name"]
    rec["path"] = "result.json"
    for entry in rec["eval"]["ppl"].values():
        entry.update(split="test", seqlen=64)
    for entry in rec["eval"].get("zeroshot", {}).values():
        entry.setdefault("n", 100)


def test_a_subset_of_questions_is_never_averaged_with_the_whole_task():
    arc = {"arc_easy": 0.5}
    recs = [synthetic.record("metric=ours", "eval=full", zeroshot=arc),
            synthetic.record("metric=ours", "eval=full", "eval.zeroshot.limit=500", zeroshot={"arc_easy": 0.7})]
    (t,) = collect.table1(collect.frame(recs)).values()
    assert "zs_limit" in t.index.names and sorted(t["ARC-e"]) == [pytest.approx(50.0), pytest.approx(70.0)]


def test_cells_on_different_windows_or_with_constant_seed_differences_are_judged_honestly():
    from harness.collect.cells import worse

    recs = [synthetic.record("metric=ours", ppl={"wikitext2": 100.0}, draw=1),
            synthetic.record("metric=l2", ppl={"wikitext2": 101.0}, draw=1)]
    df = collect.frame(recs)
    t = collect.pivot(df, ["metric"], ["sparsity"], "ppl.wikitext2").attrs["cells"]
    best, other = t.loc["ours", 0.2], t.loc["l2", 0.2]
    assert worse(best, other, lower_better=True) is True  # same windows, 1% everywhere
    nll, per_window, _ = other.runs[0].raw
    moved = other.runs[0].__class__(**{**other.runs[0].__dict__, "raw": (nll, per_window, "other text")})
    best_digest = best.runs[0].__class__(**{**best.runs[0].__dict__, "raw": (best.runs[0].raw[0], per_window, "text")})
    assert worse(type(best)((best_digest,), "ppl"), type(other)((moved,), "ppl"), lower_better=True) is None
    # two seed-invariant methods: the same difference on every seed is no evidence about noise;
    # the verdict falls back to the first shared seed's windows
    same = [synthetic.record("metric=l1", f"seed={s}", ppl={"wikitext2": 100.0}, draw=3) for s in SEEDS]
    same += [synthetic.record("metric=l2", f"seed={s}", ppl={"wikitext2": 100.2}, draw=4) for s in SEEDS]
    cells = collect.pivot(collect.frame(same), ["metric"], ["sparsity"], "ppl.wikitext2").attrs["cells"]
    assert worse(cells.loc["l1", 0.2], cells.loc["l2", 0.2], lower_better=True) is False  # independent noise: not separable


def test_a_consistent_seed_difference_smaller_than_the_evaluation_error_is_not_significant():
    """Seeds share the evaluation windows, so the seeds' spread leaves the evaluation's sampling
    error out: a tiny difference found on every seed must also clear it on the windows."""
    from harness.collect.cells import worse

    ours = [synthetic.record("metric=ours", f"seed={s}", ppl={"wikitext2": v}) for s, v in zip(SEEDS, OURS, strict=True)]
    close = [synthetic.record("metric=flap", f"seed={s}", ppl={"wikitext2": v * (1.003 + 0.0005 * s)}, draw=100 + s)
             for s, v in zip(SEEDS, OURS, strict=True)]
    cells = collect.pivot(collect.frame(ours + close), ["metric"], ["sparsity"], "ppl.wikitext2").attrs["cells"]
    seeds = uncertainty.paired_seeds(np.log([c.value for c in cells.loc["flap", 0.2].runs]),
                                     np.log([c.value for c in cells.loc["ours", 0.2].runs]))
    assert seeds["significant"]  # the seeds alone would call it
    assert worse(cells.loc["ours", 0.2], cells.loc["flap", 0.2], lower_better=True) is False
    from harness.collect import compare

    _, across = compare.compare(collect.frame(ours + close), ["metric=ours"], ["metric=flap"])
    assert not across.loc[0, "ppl.wikitext2.significant"]
    assert across.loc[0, "ppl.wikitext2.eval_low"] < 1 < across.loc[0, "ppl.wikitext2.eval_high"]
