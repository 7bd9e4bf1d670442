"""The pruning pipeline on real (zoo) and random models."""

import copy

import pytest
import torch

from harness import metrics
from harness.blocks.engine import BlockEngine
from harness.blocks.stats import Gram
from harness.models import adapter_for
from harness.prune import PruneSettings, n_params, prune
from harness.prune import allocation as alloc
from harness.remedy.recovery import CrossMoments, refit
from tests.conftest import random_model

ALL_METRICS = ["ours", "second_moment", "similarity", "random", "l1", "l2", "wanda", "flap"]


def _calib(n=8, s=32, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("remedy", ["none", "recovery", "bias"])
def test_every_metric_and_remedy_prunes_and_runs(model_type, metric, remedy):
    model = random_model(model_type)
    report = prune(model, _calib(), metrics.build(metric), PruneSettings(sparsity=0.3, remedy=remedy, chunk_size=4))
    assert report.params_after < report.params_before
    with torch.no_grad():
        out = model(torch.randint(0, 128, (1, 16))).logits
    assert torch.isfinite(out).all()


def test_uniform_allocation_hits_the_solved_ratio():
    shapes = [alloc.ModuleShape(0, "attention", 8, 100), alloc.ModuleShape(0, "mlp", 96, 10)]
    r = alloc.solve_ratio(shapes, target_params=0.25 * (800 + 960))
    removed = alloc.removed_params(shapes, r)
    # no other breakpoint is closer to the target
    for j in range(1, 97):
        assert abs(removed - 440) <= abs(alloc.removed_params(shapes, 1 - j / 96) - 440)


def test_llm_pruner_rule_and_never_empty():
    assert alloc.uniform_removed(32, 0.25) == 8
    assert alloc.uniform_removed(9, 0.2) == 9 - int(9 * 0.8)
    assert alloc.uniform_removed(4, 0.99) == 3


def test_adaptive_allocation_keeps_one_unit_and_meets_budget():
    shapes = [alloc.ModuleShape(0, "attention", 4, 10), alloc.ModuleShape(0, "mlp", 6, 5)]
    scores = [torch.tensor([-5.0, -4, -3, -2]), torch.tensor([1.0, 2, 3, 4, 5, 6])]
    removed = alloc.adaptive(shapes, scores, budget_params=35)
    assert removed[0] == 3  # the 4th head is kept even though it scores lowest of all remaining
    assert removed[0] * 10 + removed[1] * 5 == 35


def test_sparsity_that_would_empty_modules_is_rejected():
    model = random_model("llama")
    with pytest.raises(ValueError, match="allows at most"):
        prune(model, _calib(), metrics.build("random"), PruneSettings(sparsity=0.95))


def test_layer_range_limits_pruning():
    model = random_model("llama")
    ad = adapter_for(model)
    before = [ad.shape(b) for b in ad.layers(model)]
    prune(model, _calib(), metrics.build("l2"), PruneSettings(sparsity=0.3, sparsity_mode="module", layers=(1, 2)))
    after = [ad.shape(b) for b in ad.layers(model)]
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]


def test_head_only_pruning_keeps_mlp():
    model = random_model("gpt2")
    ad = adapter_for(model)
    prune(model, _calib(), metrics.build("ours"), PruneSettings(sparsity=0.25, sparsity_mode="module", modules=("attention",)))
    assert all(ad.shape(b)["channels"] == 256 and ad.shape(b)["heads"] == 6 for b in ad.layers(model))


