"""LoRA fine-tuning after pruning: merged into a plain model that trains what it says."""

import pytest
import torch

from harness import metrics
from harness.finetune import linear_names, lora_finetune, lora_targets
from harness.models import adapter_for
from harness.models.base import weight
from harness.prune import PruneSettings, prune
from tests.conftest import random_model

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _tune(model, **overrides):
    kw = dict(rank=4, alpha=8.0, dropout=0.0, targets=None, steps=30, lr=1e-2, batch_size=4, seed=0,
              device=torch.device("cpu"))
    kw.update(overrides)
    return lora_finetune(model, adapter_for(model).layers(model), IDS, **kw)


def _loss(model) -> float:
    with torch.no_grad():
        return model(input_ids=IDS, labels=IDS).loss.item()


def test_lora_on_a_pruned_model_lowers_the_training_loss_and_merges_into_a_plain_model(model_type):
    model = random_model(model_type)
    prune(model, IDS, metrics.build("l2"), PruneSettings(sparsity=0.3))
    cls, shapes = type(model), {n: p.shape for n, p in model.named_parameters()}
    before = _loss(model)
    tuned, entry = _tune(model)
    assert type(tuned) is cls and {n: p.shape for n, p in tuned.named_parameters()} == shapes
    assert not any("lora" in n for n, _ in tuned.named_modules())
    assert _loss(tuned) < before - 0.1  # trained on these 4 sequences
    assert entry["steps"] == 30 and len(entry["losses"]) == 30 and entry["merged"]
    assert entry["epochs"] == pytest.approx(30.0) and entry["tokens"] == 30 * 4 * 16
    assert all(p.requires_grad for p in tuned.parameters())  # as it was before


def test_zero_learning_rate_leaves_every_weight_as_it_was(model_type):
    """LoRA's B starts at zero: without steps of size > 0 the merge adds exactly nothing."""
    model = random_model(model_type)
    state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    tuned, _ = _tune(model, lr=1e-30, steps=2)
    for n, p in tuned.state_dict().items():
        torch.testing.assert_close(p, state[n], rtol=0, atol=1e-20)


def test_only_the_targeted_layers_change():
    model = random_model("llama")
    ad = adapter_for(model)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned, entry = _tune(model, targets=["q_proj", "down_proj"], steps=3)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, state[n])}
    assert changed == {f"model.layers.{i}.{part}.weight" for i in range(len(ad.layers(model)))
                       for part in ("self_attn.q_proj", "mlp.down_proj")}
    assert entry["target_names"] == ["down_proj", "q_proj"]


def test_gpt2_conv1d_layers_are_adapted_in_their_stored_layout():
    model = random_model("gpt2")
    ad = adapter_for(model)
    c_fc = ad.layers(model)[0].mlp.c_fc
    before = weight(c_fc).detach().clone()
    tuned, _ = _tune(model, steps=3)
    assert tuned.transformer.h[0].mlp.c_fc.weight.shape == c_fc.weight.shape
    assert not torch.equal(weight(tuned.transformer.h[0].mlp.c_fc).detach(), before)


def test_targets_cover_every_block_linear_layer_and_refuse_unknown_names():
    model = random_model("llama")
    blocks = adapter_for(model).layers(model)
    names = linear_names(model, blocks)
    assert len(names) == 7 * len(blocks) and "lm_head" not in names
    with pytest.raises(ValueError, match=r"finetune.targets=\['qkv'\] .*accepted: a non-empty subset of down_proj, "
                                         r"gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        lora_targets(model, blocks, ["qkv"])


def test_a_run_records_the_finetune_and_counts_as_retraining(tmp_path):
    from harness.collect.frame import frame
    from harness.config import compose
    from harness.records import config_hash
    from harness.run import run

    overrides = ["+debug=fast", "calibration.n_samples=4", f"out_dir={tmp_path}", "finetune=lora",
                 "finetune.steps=3", "finetune.batch_size=2", "finetune.data.n_samples=4", "finetune.data.dataset=ptb"]
    record = run(compose(*overrides))
    ft = record["finetune"]
    assert ft["steps"] == 3 and ft["data"]["dataset"] == "ptb" and ft["data"]["sequences"] == 4
    assert ft["seconds"] > 0 and len(ft["losses"]) == 3
    assert frame([record]).loc[0, "family"] == "retraining"
    # a config without finetune (records from before the key existed) keeps its run id
    plain = dict(record["config"], finetune={"name": "none"})
    legacy = {k: v for k, v in plain.items() if k not in ("finetune", "sparsity_type", "nm")}
    assert config_hash(plain) == config_hash(legacy) != record["run_id"]


def test_unknown_lora_target_is_refused_before_pruning(tmp_path, monkeypatch):
    from harness.config import ConfigError, compose
    from harness.run import run

    monkeypatch.setattr("harness.run.prune", lambda *a, **k: pytest.fail("pruned before the check"))
    with pytest.raises(ConfigError, match=r"finetune.targets=\['attn'\] names no linear layer"):
        run(compose("+debug=fast", f"out_dir={tmp_path}", "finetune=lora", "finetune.targets=[attn]"))


def test_the_same_seed_gives_the_same_fine_tuned_model_whatever_the_global_rng():
    """LoRA's initial A and its dropout draw from the global RNG: seeded by `seed` (and the
    caller's RNG state left as it was), a re-run of the same config gives the same weights."""
    import copy

    base = random_model("llama")
    tuned = []
    for seed, noise in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(noise)  # whatever ran before in the process
        state = torch.random.get_rng_state()
        model, _ = _tune(copy.deepcopy(base), dropout=0.1, steps=3, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state)
        tuned.append(model.state_dict())
    assert all(torch.equal(tuned[0][n], tuned[1][n]) for n in tuned[0])
    assert not all(torch.equal(tuned[0][n], tuned[2][n]) for n in tuned[0])
