"""Exported folders load in plain transformers, in a process that never imports harness, for
every supported model type, uniform and adaptive, with and without the bias remedy: the
logits equal the in-memory pruned model's and `generate` works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from harness import metrics
from harness.models.export import export
from harness.prune import PruneSettings, n_params, prune
from tests.test_adapters import TYPES, _tokenizer, build, ids, logits

CASES = [(t, allocation, remedy) for t in TYPES for allocation in ("uniform", "adaptive") for remedy in ("none", "bias")]
# Uniform pruning without added biases is a stock config for these (GPT-2 and OPT tie the
# width to heads x head_dim, and this LLaMA's 64 is not a multiple of its 5 remaining heads).
STOCK = {"gemma3_text", "mistral", "phi3", "qwen2", "qwen3"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Export every case, then load them all in one fresh interpreter (without harness)."""
    root = tmp_path_factory.mktemp("exported")
    params = {}
    for model_type, allocation, remedy in CASES:
        model = build(model_type)
        prune(model, ids(8, seed=1), metrics.build("l2"),  # the export does not care how units were chosen
              PruneSettings(sparsity=0.3, allocation=allocation, remedy=remedy, chunk_size=4))
        folder = root / f"{model_type}-{allocation}-{remedy}"
        export(model, tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer()), folder)
        torch.save({"ids": ids(), "logits": logits(model, ids())}, folder / "expected.pt")
        params[folder.name] = n_params(model)
    script = Path(__file__).with_name("load_exported.py")
    r = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=600,
                       cwd=root)
    assert r.returncode == 0, "harness was imported, or the loader crashed:\n" + r.stderr[-3000:]
    results = {row["folder"]: row for row in map(json.loads, r.stdout.splitlines())}
    return results, params


@pytest.mark.parametrize("model_type,allocation,remedy", CASES)
def test_an_exported_folder_loads_in_plain_transformers_and_computes_the_same_logits(loaded, model_type, allocation,
                                                                                    remedy):
    results, params = loaded
    name = f"{model_type}-{allocation}-{remedy}"
    row = results[name]
    assert "failure" not in row, row["failure"]
    assert row["error"] < 1e-5 and row["generated"] == 4 and row["decoder_error"] == 0
    if row["remote"]:  # vLLM would drop these weights (GPT-2's c_attn.bias matched "attn.bias")
        assert row["dropped_by_vllm"] == []
    assert row["remote"] == (not (allocation == "uniform" and remedy == "none" and model_type in STOCK))
    if row["remote"]:  # the stock route may add zero biases its flags create; the remote one adds nothing
        assert row["params"] == params[name]


