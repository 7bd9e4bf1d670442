"""Metrics on hand-computed cases and against Monte-Carlo / brute-force references."""

import torch
from torch import nn

from harness import metrics
from harness.blocks.stats import ChannelMoments, ModuleStats
from harness.metrics.second_moment import mlp_scores
from harness.metrics.similarity import greedy_candidates
from harness.models import adapter_for
from harness.models.base import DepthTwo
from tests.conftest import random_model


def _plain_mlp(a: torch.Tensor, b: torch.Tensor) -> DepthTwo:
    up, down = nn.Linear(a.shape[1], a.shape[0], bias=False), nn.Linear(a.shape[0], b.shape[0], bias=False)
    with torch.no_grad():
        up.weight.copy_(a)
        down.weight.copy_(b)
    n = a.shape[0]
    return DepthTwo("mlp", [up], down, n, lambda u: [torch.as_tensor(u)], lambda u: torch.as_tensor(u), 2 * a.shape[1])


def test_second_moment_equals_monte_carlo_output_energy_for_linear_activation():
    """For a linear sigma, M_i (without the 1/2) is E||B_i a_i^T x||^2, the energy channel i adds."""
    torch.manual_seed(0)
    d, n, out = 5, 4, 3
    a, b = torch.randn(n, d), torch.randn(out, n)
    x = torch.randn(200_000, d) @ torch.randn(d, d)
    view = _plain_mlp(a, b)
    level1 = ChannelMoments(n, torch.float64, torch.device("cpu"))  # what the pipeline's hook accumulates
    for chunk in x.split(4096):
        level1.update(view.level1[0](chunk))
    got = mlp_scores(view, [level1.second_moment]) * 2  # undo the ReLU factor 1/2
    mc = torch.stack([((x @ a[i]).unsqueeze(1) * b[:, i]).pow(2).sum(1).mean() for i in range(n)]).double()
    torch.testing.assert_close(got, mc, rtol=1e-6, atol=1e-6)


def test_second_moment_hand_case_ranks_by_input_energy():
    # identity weights: channel i reads input i; input 2 carries the most energy
    view = _plain_mlp(torch.eye(3), torch.eye(3))
    sigma = torch.diag(torch.tensor([1.0, 0.1, 4.0])).double()
    a = view.level1[0].weight.double()
    scores = mlp_scores(view, [((a @ sigma) * a).sum(1)])  # diag(A Sigma A^T)
    assert scores.argsort().tolist() == [1, 0, 2]
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.05, 2.0], dtype=torch.float64))


def test_greedy_candidates_follow_algorithm_1():
    div = torch.tensor([[0, 0.1, 0.9, 0.8], [0.1, 0, 0.7, 0.2], [0.9, 0.7, 0, 0.3], [0.8, 0.2, 0.3, 0]])
    imp = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # pairs by divergence: (0,1) -> 0 (less important); (1,3) -> 1; (2,3) -> 2; rest touch candidates
    assert greedy_candidates(div, imp) == [0, 1, 2]
    assert greedy_candidates(div, imp, tau=0.25) == [0, 1]


def _stats_for(view, x_in, z):
    cpu = torch.device("cpu")
    st = ModuleStats(level1=[ChannelMoments(m.weight.shape[0], torch.float64, cpu) for m in view.level1],
                     level2=ChannelMoments(z.shape[-1], torch.float64, cpu))
    for m, moments in zip(view.level1, st.level1, strict=True):
        moments.update(m(x_in))
    st.level2.update(z)
    return st


def test_level2_metrics_on_hand_case():
    """Wanda-sp and FLAP on a 3-channel MLP where the expected ranking is known."""
    view = _plain_mlp(torch.eye(3), torch.tensor([[1.0, 1.0, 3.0], [1.0, 1.0, 3.0]]))
    # channel 0: large constant (no fluctuation), channel 1: small varying, channel 2: varying
    z = torch.stack([torch.full((100,), 5.0), torch.randn(100) * 0.1, torch.randn(100)], 1)
    st = _stats_for(view, torch.randn(100, 3), z)
    g = torch.Generator().manual_seed(0)
    wanda = metrics.build("wanda").rank(view, st, g).scores
    flap = metrics.build("flap").rank(view, st, g).scores
    assert wanda.argsort().tolist() == [1, 2, 0]  # mean|W| x rms = 1x5, 1x0.1, 3x1
    assert flap.argsort()[0].item() == 0  # a constant channel has no fluctuation: FLAP removes it first


def test_magnitude_sums_unit_weights(model_type):
    model = random_model(model_type)
    ad = adapter_for(model)
    view = ad.attention(ad.layers(model)[0])
    g = torch.Generator()
    l1 = metrics.build("l1").rank(view, ModuleStats(), g).scores
    # brute force for unit 1: all level-1 rows and level-2 columns of the unit
    from harness.models.base import weight

    u = torch.tensor([1])
    ref = sum(weight(m)[idx].abs().sum() for m, idx in zip(view.level1, view.level1_channels(u), strict=True))
    ref = ref + weight(view.level2)[:, view.level2_channels(u)].abs().sum()
    torch.testing.assert_close(l1[1], ref.double())


def test_random_is_seeded():
    view = _plain_mlp(torch.eye(4), torch.eye(4))
    a = metrics.build("random").rank(view, ModuleStats(), torch.Generator().manual_seed(3)).scores
    b = metrics.build("random").rank(view, ModuleStats(), torch.Generator().manual_seed(3)).scores
    assert torch.equal(a, b)


def test_unknown_metric_names_accepted_ones():
    import pytest

    with pytest.raises(ValueError, match="'nope'.*accepted: .*flap.*ours.*wanda"):
        metrics.build("nope")
