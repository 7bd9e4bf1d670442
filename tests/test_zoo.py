"""The committed zoo weights are what `python -m harness.models.zoo build` produces."""

import hashlib
import json

import pytest

from harness.models import zoo as zoo_module


@pytest.mark.parametrize("name", list(zoo_module.MODELS))
def test_committed_weights_match_manifest(name):
    folder = zoo_module.COMMITTED_DIR / name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == manifest["sha256"]["model.safetensors"]
    assert manifest["train_seconds"] < 600  # built within 10 minutes on 2 CPU cores


@pytest.fixture(scope="module")
def tokenizer():
    return zoo_module.train_tokenizer()  # deterministic: the one each build trains for itself


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo_module.MODELS))
def test_build_command_reproduces_the_training_trajectory(name, tokenizer):
    """Retrain the first steps with the committed spec: the losses match the manifest's (the
    first five of its ten: each step costs about a second and five already pin the data
    order, the initialisation and the optimiser)."""
    manifest = json.loads((zoo_module.COMMITTED_DIR / name / "manifest.json").read_text())
    spec = zoo_module.TrainSpec(**manifest["spec"])
    _, losses = zoo_module.train(name, tokenizer, spec, steps=5)
    assert losses == pytest.approx(manifest["first_losses"][:5], rel=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_zoo_models_are_genuinely_trained(zoo, name):
    import torch

    from harness.data import evaluation_text
    from harness.evaluate.perplexity import perplexity_of

    model, tok = zoo(name)
    text, _ = evaluation_text("ptb", "llmpruner")
    ppl, _, _ = perplexity_of(model, torch.tensor(tok(text)["input_ids"]), 128, max_tokens=128 * 32)
    assert ppl < 0.1 * len(tok), ppl  # a uniform guess over the vocabulary scores len(tok)
