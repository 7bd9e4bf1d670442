"""The architecture contract (harness/models/base.py), checked for every supported model type
on tiny random configs: GQA ratios 1/2/4, mixed sliding/full layers with sequences longer
than the window, q/k/v biases, q/k norms, head_dim != hidden/heads, tied embeddings, fused
projections. A model type not covered here is not supported (test_every_adapter_is_conformance_tested)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from harness import metrics
from harness.blocks.engine import BlockEngine
from harness.blocks.stream import Chunk, advance
from harness.models import ADAPTERS, adapter_for
from harness.models.base import ATTENTION_UNITS, weight
from harness.models.export import export, load_exported
from harness.prune import PruneSettings, prune

VOCAB, SEQ, WINDOW = 128, 32, 8
_IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=128, **_IDS)
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]

CONFIGS = {
    # GQA ratio 1 (plain multi-head), tied embeddings
    "llama": lambda: tf.LlamaConfig(num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True, **_LLAMA),
    # GQA ratio 4, every layer sliding, sequence 4x the window
    "mistral": lambda: tf.MistralConfig(num_attention_heads=8, num_key_value_heads=2, sliding_window=WINDOW, head_dim=8,
                                        **_LLAMA),
    # GQA ratio 2, q/k/v biases, mixed sliding/full layers
    "qwen2": lambda: tf.Qwen2Config(num_attention_heads=8, num_key_value_heads=4, use_sliding_window=True,
                                    sliding_window=WINDOW, max_window_layers=1, layer_types=MIXED, **_LLAMA),
    # q/k norms, head_dim 32 != 64 / 4, mixed layers
    "qwen3": lambda: tf.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=32, use_sliding_window=True,
                                    sliding_window=WINDOW, max_window_layers=1, layer_types=MIXED, **_LLAMA),
    # one KV head (ratio 4), head_dim 32, q/k norms, per-layer rotary tables, tied embeddings
    "gemma3_text": lambda: tf.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                               sliding_window=WINDOW, layer_types=MIXED, query_pre_attn_scalar=32,
                                               **_LLAMA),
    # fused Conv1D q|k|v, causal mask passed positionally
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=3, n_head=8, n_positions=128, vocab_size=VOCAB, bos_token_id=1,
                                  eos_token_id=2),
    # ReLU fc1/fc2 with biases, learned positions
    "opt": lambda: tf.OPTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, ffn_dim=96,
                                word_embed_proj_dim=64, max_position_embeddings=128, **_IDS),
    # fused qkv_proj with GQA ratio 2 and fused gate_up_proj
    "phi3": lambda: tf.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                                  num_key_value_heads=4, max_position_embeddings=128, **_IDS),
}
TYPES = sorted(CONFIGS)


def build(model_type: str, attn: str = "eager"):
    torch.manual_seed(0)
    config = CONFIGS[model_type]()
    config._attn_implementation = attn
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert model.config.model_type == model_type
    # Random init leaves norms at 1 and biases at 0; perturb them so that they matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(n: int = 4, s: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


def test_every_adapter_is_conformance_tested():
    assert sorted(ADAPTERS) == TYPES


def test_configs_exercise_what_they_claim():
    c = {t: CONFIGS[t]() for t in TYPES}
    assert {c[t].num_attention_heads // c[t].num_key_value_heads for t in ("llama", "qwen2", "mistral")} == {1, 2, 4}
    assert len(set(c["gemma3_text"].layer_types)) == 2 and len(set(c["qwen2"].layer_types)) == 2
    assert c["qwen3"].head_dim * c["qwen3"].num_attention_heads != c["qwen3"].hidden_size
    assert build("qwen2").model.layers[0].self_attn.q_proj.bias is not None
    for t in ("llama", "gemma3_text"):
        m = build(t)
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert SEQ > 2 * WINDOW


@pytest.mark.parametrize("model_type", TYPES)
def test_block_by_block_propagation_equals_the_models_forward(model_type):
    model = build(model_type)
    ad = adapter_for(model)
    blocks = ad.layers(model)
    x = ids()
    own = []
    handles = [b.register_forward_hook(lambda _m, _a, o: own.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    logits(model, x)
    for h in handles:
        h.remove()
    h, calls = BlockEngine(model, torch.device("cpu"), chunk_size=2).capture(x)
    with torch.no_grad():
        for k, block in enumerate(blocks):
            h = advance(block, k, h, calls)
            ours = torch.cat([c.hidden for c in h])
            err = ((ours - own[k]).norm(dim=-1) / own[k].norm(dim=-1)).max().item()  # every position
            assert err < 1e-5, f"block {k}: relative error {err:.2e} at the worst position"


def _full_unit_removal(view) -> torch.Tensor:
    """Units whose removal keeps a valid model: one unit of every group, and at least one left
    (a single KV group, as in Gemma-3's one KV head, cannot lose anything)."""
    if view.per_group == 1:
        return torch.tensor([0]) if view.n_units > 1 else torch.zeros(0, dtype=torch.long)
    return torch.arange(view.groups) * view.per_group + (view.per_group - 1)


@pytest.mark.parametrize("unit", ATTENTION_UNITS)
@pytest.mark.parametrize("model_type", TYPES)
def test_keep_all_is_the_identity(model_type, unit):
    model = build(model_type)
    x = ids()
    before = logits(model, x)
    ad = adapter_for(model)
    for block in ad.layers(model):
        ad.prune_attention(block, ad.attention(block, unit).all_units(), unit)
        ad.prune_mlp(block, ad.mlp(block).all_units())
    assert torch.equal(logits(model, x), before)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("unit", ATTENTION_UNITS)
@pytest.mark.parametrize("model_type", TYPES)
def test_removing_a_unit_equals_masking_it(model_type, unit, attn):
    pruned, masked = build(model_type, attn), build(model_type, attn)
    ad = adapter_for(pruned)
    for bp, bm in zip(ad.layers(pruned), ad.layers(masked), strict=True):
        for kind in ("attention", "mlp"):
            d2m = ad.attention(bm, unit) if kind == "attention" else ad.mlp(bm)
            gone = _full_unit_removal(d2m) if kind == "attention" else torch.tensor([0, 5, 17])
            with torch.no_grad():
                weight(d2m.level2)[:, d2m.level2_channels(gone)] = 0
            keep = torch.tensor([u for u in range(d2m.n_units) if u not in set(gone.tolist())])
            if kind == "attention":
                ad.prune_attention(bp, keep, unit)
            else:
                ad.prune_mlp(bp, keep)
    x = ids()
    assert ad.shape(ad.layers(pruned)[0]) != ad.shape(ad.layers(masked)[0])
    torch.testing.assert_close(logits(pruned, x), logits(masked, x), atol=1e-5, rtol=1e-4)


def _pruned(model_type: str, unit: str, remedy: str = "none"):
    """Pruned by the paper's metric with adaptive allocation: layers end up with different shapes."""
    model = build(model_type)
    prune(model, ids(8, seed=1), metrics.build("ours"),
          PruneSettings(sparsity=0.3, allocation="adaptive", attention_unit=unit, remedy=remedy, chunk_size=4))
    return model


REMEDY_FOR = {"ours": "recovery", "flap": "bias", "wanda": "bias", "second_moment": "recovery"}


@pytest.mark.parametrize("unit", ATTENTION_UNITS)
@pytest.mark.parametrize("metric", metrics.names())
@pytest.mark.parametrize("model_type", TYPES)
def test_every_metric_prunes_every_model_type(model_type, metric, unit):
    model = build(model_type)
    ad = adapter_for(model)
    before = [ad.shape(b) for b in ad.layers(model)]
    report = prune(model, ids(8, seed=1), metrics.build(metric),
                   PruneSettings(sparsity=0.3, attention_unit=unit, remedy=REMEDY_FOR.get(metric, "none"), chunk_size=4))
    after = [ad.shape(b) for b in ad.layers(model)]
    assert report.params_after < report.params_before
    for b, a, k in zip(before, after, range(len(after)), strict=True):
        assert b["channels"] - a["channels"] == len(report.removed[(k, "mlp")])
        assert a["heads"] % a["kv_heads"] == 0  # still a standard (GQA) block
        if unit == "query_head" and b["heads"] > b["kv_heads"]:
            assert a["kv_heads"] == b["kv_heads"]
    assert torch.isfinite(logits(model, ids())).all()


@pytest.mark.parametrize(("metric", "remedy"), [("ours", "recovery"), ("flap", "bias")])
@pytest.mark.parametrize("model_type", TYPES)
def test_replaying_modules_from_their_level2_inputs_equals_running_them(model_type, metric, remedy, monkeypatch):
    """The pipeline computes a module once per block and replays it (stream.Replay); running
    every module in every pass instead must remove the same units and give the same model."""
    def pruned():
        model = build(model_type)
        ad = adapter_for(model)
        mlp_runs = []
        for block in ad.layers(model):  # a replayed module's level-1 maps do not run
            if ad.mlp_module(block) is not None:
                ad.mlp(block).level1[0].register_forward_pre_hook(lambda *_: mlp_runs.append(1))
        report = prune(model, ids(8, seed=1), metrics.build(metric),
                       PruneSettings(sparsity=0.3, remedy=remedy, chunk_size=4))
        return model, report, len(mlp_runs)

    replayed, replayed_report, replayed_runs = pruned()
    with monkeypatch.context() as m:
        m.setattr(Chunk, "replaying", lambda chunk, _replay: chunk)
        run, run_report, runs = pruned()
    assert replayed_report.removed == run_report.removed
    torch.testing.assert_close(logits(replayed, ids()), logits(run, ids()), atol=1e-5, rtol=1e-5)
    if runs:  # and the replays happened: the propagation to the next block never runs the MLP
        assert replayed_runs < runs


@pytest.mark.parametrize("unit", ATTENTION_UNITS)
@pytest.mark.parametrize("model_type", TYPES)
def test_save_and_reload_is_exact(model_type, unit, tmp_path):
    model = _pruned(model_type, unit, remedy="bias")  # bias adds level-2 biases the stock model lacks
    ad = adapter_for(model)
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer())
    export(model, tok, tmp_path / "m")
    back = load_exported(tmp_path / "m")
    model.set_attn_implementation(back.config._attn_implementation)
    assert [ad.shape(b) for b in ad.layers(back)] == [ad.shape(b) for b in ad.layers(model)]
    x = ids()
    assert torch.equal(logits(back, x), logits(model, x))


@pytest.mark.parametrize("unit", ATTENTION_UNITS)
@pytest.mark.parametrize("model_type", TYPES)
def test_cached_generation_equals_the_full_forward_on_the_pruned_model(model_type, unit):
    model = _pruned(model_type, unit)
    prompt = ids(2, 12, seed=2)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2 * WINDOW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape[1] == prompt.shape[1] + 2 * WINDOW  # past the sliding window
    full = logits(model, out.sequences)
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step, full[:, prompt.shape[1] - 1 + t], atol=1e-4, rtol=1e-4)


def _tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))


def test_recording_leaves_the_blocks_as_it_found_them():
    """The recorder restores each block's forward, including one set on the instance (as
    accelerate's offloading hooks do)."""
    from harness.blocks.stream import capture

    model = build("gpt2")
    blocks = adapter_for(model).layers(model)
    marked = blocks[1].forward
    blocks[1].forward = marked  # an instance attribute now
    first, calls = capture(model, blocks, ids(), 2, torch.device("cpu"))
    assert len(first) == 2 and all(len(c) == 2 for c in calls)
    assert blocks[1].__dict__["forward"] is marked and "forward" not in blocks[0].__dict__
