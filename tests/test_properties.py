"""Property-based: random small models and configs never crash, never empty a module, hit the
requested sparsity within one unit per module, and leave a model that runs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import metrics
from harness.models import adapter_for
from harness.prune import PruneSettings, module_shapes, n_params, prunable_layers, prune
from tests.conftest import random_model


@st.composite
def cases(draw):
    arch = draw(st.sampled_from(["llama", "gpt2"]))
    heads = draw(st.sampled_from([2, 3, 4, 6, 8]))
    head_dim = draw(st.sampled_from([4, 8]))
    layers = draw(st.integers(1, 3))
    if arch == "llama":
        kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
        model_kw = dict(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv,
                        intermediate_size=draw(st.integers(4, 48)), num_hidden_layers=layers)
    else:
        model_kw = dict(n_embd=heads * head_dim, n_head=heads, n_inner=draw(st.integers(4, 48)), n_layer=layers)
    start = draw(st.integers(0, layers - 1))
    return arch, model_kw, PruneSettings(
        sparsity=draw(st.floats(0.0, 0.6)), sparsity_mode=draw(st.sampled_from(["model", "module"])),
        allocation=draw(st.sampled_from(["uniform", "adaptive"])), remedy=draw(st.sampled_from(["none", "recovery"])),
        layers=(start, draw(st.integers(start + 1, layers))), chunk_size=2,
        modules=draw(st.sampled_from([("attention", "mlp"), ("attention",), ("mlp",)])),
    ), draw(st.sampled_from(metrics.names()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_pruning_properties(case):
    arch, model_kw, s, metric = case
    model = random_model(arch, **model_kw)
    ad = adapter_for(model)
    shapes = module_shapes(ad, model, prunable_layers(len(ad.layers(model)), s.layers), s.modules)
    total = n_params(model)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    try:
        report = prune(model, ids, metrics.build(metric), s)
    except ValueError as e:  # the only allowed refusal: the target would empty a module
        assert "allows at most" in str(e)
        return
    for block in ad.layers(model):
        shape = ad.shape(block)
        assert shape["heads"] >= 1 and shape["kv_heads"] >= 1 and shape["channels"] >= 1
    removed = total - report.params_after
    prunable = sum(sh.n_units * sh.params_per_unit for sh in shapes)
    target = s.sparsity * (total if s.sparsity_mode == "model" else prunable)
    if s.allocation == "uniform" and s.sparsity_mode == "module":
        expected = sum(min(sh.n_units - int(sh.n_units * (1 - s.sparsity)), sh.n_units - 1) * sh.params_per_unit for sh in shapes)
        assert removed == expected
    else:
        assert abs(removed - target) <= sum(sh.params_per_unit for sh in shapes)
    with torch.no_grad():
        out = model(torch.randint(0, 128, (1, 10))).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_accumulate_statistics_in_float64_on_cpu(dtype, monkeypatch):
    from harness.prune import pipeline

    seen = []

    def observe_and_note(*args, **kwargs):
        stats = real(*args, **kwargs)
        seen.extend(m.sq.dtype for m in [*stats.level1, *([stats.level2] if stats.level2 is not None else [])])
        seen.extend([stats.js_sum.dtype] if stats.js_sum is not None else [])
        return stats

    real = pipeline.observe
    monkeypatch.setattr(pipeline, "observe", observe_and_note)
    model = random_model("llama").to(dtype)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    report = prune(model, ids, metrics.build("ours"), PruneSettings(sparsity=0.3, remedy="recovery", chunk_size=2))
    assert report.params_after < report.params_before
    assert seen and set(seen) == {torch.float64}  # the statistics, whatever the model's dtype
    assert all(p.dtype == dtype for p in model.parameters())