def test_save_model_and_harness_export_write_the_same_model_with_its_card(tmp_path):
    """`save_model=true`, `harness export RUN` from that folder, and `harness export RUN` of a
    run without a saved model (pruned again from the recorded config) give the same weights,
    a model card naming the run and the complete record."""
    import shutil

    from harness.config import compose
    from harness.export_cli import main as export_main
    from harness.models.export import load_exported
    from harness.run import run

    runs = tmp_path / "runs"
    rec = run(compose("+debug=fast", "model=tiny-llama", "allocation=adaptive", "remedy=bias", "save_model=true",
                      f"out_dir={runs}"))
    saved = Path(rec["saved_model"])
    export_main([rec["run_id"], "--out-dir", str(runs), "--out", str(tmp_path / "from-saved")])
    shutil.rmtree(saved)
    export_main([str(runs / rec["run_id"] / "result.json"), "--out", str(tmp_path / "pruned-again")])
    x = ids(2, 16)
    reference = None
    for folder in (tmp_path / "from-saved", tmp_path / "pruned-again"):
        model = load_exported(folder)
        assert n_params(model) == rec["model"]["params_after"]
        out = logits(model, x)
        reference = out if reference is None else reference
        assert torch.equal(out, reference)
        card = (folder / "README.md").read_text()
        assert rec["run_id"] in card and f"{rec['model']['params_after']:,}" in card and "trust_remote_code=True" in card
        assert json.loads((folder / "record.json").read_text())["status"] == "complete"
    # lm-eval's own CLI on the exported folder (offline: our task copies as --include_path)
    from harness.data.zeroshot_tasks import offline_task_dir

    cli = Path(sys.executable).with_name("lm_eval")
    r = subprocess.run([str(cli), "--model", "hf", "--model_args", f"pretrained={tmp_path / 'from-saved'},trust_remote_code=True",
                        "--tasks", "arc_easy", "--limit", "4", "--include_path", str(offline_task_dir(["arc_easy"])),
                        "--output_path", str(tmp_path / "lm_eval")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0 and "arc_easy" in r.stdout and "acc_norm" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("track", [("sparsity_type=unstructured", "sparsity=0.5", "metric=magnitude"),
                                   ("sparsity_type=nm", "nm=2:4", "sparsity=0.5", "metric=wanda")],
                         ids=["unstructured", "2:4"])
def test_a_masked_run_saves_and_exports_with_its_zeros_and_a_card_that_says_so(tmp_path, track):
    """save_model=true on the masking track, `harness export` from the saved folder and from a
    run pruned again: the same weights, the zeros where the record counts them, a true card."""
    import shutil

    from harness.config import compose
    from harness.export_cli import main as export_main
    from harness.models.export import load_exported
    from harness.run import run

    runs = tmp_path / "runs"
    rec = run(compose("+debug=fast", "model=tiny-llama", *track, "save_model=true", f"out_dir={runs}"))
    assert rec["status"] == "complete"
    saved = Path(rec["saved_model"])
    export_main([rec["run_id"], "--out-dir", str(runs), "--out", str(tmp_path / "from-saved")])
    shutil.rmtree(saved)
    export_main([str(runs / rec["run_id"] / "result.json"), "--out", str(tmp_path / "pruned-again")])
    x = ids(2, 16)
    outputs = []
    for folder in (tmp_path / "from-saved", tmp_path / "pruned-again"):
        model = load_exported(folder)
        zeros = sum(int((m.weight == 0).sum()) for b in model.model.layers for m in b.modules()
                    if isinstance(m, torch.nn.Linear))
        assert zeros == rec["pruning"]["zero_weights"]
        outputs.append(logits(model, x))
        card = (folder / "README.md").read_text()
        assert "weights zeroed" in card and rec["pruning"]["pattern"] in card and "structurally removed" not in card
        sparsity = json.loads((folder / "config.json").read_text())["harness_pruning"]["sparsity_config"]
        assert sparsity["format"] == "dense" and sparsity["ignore"] == ["lm_head"]
        assert sparsity["sparsity_structure"] == ("2:4" if "nm=2:4" in track else "unstructured")
        targets = [model.get_submodule(name).weight for name in sparsity["targets"]]
        assert sum(int((w == 0).sum()) for w in targets) == rec["pruning"]["zero_weights"]
        if "nm=2:4" in track:  # every group of 4 consecutive inputs of every target holds 2 zeros
            assert all(bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()) for w in targets)
    assert torch.equal(outputs[0], outputs[1])


def test_the_card_of_a_fine_tuned_run_says_it_was_fine_tuned(tmp_path):
    from harness.config import compose
    from harness.run import run

    rec = run(compose("+debug=fast", "model=tiny-llama", "finetune=lora", "finetune.steps=2",
                      "finetune.data.n_samples=8", "save_model=true", f"out_dir={tmp_path}"))
    card = (Path(rec["saved_model"]) / "README.md").read_text()
    assert "without retraining" not in card
    assert "fine-tuned with LoRA" in card and f"LORA rank {rec['finetune']['rank']}" in card


def test_export_refuses_a_bad_target_before_loading_anything(tmp_path, monkeypatch):
    from harness import export_cli
    from harness.config import compose
    from harness.run import run

    rec = run(compose("+debug=fast", "model=tiny-llama", f"out_dir={tmp_path / 'runs'}"))
    monkeypatch.setattr(export_cli, "model_for", lambda *a: pytest.fail("the model was loaded"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for out, message in (("/proc/x", "--out='/proc/x' is not writable"), (str(busy), "is not empty")):
        with pytest.raises(SystemExit, match=message):
            export_cli.main([rec["run_id"], "--out-dir", str(tmp_path / "runs"), "--out", out])
    assert (busy / "notes.txt").read_text() == "mine"


def test_a_gpt2_export_runs_where_attention_returns_token_rows_as_in_vllm(tmp_path):
    """vLLM's Transformers backend returns attention as [tokens, heads x head size]; GPT-2's own
    code then flattens it into one row. The export gives its output projection the rows back."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def token_rows(module, query, key, value, attention_mask, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # [1, s, h, d]
        return out.reshape(out.shape[1], -1), None

    AttentionInterface.register("token_rows", token_rows)
    model = build("gpt2")
    prune(model, ids(8, seed=1), metrics.build("l2"), PruneSettings(sparsity=0.3, chunk_size=4))
    export(model, tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer()), tmp_path / "m")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True, dtype=torch.float32)
    x = ids()[:1]
    loaded.eval().set_attn_implementation("sdpa")
    with torch.no_grad():
        expected = loaded(input_ids=x, use_cache=False).logits
        loaded.config._attn_implementation = "token_rows"  # as vLLM sets it
        got = loaded(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