@pytest.mark.parametrize("outputs", [8, 40])  # narrower and wider than the input (two ways to solve)
def test_recovery_refit_equals_least_squares_and_lowers_error(outputs):
    """The ridge re-fit from X^T X and X^T X_dense alone equals brute-force least squares on
    all tokens (tiny damping), and it lowers the output error on a shifted input."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, outputs).double()
    x_dense = torch.randn(512, 16, dtype=torch.float64)
    x_cur = x_dense @ (torch.eye(16) + 0.3 * torch.randn(16, 16)).double() + 0.05 * torch.randn(512, 16).double()
    y = lin(x_dense).detach()
    before = (lin(x_cur) - y).pow(2).mean().item()
    aug = torch.cat([x_cur, torch.ones(512, 1, dtype=torch.float64)], 1)
    reference = torch.linalg.lstsq(aug, y).solution  # [17, outputs]
    mom = CrossMoments(16, augment=True, dtype=torch.float64, device=torch.device("cpu"))
    for a, b in zip(x_cur.split(100), x_dense.split(100), strict=True):
        mom.update(a, b)
    refit([lin], mom, damp=1e-10, where="test")
    torch.testing.assert_close(lin.weight.detach(), reference[:16].T, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.bias.detach(), reference[16], rtol=1e-6, atol=1e-6)
    assert (lin(x_cur) - y).pow(2).mean().item() < before


@pytest.mark.parametrize("width", [1, 3, 16, 17, 53])
@pytest.mark.parametrize("pieces", [1, 2, 4, 7])
@pytest.mark.parametrize("exact", [True, False])
def test_lower_block_gram_is_x_transpose_x(width, pieces, exact):
    """The Gram matrix from its lower block triangle alone, accumulated over chunks, equals the
    brute-force X^T X (odd widths, more pieces than columns included)."""
    x = torch.randn(40, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    gram = Gram(width, torch.float64, torch.device("cpu"), exact=exact, pieces=pieces)
    for part in x.split(15):
        gram.add(part)
        gram.matrix  # noqa: B018 - mirroring between updates must not leak into the sums
    torch.testing.assert_close(gram.matrix, x.T @ x, rtol=1e-12, atol=1e-12)
    assert gram.tokens == 40


@pytest.mark.parametrize("width", [128, 576])
def test_exact_gram_sums_bit_identically_to_one_full_product(width):
    """The masking track's Gram (float64 products, accumulated in place block by block) equals
    a full in-place X^T X to the last bit: moving it onto the lower triangle changed no number."""
    gram = Gram(width, torch.float64, torch.device("cpu"), exact=True)
    full = torch.zeros(width, width, dtype=torch.float64)
    for seed in range(3):
        x = torch.randn(512, width, generator=torch.Generator().manual_seed(seed))
        gram.update(x.view(2, 256, width))
        x = x.to(torch.float64)
        full.addmm_(x.T, x)
    assert torch.equal(gram.matrix, full)


def test_cross_moments_gram_read_between_updates_stays_exact():
    x = torch.randn(60, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mom = CrossMoments(23, augment=False, dtype=torch.float64, device=torch.device("cpu"))
    for part in x.split(20):
        mom.update(part, part)
        assert mom.gram.shape == (23, 23)
    torch.testing.assert_close(mom.gram, x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("outputs", [8, 40])
def test_recovery_is_the_identity_when_the_input_is_unchanged(outputs):
    """toward=weights: with nothing upstream pruned the re-fit returns the weights as they are,
    whatever the damping."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, outputs).double()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = torch.randn(256, 16, dtype=torch.float64) * torch.logspace(-2, 2, 16, dtype=torch.float64)  # outlier channels
    mom = CrossMoments(16, augment=True, dtype=torch.float64, device=torch.device("cpu"))
    mom.update(x, x)
    refit([lin], mom, damp=1.0, where="test", toward="weights")
    torch.testing.assert_close(lin.weight.detach(), w0)
    torch.testing.assert_close(lin.bias.detach(), b0)


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_singular_gram_matrix_warns_and_keeps_weights(bad):
    lin = torch.nn.Linear(4, 3, bias=False).double()
    w0 = lin.weight.detach().clone()
    mom = CrossMoments(4, augment=False, dtype=torch.float64, device=torch.device("cpu"))
    mom.update(torch.full((10, 4), bad, dtype=torch.float64), torch.ones(10, 4, dtype=torch.float64))
    with pytest.warns(UserWarning, match="singular"):
        refit([lin], mom, damp=1e-2, where="block 0 attention level 1")
    assert torch.equal(lin.weight.detach(), w0)


def test_rank_deficient_gram_matrix_is_damped_to_finite_weights():
    lin = torch.nn.Linear(4, 3, bias=False).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    x[:, 3] = x[:, 2]  # duplicated input channel: X^T X is singular without damping
    mom = CrossMoments(4, augment=False, dtype=torch.float64, device=torch.device("cpu"))
    mom.update(x, x)
    refit([lin], mom, damp=1e-2, where="test")
    assert torch.isfinite(lin.weight).all()


