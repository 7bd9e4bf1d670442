"""The depth track against independent references (METHOD.md section 11): deleting blocks equals
skipping them in place on every architecture (Gemma-3's and Qwen2's per-layer masks included),
and the saved model is a stock one that reloads and generates; the methods' choices against
brute force; ReplaceMe's map and fold against their definitions."""

import math
from pathlib import Path

import pytest
import torch
import transformers as tf

from harness import depth
from harness.blocks.engine import BlockEngine
from harness.blocks.stream import forwards_replaced
from harness.depth.methods import DepthContext, angular_distances
from harness.depth.pipeline import SkippingStream, dense_statistics
from harness.depth.replaceme import replace_run
from harness.evaluate.efficiency import macs_per_token
from harness.models import adapter_for
from harness.models.base import out_features, set_weight, weight
from harness.models.export import export, load_exported, skipped_modules
from harness.models.surgery import block_shape, remove_blocks, remove_sub_blocks
from harness.settings import PruneSettings, n_params
from tests.test_adapters import TYPES, _tokenizer, build, ids, logits


def _passthrough(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def skipped(model, removed: list[int], x: torch.Tensor) -> torch.Tensor:
    """Logits with the blocks `removed` skipped in place (their forwards pass the input through)."""
    blocks = adapter_for(model).layers(model)
    with forwards_replaced([blocks[k] for k in removed], [_passthrough] * len(removed)):
        return logits(model, x)


@pytest.mark.parametrize("model_type", TYPES)
def test_deleting_blocks_equals_skipping_them_and_saves_as_a_stock_model(model_type, tmp_path):
    model = build(model_type)
    x = ids()
    assert torch.equal(logits(model, x), skipped(model, [], x))
    reference = skipped(model, [1], x)  # block 1 is the full-attention one between sliding ones
    kept = remove_blocks(model, [1])
    assert kept == [0, 2] and len(adapter_for(model).layers(model)) == 2
    torch.testing.assert_close(logits(model, x), reference, rtol=1e-5, atol=1e-5)
    if model_type in ("gemma3_text", "qwen2", "qwen3"):
        assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    export(model, tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer()), tmp_path / "m")
    back = load_exported(tmp_path / "m")
    assert "auto_map" not in back.config.to_dict()  # the stock config with fewer layers
    torch.testing.assert_close(logits(back, x), reference, rtol=1e-5, atol=1e-5)
    prompt = x[:1, :6]  # KV-cache generation (layer_idx re-indexed) equals generation without a cache
    cached = back.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    plain = back.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_removing_nothing_leaves_the_logits_unchanged():
    model = build("llama")
    x = ids()
    before = logits(model, x)
    assert remove_blocks(model, []) == [0, 1, 2]
    assert torch.equal(logits(model, x), before)


def _calibration(model, n: int = 4) -> SkippingStream:
    return SkippingStream(BlockEngine(model, torch.device("cpu"), 2), ids(n, seed=3))


def test_influence_of_a_block_with_zero_output_projections_is_zero():
    model = build("llama")
    block = adapter_for(model).layers(model)[1]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    influence, _ = dense_statistics(_calibration(model))
    assert abs(influence[1]) < 1e-6 and min(influence[0], influence[2]) > 1e-3


@torch.no_grad()
def _brute_nll(model, removed: list[int], x: torch.Tensor) -> float:
    out = skipped(model, removed, x)
    return float(torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).double(),
                                                   x[:, 1:].reshape(-1)))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_sleb_first_step_equals_brute_force_over_single_removals(model_type):
    model = build(model_type)
    cal = _calibration(model)
    x = torch.cat(cal.ids)
    for j in range(3):
        assert cal.block_nll(set(), j) == pytest.approx(_brute_nll(model, [j], x), rel=1e-5)
    assert cal.block_nll(set()) == pytest.approx(_brute_nll(model, [], x), rel=1e-5)
    ctx = DepthContext(3, nll=cal.block_nll)
    chosen = depth.build("sleb").choose(1, ctx)
    assert chosen == [1]  # first and last protected: the one candidate
    assert cal.block_nll({1}, None) == pytest.approx(_brute_nll(model, [1], x), rel=1e-5)


