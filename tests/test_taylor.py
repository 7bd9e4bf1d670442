"""Taylor importance against independent references."""

import pytest
import torch

from harness import metrics
from harness.models import adapter_for
from harness.models.base import weight
from harness.prune import PruneSettings, prune
from harness.prune.gradients import taylor_gradients
from harness.prune.stats import ModuleStats
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
