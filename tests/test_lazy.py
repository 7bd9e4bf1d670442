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
    for k, block in enumerate(adapter_for(model).layers(model)):
        written = load_file(str(tmp_path / "pruned" / "blocks" / f"{k}.safetensors"))
        assert written.keys() == block.state_dict().keys()
        for key, value in block.state_dict().items():
            torch.testing.assert_close(written[key], value, rtol=0, atol=0)


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
