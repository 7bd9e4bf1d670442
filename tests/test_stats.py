"""Streaming statistics against brute force."""

import math

import pytest
import torch

from harness.blocks.stats import ChannelMoments, FlapSampleMoments, js_distance_sums

MASKS = {"causal": lambda s: torch.tril(torch.ones(s, s, dtype=torch.bool)),
         "sliding window 3": lambda s: torch.tril(torch.ones(s, s, dtype=torch.bool)).triu(-2),
         "bidirectional": lambda s: torch.ones(s, s, dtype=torch.bool),
         # queries that attend to nothing (all-zero rows): a whole row block of them is skipped
         "padded queries": lambda s: torch.tril(torch.ones(s, s, dtype=torch.bool)) & (torch.arange(s) < 2)[:, None]}


@pytest.mark.parametrize("mask", MASKS)
def test_js_matrix_matches_brute_force_and_is_symmetric(mask):
    torch.manual_seed(0)
    b, h, s = 2, 4, 6
    logits = torch.randn(b, h, s, s)
    allowed = MASKS[mask](s)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)  # empty rows: zeros
    probs[:, 3] = probs[:, 1]  # two identical heads: distance exactly 0
    got, rows = js_distance_sums(probs, row_block=4)  # blocks that end inside the sequence
    assert rows == b * s
    ref = torch.zeros(h, h, dtype=torch.float64)
    for i in range(h):
        for j in range(h):
            total = 0.0
            for n in range(b):
                for q in range(s):
                    p, r = probs[n, i, q].double(), probs[n, j, q].double()
                    m = (p + r) / 2
                    kl = lambda a, c: sum(float(a[k] * math.log(a[k] / c[k])) for k in range(s) if a[k] > 0)  # noqa: E731
                    total += math.sqrt(max(0.5 * kl(p, m) + 0.5 * kl(r, m), 0.0))
            ref[i, j] = total
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(got, got.T) and torch.all(got.diagonal() == 0)
    assert got[1, 3] == 0


def test_channel_moments_match_full_data():
    torch.manual_seed(1)
    x = torch.randn(5, 7, 3) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    cm = ChannelMoments(3, torch.float64, torch.device("cpu"))
    for chunk in x.split(2):
        cm.update(chunk)
    flat = x.reshape(-1, 3).double()
    torch.testing.assert_close(cm.mean, flat.mean(0))
    torch.testing.assert_close(cm.variance, flat.var(0))
    torch.testing.assert_close(cm.second_moment, (flat**2).mean(0))


def test_flap_faithful_statistics_follow_the_reference_recurrence():
    torch.manual_seed(2)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    fm = FlapSampleMoments(3, torch.float64, torch.device("cpu"))
    fm.update(x[:1])
    fm.update(x[1:])
    # hand-unrolled reference recurrence (per sample, token-mean, skip first sample's variance)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for n, sample in enumerate(x):
        old = mean.clone()
        mean = mean * n / (n + 1) + sample.mean(0) / (n + 1)
        if n > 0:
            var = var * (n - 1) / n + ((sample - old) * (sample - mean)).sum(0) / (n + 1)
    torch.testing.assert_close(fm.mean, mean)
    torch.testing.assert_close(fm.variance, var)