def test_sleb_greedy_steps_re_score_after_each_removal():
    """Six blocks: each step's choice is the brute-force argmin given the blocks removed so far."""
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=64, vocab_size=128)
    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    cal = _calibration(model)
    x = torch.cat(cal.ids)
    ctx = DepthContext(6, nll=cal.block_nll)
    chosen = depth.build("sleb").choose(3, ctx)
    removed: list[int] = []
    for step in range(3):
        brute = {j: _brute_nll(model, removed + [j], x) for j in range(1, 5) if j not in removed}
        assert chosen[step] == min(brute, key=brute.get)
        removed.append(chosen[step])


@torch.no_grad()
def test_angular_argmin_equals_brute_force_on_raw_block_outputs():
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=64, vocab_size=128)
    torch.manual_seed(2)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    x = ids(4, seed=3)
    out = model(input_ids=x, output_hidden_states=True)
    raw_last = []  # x_L before the final norm: HF's hidden_states[-1] is after it
    blocks = model.model.layers
    handle = blocks[-1].register_forward_hook(lambda _m, _a, o: raw_last.append(o[0] if isinstance(o, tuple) else o))
    model(input_ids=x)
    handle.remove()
    states = [h[:, -1].double() for h in out.hidden_states[:-1]] + [raw_last[0][:, -1].double()]
    _, last = dense_statistics(_calibration(model))
    for n in (1, 2, 3):
        brute = [float(torch.arccos(torch.nn.functional.cosine_similarity(states[s], states[s + n], dim=-1)
                                     .clamp(-1, 1)).mean() / math.pi) for s in range(7 - n)]
        ours = angular_distances(last, n)
        assert ours == pytest.approx(brute, abs=1e-6)
        chosen = depth.build("angular").choose(n, DepthContext(6, last_token=last))
        s = min(range(1, len(brute)), key=lambda i: brute[i])
        assert chosen == list(range(s, s + n))


def test_shortgpt_removes_the_least_influential_blocks_and_the_baselines_their_own():
    ctx = DepthContext(5, influence=[0.9, 0.1, 0.5, 0.05, 0.7], generator=torch.Generator().manual_seed(0))
    assert depth.build("shortgpt").choose(2, ctx) == [3, 1]
    assert depth.build("last").choose(2, ctx) == [2, 3]
    drawn = depth.build("random").choose(2, ctx)
    assert len(set(drawn)) == 2 and drawn == depth.build("random").choose(
        2, DepthContext(5, generator=torch.Generator().manual_seed(0)))


def _identity_blocks(model, run: range) -> None:
    with torch.no_grad():
        for k in run:
            block = adapter_for(model).layers(model)[k]
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()


def test_replaceme_map_is_the_identity_when_the_removed_blocks_are_identities():
    model = build("llama").double()
    _identity_blocks(model, range(2, 3))
    cal = _calibration(model, n=8)
    down = model.model.layers[1].mlp.down_proj
    before = weight(down).clone()
    entry = replace_run(adapter_for(model), cal, [2], damp=0.0)
    torch.testing.assert_close(weight(down), before, rtol=1e-8, atol=1e-10)  # T = I, folded
    assert entry["run"] == [2, 3] and entry["relative_error"] is None  # the run changed nothing to reproduce


def test_replaceme_fit_is_least_squares_and_the_fold_equals_the_map_after_the_mlp():
    model = build("llama").double()
    cal = _calibration(model, n=8)
    block, down = model.model.layers[1], model.model.layers[1].mlp.down_proj
    hidden = cal.run_block(0, cal.first)
    outputs = []
    handle = down.register_forward_hook(lambda _m, _a, o: outputs.append(o.detach()))
    x_s = cal.run_block(1, hidden)
    handle.remove()
    x_e = cal.run_block(2, x_s)
    m = torch.cat([o.reshape(-1, 64) for o in outputs])
    y = torch.cat([(e - s).reshape(-1, 64) for s, e in zip(x_s, x_e, strict=True)]) + m
    t = torch.linalg.lstsq(m, y).solution
    w = weight(down).clone()
    replace_run(adapter_for(model), cal, [2], damp=0.0)
    torch.testing.assert_close(weight(down), t.T @ w, rtol=1e-6, atol=1e-8)  # normal equations = lstsq
    probe = torch.randn(5, 7, 96, dtype=torch.float64)
    set_weight(down, w)
    mapped = down(probe) @ t
    set_weight(down, t.T @ w)
    torch.testing.assert_close(down(probe), mapped, rtol=1e-10, atol=1e-10)  # the fold is the map after the MLP
    assert block is model.model.layers[1]