def test_recovery_lowers_each_block_output_error(zoo):
    """On a real model: after pruning block 0, block 1's pruned output with recovery is closer
    to the dense block-1 output than without."""
    model, tok = zoo("tiny-llama")
    ids = _calib(n=16, s=64, vocab=4096)
    errors = {}
    for remedy in ("none", "recovery"):
        m = copy.deepcopy(model)
        prune(m, ids, metrics.build("second_moment"), PruneSettings(sparsity=0.3, sparsity_mode="module", remedy=remedy))
        with torch.no_grad():
            errors[remedy] = (m(ids, output_hidden_states=True).hidden_states[-1]
                              - model(ids, output_hidden_states=True).hidden_states[-1]).pow(2).mean().item()
    assert errors["recovery"] < errors["none"]


@pytest.mark.slow
@pytest.mark.parametrize("name,modules", [("tiny-llama", ("mlp",)), ("tiny-gpt2", ("attention",))])
def test_ours_beats_random_on_zoo_model(zoo, name, modules):
    """50% of the units of each model's sensitive module (tiny-llama's gated MLP, tiny-gpt2's
    8 MHA heads; tiny-llama has only 4 KV groups, where every choice is about as bad):
    ours beats the mean of three random draws."""
    from harness.data import evaluation_text
    from harness.evaluate.perplexity import perplexity_of

    model, tok = zoo(name)
    text, _ = evaluation_text("ptb", "llmpruner")
    ids = torch.tensor(tok(text)["input_ids"])
    cal = ids[: 64 * 128].view(64, 128)  # PTB validation start: not the evaluated windows below
    ev = ids[64 * 128 :]

    def pruned_ppl(metric, seed=0):
        m = copy.deepcopy(model)
        settings = PruneSettings(sparsity=0.5, sparsity_mode="module", modules=modules, seed=seed)
        prune(m, cal, metrics.build(metric), settings)
        return perplexity_of(m, ev, 128, max_tokens=128 * 64)[0]

    random_mean = sum(pruned_ppl("random", seed) for seed in range(3)) / 3
    assert pruned_ppl("ours") < random_mean


def test_determinism_same_seed_same_result():
    outs = []
    for _ in range(2):
        model = random_model("llama")
        r = prune(model, _calib(), metrics.build("random"), PruneSettings(sparsity=0.3, seed=7))
        with torch.no_grad():
            outs.append((r.per_layer, model(torch.arange(16)[None]).logits))
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])


def test_nan_activations_fail_with_block_named():
    model = random_model("llama")
    ad = adapter_for(model)
    with torch.no_grad():
        ad.layers(model)[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="block 1"):
        prune(model, _calib(), metrics.build("second_moment"), PruneSettings(sparsity=0.2))


def test_params_count_shared_embeddings_once():
    model = random_model("llama", tie_word_embeddings=True)
    assert n_params(model) == sum(p.numel() for p in model.parameters())


