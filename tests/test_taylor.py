"""Taylor importance against independent references."""

import pytest
import torch

from harness import metrics
from harness.blocks.stats import ModuleStats
from harness.models import adapter_for
from harness.models.base import weight
from harness.prune import PruneSettings, prune
from harness.prune.gradients import taylor_gradients
from tests.conftest import random_model


def _loss(model, ids):
    """Mean next-token cross-entropy, in the model's dtype (HF's own loss casts to float32)."""
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_vector_score_is_the_directional_derivative_of_the_loss(model_type, kind):
    """|sum over a unit of W*g| = |dL/dt| when the unit's weights are scaled by (1+t)."""
    model = random_model(model_type).double()  # the loss change is below float32 resolution
    ad = adapter_for(model)
    view = (ad.attention if kind == "attention" else ad.mlp)(ad.layers(model)[1])
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    grads = taylor_gradients(model, [*view.level1, view.level2], ids, torch.device("cpu"))
    scores = metrics.build("taylor", {"variant": "vector"}).rank(view, ModuleStats(extra={"grad": grads}), None).scores
    unit = 1
    originals = {m: weight(m).detach().clone() for m in (*view.level1, view.level2)}

    def loss_at(t):
        with torch.no_grad():
            for m, w in originals.items():
                scaled = w.clone()
                if m is view.level2:
                    cols = view.level2_channels(torch.tensor([unit]))
                    scaled[:, cols] *= 1 + t
                else:
                    rows = view.level1_channels(torch.tensor([unit]))[view.level1.index(m)]
                    scaled[rows] *= 1 + t
                weight(m).copy_(scaled)
            return _loss(model, ids).item()

    t = 1e-3
    derivative = (loss_at(t) - loss_at(-t)) / (2 * t)
    assert abs(derivative) > 0
    assert scores[unit].item() == pytest.approx(abs(derivative), rel=1e-3)


def test_fisher_term_is_the_mean_of_per_sample_squared_gradients():
    model = random_model("llama")
    ad = adapter_for(model)
    module = ad.mlp(ad.layers(model)[0]).level2
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    (g, a), = taylor_gradients(model, [module], ids, torch.device("cpu")).values()
    per_sample = []
    for x in ids:
        module.weight.requires_grad_(True)
        (grad,) = torch.autograd.grad(model(input_ids=x[None], labels=x[None]).loss, module.weight)
        per_sample.append(grad)
    per_sample = torch.stack(per_sample)
    torch.testing.assert_close(g, per_sample.mean(0))
    torch.testing.assert_close(a, (per_sample**2).mean(0))


@pytest.mark.parametrize("variant", ["element1", "element2", "mix", "vector"])
def test_taylor_variants_prune_end_to_end(model_type, variant):
    model = random_model(model_type)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    report = prune(model, ids, metrics.build("taylor", {"variant": variant}), PruneSettings(sparsity=0.3))
    assert report.params_after < report.params_before
    assert "gradients" in report.stage_seconds
    assert all(p.requires_grad for p in model.parameters())  # restored


@pytest.mark.parametrize("variant", ["element1", "element2", "mix", "vector"])
def test_each_variant_reads_only_the_gradient_moments_it_asks_for(model_type, variant):
    """Scores from only the moments the variant declares equal scores from both moments (a
    moment it reads but did not ask for would be None and fail)."""
    model = random_model(model_type)
    ad = adapter_for(model)
    view = ad.mlp(ad.layers(model)[1])
    modules = [*view.level1, view.level2]
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    metric = metrics.build("taylor", {"variant": variant})
    asked = taylor_gradients(model, modules, ids, torch.device("cpu"), metric.gradient_moments())
    both = taylor_gradients(model, modules, ids, torch.device("cpu"))
    assert len(metric.gradient_moments()) < 2 or variant == "mix"
    for m in modules:
        assert (asked[m][0] is None) == ("mean" not in metric.gradient_moments())
        assert (asked[m][1] is None) == ("square" not in metric.gradient_moments())
    rank = [metric.rank(view, ModuleStats(extra={"grad": g}), None).scores for g in (asked, both)]
    torch.testing.assert_close(rank[0], rank[1], rtol=0, atol=0)


def test_gradients_are_folded_and_freed_one_weight_at_a_time(model_type):
    """While backward runs, at most one prunable weight holds a .grad (each is folded into the
    sums and freed at once), so gradient memory is one weight's, not the model's."""
    model = random_model(model_type)
    ad = adapter_for(model)
    modules = [m for block in ad.layers(model) for view in (ad.attention(block), ad.mlp(block))
               for m in (*view.level1, view.level2)]
    alive = []
    watched = [m.weight for m in modules]
    handles = [w.register_post_accumulate_grad_hook(  # registered first: runs before the fold
        lambda _p: alive.append(sum(v.grad is not None for v in watched))) for w in watched]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        taylor_gradients(model, modules, ids, torch.device("cpu"), frozenset({"mean"}))
    finally:
        for h in handles:
            h.remove()
    assert len(alive) == 2 * len(modules) and max(alive) == 1
    assert all(w.grad is None for w in watched)


def test_unknown_gradient_moments_are_refused():
    model = random_model("llama")
    with pytest.raises(ValueError, match="accepted: a non-empty subset"):
        taylor_gradients(model, [], torch.zeros(1, 4, dtype=torch.long), torch.device("cpu"), frozenset({"cube"}))


def test_a_gradient_left_from_before_is_not_summed_in():
    model = random_model("llama")
    ad = adapter_for(model)
    module = ad.mlp(ad.layers(model)[0]).level2
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    (clean, _), = taylor_gradients(model, [module], ids, torch.device("cpu"), frozenset({"mean"})).values()
    module.weight.grad = torch.ones_like(module.weight)
    (again, _), = taylor_gradients(model, [module], ids, torch.device("cpu"), frozenset({"mean"})).values()
    torch.testing.assert_close(again, clean, rtol=0, atol=0)
