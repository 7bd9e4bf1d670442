"""The statistics of harness/uncertainty.py against independent references: coverage of the
intervals on simulated data with a known value, the paired tests' false-positive rate and
power, exact round trips of the stored data, and numpy / lm-eval's own formulas."""

import math

import numpy as np
import pytest

from harness import uncertainty

TRIALS = 400


def _stream(rng, windows: int, tokens: int, doc: int = 8, share: float = 0.6) -> np.ndarray:
    """Per-window NLL sums of a text of documents of `doc` consecutive windows: each document has
    its own difficulty (a `share` of the variance, shared by its windows, as windows cut from one
    article are), each window its own noise; the true per-token log-ppl is 4.0."""
    docs = np.repeat(rng.normal(size=-(-windows // doc)), doc)[:windows]
    per_token = 4.0 + 0.3 * (math.sqrt(share) * docs + math.sqrt(1 - share) * rng.normal(size=windows))
    return per_token * tokens


def test_block_bootstrap_interval_covers_the_true_perplexity_about_95_percent():
    rng = np.random.default_rng(1)
    hits, trials = 0, 1000
    for trial in range(trials):
        r = uncertainty.ppl_interval(_stream(rng, 256, 127), 127, resamples=500, seed=trial)  # 32 blocks of 8
        hits += r["low"] <= math.exp(4.0) <= r["high"]
    assert 0.93 <= hits / trials <= 0.97, hits / trials


def test_per_window_resampling_would_understate_correlated_windows():
    """Why blocks: windows of one document are correlated; resampling single windows under-covers."""
    rng = np.random.default_rng(2)
    single = blocks = 0
    for trial in range(200):
        nll = _stream(rng, 256, 127)
        r1 = uncertainty.ppl_interval(nll, 127, resamples=300, block=1, seed=trial)
        r8 = uncertainty.ppl_interval(nll, 127, resamples=300, block=8, seed=trial)
        single += r1["low"] <= math.exp(4.0) <= r1["high"]
        blocks += r8["low"] <= math.exp(4.0) <= r8["high"]
    assert single / 200 < 0.85 < blocks / 200


def test_delta_method_agrees_with_the_bootstrap():
    nll = _stream(np.random.default_rng(3), 512, 127)
    boot, delta = uncertainty.ppl_interval(nll, 127), uncertainty.ppl_delta_interval(nll, 127)
    assert delta["low"] == pytest.approx(boot["low"], rel=0.01) and delta["high"] == pytest.approx(boot["high"], rel=0.01)


def test_bootstrap_is_seeded():
    nll = _stream(np.random.default_rng(4), 64, 127)
    assert uncertainty.ppl_interval(nll, 127, seed=5) == uncertainty.ppl_interval(nll, 127, seed=5)
    assert uncertainty.ppl_interval(nll, 127, seed=5) != uncertainty.ppl_interval(nll, 127, seed=6)


def test_paired_ratio_rejects_about_5_percent_of_identical_runs_and_finds_a_shift():
    rng = np.random.default_rng(5)
    false, found = 0, 0
    for trial in range(TRIALS):
        text = _stream(rng, 256, 127)  # the shared difficulty of the windows
        a = text + rng.normal(0, 15, 256)  # each model's own noise, same distribution
        b = text + rng.normal(0, 15, 256)
        false += uncertainty.paired_ppl_ratio(a, b, 127, resamples=500, seed=trial)["significant"]
        found += uncertainty.paired_ppl_ratio(a + 0.05 * 127, b, 127, resamples=500, seed=trial)["significant"]
    assert 0.02 <= false / TRIALS <= 0.08, false / TRIALS
    assert found / TRIALS > 0.95


def test_paired_ratio_is_the_ratio_of_the_perplexities():
    rng = np.random.default_rng(6)
    a, b = _stream(rng, 40, 31), _stream(rng, 40, 31)
    r = uncertainty.paired_ppl_ratio(a, b, 31)
    assert r["ratio"] == pytest.approx(math.exp(a.sum() / (40 * 31)) / math.exp(b.sum() / (40 * 31)), rel=1e-12)
    with pytest.raises(ValueError, match="same windows"):
        uncertainty.paired_ppl_ratio(a, b[:-1], 31)


def test_accuracy_stderr_is_lm_evals_and_its_interval_covers():
    from lm_eval.api.metrics import mean_stderr

    rng = np.random.default_rng(7)
    bits = rng.random(500) < 0.3
    assert uncertainty.accuracy_stderr(bits) == pytest.approx(mean_stderr(bits.astype(float).tolist()), rel=1e-12)
    p = bits.mean()
    assert uncertainty.accuracy_stderr(bits) == pytest.approx(math.sqrt(p * (1 - p) / 499), rel=1e-12)
    hits = 0
    for _ in range(TRIALS):
        sample = rng.random(1000) < 0.4
        r = uncertainty.normal_interval(sample.mean(), uncertainty.accuracy_stderr(sample))
        hits += r["low"] <= 0.4 <= r["high"]
    assert 0.93 <= hits / TRIALS <= 0.97, hits / TRIALS


def test_paired_accuracy_false_positives_power_and_mcnemar():
    rng = np.random.default_rng(8)
    false = found = 0
    for _ in range(TRIALS):
        easy = rng.random(1000)  # each question's difficulty, shared by both models
        a, b = rng.random(1000) < easy, rng.random(1000) < easy
        false += uncertainty.paired_accuracy(a, b)["significant"]
        better = rng.random(1000) < np.minimum(easy + 0.08, 1)
        found += uncertainty.paired_accuracy(better, b)["significant"]
    assert 0.02 <= false / TRIALS <= 0.08, false / TRIALS
    assert found / TRIALS > 0.95
    # McNemar by hand: 10 questions only A gets right, 2 only B: two-sided exact p = 2 P(X <= 2 | 12, 1/2)
    a = np.array([1] * 10 + [0] * 2 + [1] * 5, dtype=bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5, dtype=bool)
    r = uncertainty.paired_accuracy(a, b)
    assert (r["only_a"], r["only_b"]) == (10, 2)
    assert r["mcnemar_p"] == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12, rel=1e-12)


def test_average_stderr():
    assert uncertainty.average_stderr([0.01, 0.02, 0.02]) == pytest.approx(math.sqrt(0.0001 + 0.0004 + 0.0004) / 3)


def test_seed_summary_is_numpys_and_the_t_interval_covers():
    from scipy import stats

    x = [252.2, 248.0, 256.9, 250.1, 253.7]
    s = uncertainty.seed_summary(x)
    assert (s["mean"], s["std"], s["n"]) == (pytest.approx(np.mean(x)), pytest.approx(np.std(x, ddof=1)), 5)
    half = stats.t.ppf(0.975, 4) * np.std(x, ddof=1) / math.sqrt(5)
    assert (s["low"], s["high"]) == (pytest.approx(np.mean(x) - half), pytest.approx(np.mean(x) + half))
    one = uncertainty.seed_summary([3.0])
    assert one["n"] == 1 and math.isnan(one["std"])
    rng = np.random.default_rng(9)
    hits = sum((r := uncertainty.seed_summary(rng.normal(10, 2, 5)))["low"] <= 10 <= r["high"] for _ in range(TRIALS))
    assert 0.93 <= hits / TRIALS <= 0.97, hits / TRIALS


def test_encodings_round_trip_exactly():
    rng = np.random.default_rng(10)
    floats = rng.normal(500, 100, 2401)
    assert np.array_equal(uncertainty.decode_floats(uncertainty.encode_floats(floats)), floats)
    bits = rng.random(1172) < 0.5
    assert np.array_equal(uncertainty.decode_bits(uncertainty.encode_bits(bits), 1172), bits)


def test_too_few_blocks_give_no_interval_and_no_verdict():
    nll = np.full(3 * uncertainty.BLOCK_WINDOWS, 4.0 * 127)  # 3 blocks
    assert math.isnan(uncertainty.ppl_interval(nll, 127)["low"])
    assert math.isnan(uncertainty.ppl_delta_interval(nll, 127)["high"])
    assert not uncertainty.paired_ppl_ratio(nll * 1.1, nll, 127)["significant"]  # a clear ratio, but untestable


def test_few_discordant_questions_are_not_significant_however_clean():
    a = np.array([1] * 4 + [0] * 96, dtype=bool)  # A right on 4 questions B misses, nothing the other way
    r = uncertainty.paired_accuracy(a, np.zeros(100, dtype=bool))
    assert r["low"] > 0 and r["mcnemar_p"] == pytest.approx(0.125) and not r["significant"]
    one = uncertainty.paired_accuracy(a[:1], np.zeros(1, dtype=bool))  # se undefined
    assert not one["significant"]