def test_a_depth_run_end_to_end_records_and_refuses(tmp_path):
    from harness.checks import ConfigError
    from harness.config import compose
    from harness.run import run

    base = ("+debug=fast", "model=tiny-llama", "sparsity_type=depth", f"out_dir={tmp_path}")
    rec = run(compose(*base, "metric=angular", "remedy=replaceme", "prune.blocks=2"))
    p = rec["pruning"]
    assert p["n_blocks_removed"] == 2 and p["blocks_kept"] == [k for k in range(6) if k not in p["blocks_removed"]]
    assert p["replaceme"]["run"] == [min(p["blocks_removed"]), max(p["blocks_removed"]) + 1]
    assert rec["model"]["params_after"] < rec["model"]["params_before"] and 0 < p["sparsity_achieved"] < 1
    for bad, message in (("prune.blocks=9", "asks to remove 9 of the model's 6 blocks"),
                         ("metric=ours", "metric='ours' is not accepted with sparsity_type=depth"),
                         ("remedy=recovery", "with sparsity_type=depth accepted: none, replaceme"),
                         ("model.lazy=true", "sparsity_type=depth is not accepted with model.lazy=true")):
        with pytest.raises(ConfigError, match=message):
            run(compose(*base, "metric=shortgpt", *bad.split()))
    with pytest.raises(ConfigError, match="remedy=replaceme replaces removed blocks"):
        run(compose("+debug=fast", "model=tiny-llama", "remedy=replaceme", f"out_dir={tmp_path}"))


