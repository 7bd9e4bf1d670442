"""Lazy (block-at-a-time) pruning from safetensors equals pruning the model held in memory."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from harness import metrics
from harness.models import adapter_for
from harness.models.lazy import LazyCheckpoint
from harness.prune import PruneSettings, prune


@pytest.mark.parametrize(("name", "metric", "remedy"), [("tiny-llama", "ours", "recovery"), ("tiny-gpt2", "flap", "bias"),
                                                        ("tiny-llama", "wanda", "none")])
def test_lazy_pruning_equals_pruning_in_memory(zoo, tmp_path, name, metric, remedy):
    model, _ = zoo(name)
    model.save_pretrained(tmp_path / "dense", max_shard_size="200KB")  # several shards and an index
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(sparsity=0.3, remedy=remedy, chunk_size=4)
    in_memory = prune(model, ids, metrics.build(metric), settings)

    store = LazyCheckpoint(tmp_path / "dense")
    skeleton = store.skeleton()
    lazy = prune(skeleton, ids, metrics.build(metric), settings, store=store, out=tmp_path / "pruned")
    assert lazy.removed == in_memory.removed and lazy.params_after == in_memory.params_after
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # nothing stayed in memory
    prefix = store.prefix
    for k, block in enumerate(adapter_for(model).layers(model)):
        written = load_file(str(tmp_path / "pruned" / "blocks" / f"{k}.safetensors"))
        assert written.keys() == {f"{prefix}{k}.{n}" for n in block.state_dict()}
        for key, value in block.state_dict().items():
            torch.testing.assert_close(written[f"{prefix}{k}.{key}"], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_lazy_export_loads_in_transformers_and_its_blockwise_perplexity_is_the_models(zoo, tmp_path, name):
    from harness.evaluate.blockwise import blockwise_perplexity_of
    from harness.evaluate.perplexity import perplexity_of
    from harness.models.export import load_exported

    model, tok = zoo(name)
    model.save_pretrained(tmp_path / "dense", max_shard_size="300KB")
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(sparsity=0.3, remedy="bias", allocation="adaptive", chunk_size=4)  # per-layer shapes
    prune(model, ids, metrics.build("flap"), settings)
    store = LazyCheckpoint(tmp_path / "dense")
    prune(store.skeleton(), ids, metrics.build("flap"), settings, store=store, out=tmp_path / "pruned")
    store.export(tok, tmp_path / "pruned", tmp_path / "model")

    back = load_exported(tmp_path / "model")  # plain transformers (the remote route: per-layer shapes)
    text = torch.randint(0, model.config.vocab_size, (600,), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation(back.config._attn_implementation)
    with torch.no_grad():
        torch.testing.assert_close(back(text[None, :64]).logits, model(text[None, :64]).logits, rtol=1e-5, atol=1e-5)
    resident: dict = {}
    expected, n, _ = perplexity_of(model, text, 32, batch_size=4, progress=resident)
    lazy = LazyCheckpoint(tmp_path / "model")
    lazy.skeleton()
    progress = {}
    got, n_lazy, tps = blockwise_perplexity_of(lazy, text, 32, batch_size=4, progress=progress,
                                               free_bytes=4 * 2 * 32 * model.config.hidden_size * 4 * 8)  # groups of 8
    assert n_lazy == n and tps > 0 and progress["group"] == 8
    assert got == pytest.approx(expected, rel=1e-5)
    assert progress["nll_windows"] == pytest.approx(resident["nll_windows"], rel=1e-5)  # window by window


def test_lazy_loading_refuses_gradient_metrics_and_a_missing_output(zoo, tmp_path):
    model, _ = zoo("tiny-llama")
    model.save_pretrained(tmp_path / "dense")
    store = LazyCheckpoint(tmp_path / "dense")
    skeleton = store.skeleton()
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="needs gradients"):
        prune(skeleton, ids, metrics.build("taylor"), PruneSettings(sparsity=0.2), store=store, out=tmp_path / "o")
    with pytest.raises(ValueError, match="needs `out`"):
        prune(skeleton, ids, metrics.build("ours"), PruneSettings(sparsity=0.2), store=store)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LazyCheckpoint(tmp_path)


def test_blockwise_zero_shot_equals_lm_eval_on_the_model_in_memory(zoo, tmp_path, monkeypatch):
    """BlockwiseLM on a lazily loaded checkpoint, its batches split into several groups, gives
    HFLM's loglikelihoods and greedy flags on the model in memory, and the same accuracies
    through zeroshot.evaluate."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from harness.evaluate import blockwise_lm
    from harness.evaluate.zeroshot import evaluate as zs_evaluate

    model, tok = zoo("tiny-llama")
    model.save_pretrained(tmp_path / "dense", max_shard_size="300KB")
    store = LazyCheckpoint(tmp_path / "dense")
    store.skeleton()
    pairs = [("The cat sat on the", " mat"), ("A", " b c d e f g"), ("Question: what is two plus two?\nAnswer:", " four"),
             ("", "empty context"), ("one two three four five six seven eight nine ten", " eleven twelve")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    expected = HFLM(pretrained=model, tokenizer=tok, batch_size=2, add_bos_token=False).loglikelihood(requests)
    groups, real = [], blockwise_lm.last_hidden

    def last_hidden(store, batches, device):
        hidden = real(store, batches, device)
        groups.append(len(batches))
        assert not any(h.requires_grad for h in hidden)  # a graph over every block would hold every activation
        return hidden

    monkeypatch.setattr(blockwise_lm, "last_hidden", last_hidden)
    tokens_per_batch = 2 * 16  # at most: two requests of up to 16 tokens
    lm = blockwise_lm.BlockwiseLM(store, tok, 2, False, torch.device("cpu"),
                                  free_bytes=4 * 2 * model.config.hidden_size * 4 * tokens_per_batch)
    got = lm.loglikelihood(requests)
    assert len(groups) > 1 and sum(groups) == 3  # 5 requests in batches of 2, over more than one group
    assert [g for _, g in got] == [g for _, g in expected]
    torch.testing.assert_close(torch.tensor([ll for ll, _ in got]), torch.tensor([ll for ll, _ in expected]),
                               rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "meta" for p in store.model.parameters())  # nothing stayed in memory

    cfg = {"tasks": ["piqa", "arc_easy"], "limit": 6, "batch_size": 4, "source": "offline"}
    in_memory, lazy = zs_evaluate(model, tok, cfg), zs_evaluate(store.model, tok, cfg, store=store)
    for task in cfg["tasks"]:
        assert (lazy["zeroshot"][task]["acc"], lazy["zeroshot"][task]["acc_norm"]) == (
            in_memory["zeroshot"][task]["acc"], in_memory["zeroshot"][task]["acc_norm"]), task
        assert lazy["zeroshot"][task]["tokens_per_second"] > 0