def test_level1_moments_equal_the_quadratic_form_of_the_input_second_moment(model_type):
    """The MLP statistics (per-channel moments of level-1 outputs, bias removed) equal
    diag(A Sigma_X A^T) with Sigma_X built from the module's captured inputs."""
    from harness.blocks.hooks import module_input
    from harness.prune import Pipeline
    from harness.prune.observe import observe

    model = random_model(model_type)
    adapter = adapter_for(model)
    model.set_attn_implementation("eager")
    pipe = Pipeline(BlockEngine(model, torch.device("cpu"), 4), metrics.build("second_moment"), PruneSettings(chunk_size=4))
    chunks, _ = pipe.engine.capture(_calib())
    block = adapter.layers(model)[0]
    view = adapter.mlp(block)
    stats = observe(block, view, adapter.attention_module(block), chunks, frozenset({"level1"}), {}, torch.float64,
                    torch.device("cpu"))
    with torch.no_grad():
        x = torch.cat([module_input(block, view.module_input, c).reshape(-1, 64) for c in chunks]).double()
    sigma = x.T @ x / len(x)
    for module, got in zip(view.level1, stats.level1_moments, strict=True):
        a = module.weight.double().T if model_type == "gpt2" else module.weight.double()  # Conv1D is [in, out]
        torch.testing.assert_close(got, ((a @ sigma) * a).sum(1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("remedy,allocation", [("none", "uniform"), ("bias", "adaptive"), ("recovery", "uniform")])
def test_sparsity_zero_leaves_the_logits_unchanged(model_type, metric, remedy, allocation):
    """Nothing removed: every statistic is observed and every remedy hook runs, and the model
    computes exactly what it did (recovery re-fits a module only once something upstream was
    cut, METHOD.md section 5; its ridge fit would otherwise shrink the weights)."""
    model = random_model(model_type)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    report = prune(model, _calib(), metrics.build(metric),
                   PruneSettings(sparsity=0.0, remedy=remedy, allocation=allocation, chunk_size=4))
    assert report.params_after == report.params_before and not any(report.removed.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_recovery_runs_no_dense_pass_before_the_first_cut(zoo, monkeypatch):
    """Before the layer range (LLaMA-7B's blocks 0..3) nothing is cut, so the dense stream is
    the stream itself: no dense pass there, and the dense stream entering the first pruned
    block is the model's own hidden state (one stream or a separate fit set)."""
    from harness.prune import Pipeline

    model, _ = zoo("tiny-llama")
    ids = _calib(n=4, s=32, vocab=4096)
    with torch.no_grad():
        entering = model(ids, output_hidden_states=True).hidden_states[2]  # block 1's output
    original, seen = Pipeline.dense_pass, []

    def dense_pass(self, block, k, stream, *rest):
        seen.append((k, torch.cat([chunk.hidden for chunk in stream])))
        return original(self, block, k, stream, *rest)

    monkeypatch.setattr(Pipeline, "dense_pass", dense_pass)
    for fit_ids in (None, ids.clone()):
        seen.clear()
        prune(copy.deepcopy(model), ids, metrics.build("ours"),
              PruneSettings(sparsity=0.3, sparsity_mode="module", remedy="recovery", layers=(2, 4), chunk_size=2),
              fit_ids=fit_ids)
        assert [k for k, _ in seen] == [2, 3]
        torch.testing.assert_close(seen[0][1], entering, rtol=1e-4, atol=1e-4)


def test_the_recovery_set_reaches_only_the_recovery_fits(zoo, monkeypatch):
    """Scoring statistics come from `input_ids`, recovery's least squares from `fit_ids`: a
    recovery-only change of data changes the recovered weights and not the first module's
    scores; a scoring-only change does change them; fit_ids equal to the scoring ids is
    exactly fit_ids=None (one stream)."""
    from harness.prune import Pipeline

    model, _ = zoo("tiny-llama")
    scoring, refit_on = _calib(n=8, s=32, vocab=4096, seed=0), _calib(n=6, s=24, vocab=4096, seed=5)
    original = Pipeline.observe_and_score

    def pruned(input_ids, fit_ids):
        scores = {}

        def rank(self, block, view, stream, layer, *rest):
            ranking, stats = original(self, block, view, stream, layer, *rest)
            scores.setdefault((layer, view.kind), ranking.scores.clone())
            return ranking, stats

        monkeypatch.setattr(Pipeline, "observe_and_score", rank)
        m = copy.deepcopy(model)
        prune(m, input_ids, metrics.build("wanda"), PruneSettings(sparsity=0.3, remedy="recovery", chunk_size=4),
              fit_ids=fit_ids)
        return m.state_dict(), scores

    one_stream, first_scores = pruned(scoring, None)
    same_again, same_scores = pruned(scoring, scoring.clone())
    assert all(torch.equal(one_stream[k], same_again[k]) for k in one_stream)
    own_set, own_scores = pruned(scoring, refit_on)
    first = (0, "attention")
    assert torch.equal(own_scores[first], first_scores[first])
    assert any(one_stream[k].shape == own_set[k].shape and not torch.equal(one_stream[k], own_set[k]) for k in one_stream)
    _, rescored = pruned(_calib(n=8, s=32, vocab=4096, seed=9), None)
    assert not torch.equal(rescored[first], first_scores[first])