def test_the_hf_hidden_states_convention_differs_only_at_the_last_block():
    """hidden_states=hf reads transformers' list, whose last entry is after the final norm: the
    influence of every block but the last is the raw one, the last block's is not."""
    from harness.depth.pipeline import hf_statistics

    model = build("llama")
    cal = _calibration(model)
    raw, raw_last = dense_statistics(cal)
    hf, hf_last = hf_statistics(cal)
    assert hf[:-1] == pytest.approx(raw[:-1], rel=1e-5) and hf[-1] != pytest.approx(raw[-1], rel=1e-3)
    torch.testing.assert_close(hf_last[1], raw_last[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hidden_states='normed' is not accepted; accepted: raw"):
        depth.build("shortgpt", {"hidden_states": "normed"})


def test_the_cost_is_counted_in_whole_model_forwards_of_the_dense_model():
    """ShortGPT reads one dense pass; SLEB's cached search costs less than the reference's
    whole-model forward per candidate (bench/depth_cost.py measures it on smollm2)."""
    settings = PruneSettings(sparsity_type="depth", blocks=2, chunk_size=2)
    model = build("llama")
    x = ids(4, seed=3)
    assert depth.prune_depth(model, x, depth.build("shortgpt"), settings).full_forwards == 1.0
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=64, vocab_size=128)
    sleb = depth.prune_depth(tf.AutoModelForCausalLM.from_config(config).eval(), x, depth.build("sleb"), settings)
    # step 1: a cached pass (6 blocks) + 4 candidates running the 4, 3, 2, 1 blocks after them; step 2: a pass over
    # the 5 left + 3 candidates running 3, 2, 1: 27 block forwards, against (4 + 3) whole-model forwards = 42 blocks
    # for the reference
    assert sleb.full_forwards * 6 == pytest.approx(27) and len(sleb.removed) == 2


def test_a_depth_run_exports_from_its_saved_model_and_pruned_again(tmp_path):
    import shutil
    from pathlib import Path

    from harness.config import compose
    from harness.export_cli import main as export_main
    from harness.run import run

    runs = tmp_path / "runs"
    rec = run(compose("+debug=fast", "model=tiny-llama", "sparsity_type=depth", "metric=sleb", "prune.blocks=2",
                      "save_model=true", f"out_dir={runs}"))
    export_main([rec["run_id"], "--out-dir", str(runs), "--out", str(tmp_path / "from-saved")])
    shutil.rmtree(Path(rec["saved_model"]))
    export_main([str(runs / rec["run_id"] / "result.json"), "--out", str(tmp_path / "pruned-again")])
    x = ids(2, 16)
    a, b = (load_exported(tmp_path / f) for f in ("from-saved", "pruned-again"))
    assert a.config.num_hidden_layers == b.config.num_hidden_layers == 4
    assert torch.equal(logits(a, x), logits(b, x))
    card = (tmp_path / "from-saved" / "README.md").read_text()
    assert "2 blocks removed" in card and str(rec["pruning"]["blocks_removed"]) in card


def test_sleb_counts_its_cached_block_inputs_in_the_memory_estimate():
    from omegaconf import OmegaConf

    from harness import preflight
    from harness.config import compose, typed

    cfg = typed(compose("+debug=fast", "model=tiny-llama", "sparsity_type=depth", "metric=sleb", "calibration.n_samples=10"))
    model = preflight.skeleton(OmegaConf.structured(cfg.model), torch.float32)
    parts = preflight.memory_estimate(cfg, model, torch.float32)
    assert parts["cached block inputs"] == 7 * 10 * cfg.calibration.seqlen * model.config.hidden_size * 4
    shortgpt = typed(compose("+debug=fast", "model=tiny-llama", "sparsity_type=depth", "metric=shortgpt"))
    assert "cached block inputs" not in preflight.memory_estimate(shortgpt, model, torch.float32)


def _zero_output(module):
    def forward(x, *args, **kwargs):
        return x.new_zeros(*x.shape[:-1], out_features(module))
    return forward


@torch.no_grad()
def sub_blocks_zeroed(model, units, x: torch.Tensor) -> torch.Tensor:
    """Logits with each sub-block's output map returning zeros (nothing added to the residual)."""
    ad = adapter_for(model)
    blocks = ad.layers(model)
    maps = [ad.level2_outputs(blocks[k])[0 if part == "attention" else 1] for k, part in units]
    with forwards_replaced(maps, [_zero_output(m) for m in maps]):
        return logits(model, x)


@pytest.mark.parametrize("model_type", TYPES)
def test_removing_sub_blocks_equals_zeroing_them_and_exports_through_custom_code(model_type, tmp_path):
    """Block 0 loses its attention (the cache length is read from layer 0), block 1 its MLP,
    block 2 both (deleted): equal to the dense model with those outputs zeroed, before and after
    export, and cached generation equals uncached."""
    model = build(model_type)
    x = ids()
    units = [(0, "attention"), (1, "mlp"), (2, "attention"), (2, "mlp")]
    reference = sub_blocks_zeroed(model, units, x)
    before = n_params(model)
    assert remove_sub_blocks(model, units) == [0, 1]
    ad = adapter_for(model)
    assert [block_shape(ad, b)["heads"] for b in ad.layers(model)][0] == 0
    assert block_shape(ad, ad.layers(model)[1])["channels"] == 0
    assert n_params(model) < before
    torch.testing.assert_close(logits(model, x), reference, rtol=1e-5, atol=1e-5)
    export(model, tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer()), tmp_path / "m")
    back = load_exported(tmp_path / "m")
    skipped = skipped_modules(model)
    assert back.config.skipped_modules == skipped and back.config.num_hidden_layers == 2
    assert sorted(skipped.values()) == (["attention"] if model_type == "opt" else ["attention", "mlp"])
    torch.testing.assert_close(logits(back, x), reference, rtol=1e-5, atol=1e-5)
    prompt = x[:1, :6]
    cached = back.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    plain = back.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)
    with torch.no_grad():  # a step with the cache and no cache_position: positions come from the cache's length
        past = back(input_ids=x[:, :-1], use_cache=True).past_key_values
        step = back(input_ids=x[:, -1:], cache=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, reference[:, -1], rtol=1e-4, atol=1e-4)
    decoder = tf.AutoModel.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()  # as vLLM builds it
    with torch.no_grad():
        torch.testing.assert_close(decoder(input_ids=x).last_hidden_state,
                                   back.get_submodule(back.base_model_prefix)(input_ids=x).last_hidden_state)
    assert macs_per_token(back, 32) < macs_per_token(build(model_type), 32)


