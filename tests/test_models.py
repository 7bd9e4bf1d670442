"""Physical pruning: removing a unit equals masking it; identity; save/reload round-trips."""

import copy

import torch

from harness.models import UnsupportedArchitectureError, adapter_for
from harness.models.base import set_weight, weight
from harness.models.export import export, load_exported
from tests.conftest import random_model


def _mask(model, layer, head_units, channels):
    ad = adapter_for(model)
    block = ad.layers(model)[layer]
    a, m = ad.attention(block), ad.mlp(block)
    for view, units in ((a, head_units), (m, channels)):
        w = weight(view.level2).clone()
        w[:, view.level2_channels(torch.tensor(units))] = 0
        set_weight(view.level2, w)


def _keep(n, drop):
    return torch.tensor([u for u in range(n) if u not in drop])


def test_removing_units_equals_masking_them(model_type):
    model = random_model(model_type)
    masked = copy.deepcopy(model)
    ad = adapter_for(model)
    heads, chans = [1, 3], [0, 5, 17, 40]
    _mask(masked, 1, heads, chans)
    block = ad.layers(model)[1]
    ad.prune_attention(block, _keep(ad.attention(block).n_units, heads))
    ad.prune_mlp(block, _keep(ad.mlp(block).n_units, chans))
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)
    assert ad.mlp(block).n_units == ad.mlp(ad.layers(masked)[1]).n_units - len(chans)
    assert ad.attention(block).n_units == ad.attention(ad.layers(masked)[1]).n_units - len(heads)


def test_keeping_everything_is_identity(model_type):
    model = random_model(model_type)
    ref = copy.deepcopy(model)
    ad = adapter_for(model)
    for block in ad.layers(model):
        ad.prune_attention(block, ad.attention(block).all_units())
        ad.prune_mlp(block, ad.mlp(block).all_units())
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_save_reload_round_trips_exactly(model_type, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from harness.models.base import ensure_bias

    model = random_model(model_type)
    ad = adapter_for(model)
    block = ad.layers(model)[0]
    ad.prune_attention(block, torch.tensor([0, 2]))
    ad.prune_mlp(block, torch.arange(0, 50, 3))
    o, down = ad.level2_outputs(block)
    with torch.no_grad():
        ensure_bias(o).add_(0.5)  # an added bias (FLAP remedy) must survive too
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    export(model, tok, tmp_path)
    reloaded = load_exported(tmp_path)
    assert ad.shape(ad.layers(reloaded)[0]) == ad.shape(block)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_pruned_model_is_smaller():
    from harness.prune import n_params

    model = random_model("llama")
    before = n_params(model)
    ad = adapter_for(model)
    ad.prune_attention(ad.layers(model)[0], torch.tensor([1, 2, 3]))  # remove group 0
    # one KV group of 2 query heads: q and o lose 2*head_dim*hidden each, k and v head_dim*hidden each
    hd, hidden = 8, 64
    assert before - n_params(model) == (2 * 2 + 2) * hd * hidden == ad.attention(ad.layers(random_model("llama"))[0]).params_per_unit


def test_unknown_architecture_names_supported_ones():
    import pytest

    with pytest.raises(UnsupportedArchitectureError, match="'bert'.*supported: .*gpt2.*llama"):
        adapter_for("bert")
