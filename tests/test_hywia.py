"""HyWIA-like fusion against its identities (alpha = 1 / 0), hand-computed cases and torch.func."""

import math

import pytest
import torch

from harness import metrics
from harness.blocks.stats import ModuleStats
from harness.metrics.hywia import HyWIA
from harness.models import adapter_for
from harness.models.base import is_conv1d, weight
from harness.prune import PruneSettings, prune
from harness.prune.gradients import taylor_gradients
from tests.conftest import random_model


def _view_and_grads(model_type: str, kind: str, layer: int = 1):
    model = random_model(model_type)
    ad = adapter_for(model)
    view = (ad.attention if kind == "attention" else ad.mlp)(ad.layers(model)[layer])
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    grads = taylor_gradients(model, [*view.level1, view.level2], ids, torch.device("cpu"))
    return model, view, ModuleStats(extra={"grad": grads})


def _order(metric, view, stats) -> list[int]:
    return metric.rank(view, stats, None).removal_order().tolist()


@pytest.mark.parametrize("kind", ["attention", "mlp"])
@pytest.mark.parametrize(("alpha", "variant"), [(1.0, "mix"), (0.0, "vector")])
def test_extreme_alphas_rank_as_the_taylor_variants(model_type, kind, alpha, variant):
    _, view, stats = _view_and_grads(model_type, kind)
    taylor = _order(metrics.build("taylor", {"variant": variant}), view, stats)
    for norm in ("sum", "max"):
        assert _order(metrics.build("hywia", {"policy": "fixed", "alpha": alpha, "norm": norm}), view, stats) == taylor


def test_channel_coarse_score_is_the_sum_of_absolute_row_and_column_sums():
    """LLM-Pruner's vectorize on an MLP channel: |gate row| + |up row| + |down column| sums of g*w."""
    _, view, stats = _view_and_grads("llama", "mlp")
    grads = stats.extra["grad"]
    gate, up, down = view.level1[0], view.level1[1], view.level2
    s = {m: (weight(m) * grads[m][0]).double() for m in (gate, up, down)}
    expected = s[gate].sum(1).abs() + s[up].sum(1).abs() + s[down].sum(0).abs()
    _, coarse = HyWIA(coarse="channel").scores(view, stats)
    torch.testing.assert_close(coarse, expected)
    _, group = HyWIA(coarse="group").scores(view, stats)
    torch.testing.assert_close(group, (s[gate].sum(1) + s[up].sum(1) + s[down].sum(0)).abs())
    assert not torch.allclose(coarse, group)


def test_softmax_policy_weighs_the_more_concentrated_vector():
    """fine uniform over 4 units (entropy log 4), coarse on one unit (entropy 0): alpha = 1/(1+4)."""
    fine, coarse = torch.ones(4, dtype=torch.float64), torch.tensor([3.0, 0, 0, 0], dtype=torch.float64)
    assert HyWIA(policy="softmax").fusion_weight(fine, coarse, 0.0) == pytest.approx(1 / (1 + math.exp(math.log(4))))
    assert HyWIA(policy="softmax").fusion_weight(fine, fine, 0.7) == pytest.approx(0.5)


def test_depth_policy_is_linear_between_the_end_alphas():
    metric = HyWIA(policy="depth", alpha_first=0.9, alpha_last=0.1)
    x = torch.ones(3)
    assert [metric.fusion_weight(x, x, d) for d in (0.0, 0.5, 1.0)] == pytest.approx([0.9, 0.5, 0.1])


def test_depth_policy_end_to_end_scores_first_block_fine_and_last_coarse(model_type):
    """Gradients come from the dense model once, so block k's ranking does not depend on the
    pruning before it: with alpha 1 -> 0, the first block loses what taylor mix removes and
    the last what taylor vector removes."""
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    removed = {}
    for name, params in [("hywia", {"policy": "depth", "alpha_first": 1.0, "alpha_last": 0.0}),
                         ("taylor", {"variant": "mix"}), ("taylor", {"variant": "vector"})]:
        report = prune(random_model(model_type), ids, metrics.build(name, params), PruneSettings(sparsity=0.3))
        removed[params.get("variant", name)] = report.removed
    last = max(layer for layer, _ in removed["hywia"])
    for kind in ("attention", "mlp"):
        assert removed["hywia"][(0, kind)] == removed["mix"][(0, kind)]
        assert removed["hywia"][(last, kind)] == removed["vector"][(last, kind)]
    assert removed["mix"] != removed["vector"]


def test_fisher_accumulation_equals_per_sample_gradients_from_torch_func(model_type):
    """g = mean and a = mean of squares of per-sample gradients, computed with torch.func
    (vmap over samples of grad of a functional call), independently of the backward loop."""
    from torch.func import functional_call, grad, vmap

    model = random_model(model_type)
    ad = adapter_for(model)
    view = ad.mlp(ad.layers(model)[0])
    modules = [*view.level1, view.level2]
    ids = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(1))
    accumulated = taylor_gradients(model, modules, ids, torch.device("cpu"))

    names = {id(p): n for n, p in model.named_parameters()}
    watched = {names[id(m.weight)]: m.weight.detach() for m in modules}

    def loss(params, x):
        return functional_call(model, params, kwargs={"input_ids": x[None], "labels": x[None], "use_cache": False}).loss

    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness="same")(watched, ids)
    for m in modules:
        g = per_sample[names[id(m.weight)]]
        g = g.transpose(1, 2) if is_conv1d(m) else g  # [samples, out, in] like weight(m)
        torch.testing.assert_close(accumulated[m][0], g.mean(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(accumulated[m][1], (g**2).mean(0), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(("params", "fragment"), [({"policy": "linear"}, "accepted: fixed, depth, softmax"),
                                                  ({"alpha": 1.5}, "0 <= alpha <= 1"),
                                                  ({"norm": "l2"}, "accepted: sum, max"),
                                                  ({"coarse": "matrix"}, "accepted: group, channel")])
def test_bad_parameters_are_refused_naming_the_accepted_ones(params, fragment):
    with pytest.raises(ValueError, match=fragment):
        metrics.build("hywia", params)


def test_label_names_the_policy():
    assert metrics.build("hywia", {"policy": "softmax"}).label == "HyWIA-like (softmax)"
    assert metrics.build("taylor").label == "taylor"