def _brute_sub_nll(model, units, x: torch.Tensor) -> float:
    out = sub_blocks_zeroed(model, units, x)
    return float(torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).double(),
                                                   x[:, 1:].reshape(-1)))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gemma3_text"])
def test_blockpruner_steps_equal_brute_force_over_sub_block_removals(model_type):
    """Each greedy step's NLLs equal the dense model with those sub-blocks' outputs zeroed, and
    its choice is their argmin (attention first on ties)."""
    model = build(model_type)
    cal = _calibration(model)
    x = torch.cat(cal.ids)
    units = [(k, part) for k in range(3) for part in ("attention", "mlp")]
    ctx = DepthContext(3, sub_block_nll=cal.sub_block_nll, unit_params={u: 1 for u in units})
    chosen = depth.build("blockpruner").choose(3, ctx)
    removed: list = []
    for step in range(3):
        brute = {u: _brute_sub_nll(model, removed + [u], x) for u in units if u not in removed}
        ours = {(int(key.split(".")[0]), key.split(".")[1]): v for key, v in ctx.scores["nll_per_step"][step].items()}
        assert ours == pytest.approx(brute, rel=1e-5)
        assert chosen[step] == min(brute, key=lambda u: (brute[u], u[1] != "attention", u[0]))
        removed.append(chosen[step])


def test_blockpruner_stops_nearest_the_target_and_breaks_ties_attention_first():
    flat = lambda removed, u: 1.0  # noqa: E731 - every removal costs the same: ties everywhere
    sizes = {(0, "attention"): 1, (0, "mlp"): 3, (1, "attention"): 1, (1, "mlp"): 3, (2, "attention"): 1, (2, "mlp"): 3}
    ctx = DepthContext(3, sub_block_nll=flat, unit_params=sizes, target_params=4.4)
    # ties go to attention (lowest block first): 1, 1, 1 (3 removed), then an MLP: 6 is farther from 4.4 than 3
    assert depth.build("blockpruner").choose(None, ctx) == [(0, "attention"), (1, "attention"), (2, "attention")]
    ctx.target_params = 4.6  # 6 is nearer 4.6 than 3: one more
    assert len(depth.build("blockpruner").choose(None, ctx)) == 4
    assert len(depth.build("blockpruner").choose(5, ctx)) == 5  # a count: as many, whatever the sizes
    assert len(depth.build("blockpruner").choose(99, ctx)) == 5  # one sub-block always stays


def test_a_blockpruner_run_records_its_sub_blocks_and_exports(tmp_path):
    from harness.checks import ConfigError
    from harness.config import compose
    from harness.run import run

    base = ("+debug=fast", "model=tiny-llama", "sparsity_type=depth", f"out_dir={tmp_path / 'runs'}")
    rec = run(compose(*base, "metric=blockpruner", "prune.blocks=3", "save_model=true"))
    p = rec["pruning"]
    assert p["unit"] == "sub-block" and p["n_sub_blocks_removed"] == 3 and len(p["sub_blocks_removed"]) == 3
    gone = {tuple(u) for u in p["sub_blocks_removed"]}
    assert sorted(p["blocks_removed"]) == [k for k in range(6) if {(k, "attention"), (k, "mlp")} <= gone]
    for layer in p["per_layer"]:
        assert layer["attention"] == ((layer["original"], "attention") not in gone)
        assert layer["mlp"] == ((layer["original"], "mlp") not in gone)
    back = load_exported(rec["saved_model"])
    assert back.config.num_hidden_layers == len(p["blocks_kept"])
    card = (Path(rec["saved_model"]) / "README.md").read_text()
    assert "3 attention and MLP sub-blocks removed" in card
    for bad, message in (("prune.blocks=12", "asks to remove 12 of the model's 12 sub-blocks"),
                         ("remedy=replaceme", "remedy=replaceme replaces a run of whole blocks")):
        with pytest.raises(ConfigError, match=message):
            run(compose(*base, "metric=blockpruner", *bad.split()))
