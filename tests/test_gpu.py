"""The CUDA path: pruning and evaluation on a GPU with half-precision weights."""

import pytest
import torch

from harness import metrics
from harness.evaluate.perplexity import perplexity_of
from harness.prune import PruneSettings, prune

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("remedy", ["none", "recovery", "bias"])
def test_prune_on_cuda_in_bfloat16(zoo, remedy):
    model, tok = zoo("tiny-llama")
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 4096, (16, 64), generator=torch.Generator().manual_seed(0))
    report = prune(model, ids, metrics.build("ours"), PruneSettings(sparsity=0.2, remedy=remedy), torch.device("cuda"))
    assert report.params_after < report.params_before
    ppl, _, _ = perplexity_of(model, ids.reshape(-1), 64)
    assert 1 < ppl < 4096


def test_cpu_resident_model_is_pruned_block_by_block_on_cuda(zoo):
    model, tok = zoo("tiny-llama")  # stays on the CPU; each block visits the GPU
    ids = torch.randint(0, 4096, (8, 64), generator=torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    prune(model, ids, metrics.build("ours"), PruneSettings(sparsity=0.2), torch.device("cuda"))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.cuda.max_memory_allocated() < sum(p.numel() * 4 for p in model.parameters())
