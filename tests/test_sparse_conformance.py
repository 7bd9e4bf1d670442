"""The unstructured / N:M pipeline against a reference that reads every layer's input from the
model's own full forward (hooks on model(input_ids), one block at a time), on every adapter type."""

import pytest
import torch

from harness import sparse
from harness.models import adapter_for, module_view
from harness.models.base import set_weight, weight
from harness.models.export import export
from harness.prune import PruneSettings
from harness.settings import Pattern
from harness.sparse.pipeline import linear_layers
from tests.test_adapters import TYPES, build, ids


def _reference(model, x: torch.Tensor, method, pattern) -> dict[str, torch.Tensor]:
    """Block k's layers pruned from X^T X of their inputs in model(x), with blocks < k already pruned."""
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    pruned = {}
    for block in adapter.layers(model):
        views = [module_view(adapter, block, kind) for kind in ("attention", "mlp")]
        layers = [m for m, _ in linear_layers(views)]
        grams = {id(m): [torch.zeros(weight(m).shape[1], weight(m).shape[1], dtype=torch.float64), 0] for m in layers}

        def hook(module, args, grams=grams):
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[id(module)][0] += a.T @ a
            grams[id(module)][1] += a.shape[0]

        handles = [m.register_forward_pre_hook(hook) for m in layers]
        with torch.no_grad():
            model(input_ids=x)
        for h in handles:
            h.remove()
        for m in layers:
            gram, tokens = grams[id(m)]
            new, _ = method.prune(weight(m).detach().double().clone(), gram, tokens, pattern)
            set_weight(m, new)
            pruned[names[id(m)]] = weight(m).detach().clone()
    return pruned


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("model_type", TYPES)
def test_masked_weights_equal_those_from_the_models_own_forward(model_type, method):
    x = ids(4)
    pattern = Pattern(0.5, 2, 4)
    settings = PruneSettings(sparsity=0.5, sparsity_type="nm", nm="2:4", chunk_size=2)
    model, reference = build(model_type), build(model_type)
    report = sparse.prune_sparse(model, x, sparse.build(method), settings, pattern)
    expected = _reference(reference, x, sparse.build(method), pattern)
    got = {n: weight(m).detach() for n, m in model.named_modules() if n in expected}
    assert got.keys() == expected.keys() and len(got) >= 4 * len(adapter_for(model).layers(model))
    for name, w in expected.items():
        torch.testing.assert_close(got[name].double(), w.double(), rtol=1e-4, atol=1e-5, msg=name)
    # SparseGPT zeroes the columns of inputs that are always 0 (OPT's ReLU), as its reference does
    assert report.sparsity_achieved == pytest.approx(0.5) if method == "wanda" else report.sparsity_achieved >= 0.5


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_masked_model_saves_and_loads_in_stock_transformers_with_its_zeros(model_type, tmp_path):
    import transformers as tf

    from tests.test_adapters import _tokenizer, logits

    model = build(model_type)
    settings = PruneSettings(sparsity=0.5, sparsity_type="unstructured")
    sparse.prune_sparse(model, ids(4), sparse.build("sparsegpt"), settings, settings.pattern)
    export(model, tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer()), tmp_path / "m")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)  # no harness code
    back.set_attn_implementation(model.config._attn_implementation)
    block = adapter_for(back).layers(back)[0]
    mlp_down = next(m for n, m in block.named_modules() if n.endswith(("down_proj", "c_proj")) and "mlp" in n)
    assert (weight(mlp_down) == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(logits(back, ids()), logits(model, ids()), rtol=0, atol=0)
