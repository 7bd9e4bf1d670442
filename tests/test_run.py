"""A whole run through the Python API and the CLI: record, skip, force, failure, collect."""

import json
import subprocess
import sys

import pytest
import torch

from harness import records
from harness.config import ConfigError, compose
from harness.run import run

FAST = ["+debug=fast", "eval.ppl.max_tokens=2048"]


def _cfg(tmp_path, *overrides):
    return compose(*FAST, f"out_dir={tmp_path}", *overrides)


@pytest.fixture(scope="module")
def gpt2_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run(_cfg(out, "model=tiny-gpt2", "metric=ours", "remedy=recovery")), out


def test_record_is_complete_and_has_the_schema(gpt2_record):
    rec, out = gpt2_record
    on_disk = json.loads(records.record_path(out, rec["run_id"]).read_text())
    assert on_disk["status"] == "complete"
    for key in ("schema_version", "run_id", "config", "model", "pruning", "eval", "env", "started_at", "finished_at"):
        assert key in on_disk
    assert on_disk["model"]["params_after"] < on_disk["model"]["params_before"]
    assert 0.15 < on_disk["pruning"]["sparsity_achieved"] < 0.25
    for name in ("wikitext2", "ptb"):
        ppl = on_disk["eval"]["ppl"][name]
        assert ppl["tokens"] == 2048 and ppl["value"] > 1
    assert len(on_disk["pruning"]["per_layer"]) == 4


def test_a_synthetic_record_gives_the_collector_what_a_real_one_does(gpt2_record):
    """tests/synthetic.py stands in for real records in the table and tracking tests."""
    from harness.collect import frame
    from tests import synthetic

    rec, out = gpt2_record
    fake = synthetic.record("metric=ours", "remedy=recovery", "eval.ppl.max_tokens=2048", f"out_dir={out}")
    real_row, fake_row = frame([rec]).iloc[0], frame([fake]).iloc[0]
    assert list(real_row.index) == list(fake_row.index)
    assert fake["config"] == rec["config"]


def test_rerun_skips_and_force_redoes(gpt2_record):
    rec, out = gpt2_record
    again = run(_cfg(out, "model=tiny-gpt2", "metric=ours", "remedy=recovery"))
    assert again["finished_at"] == rec["finished_at"]
    forced = run(_cfg(out, "model=tiny-gpt2", "metric=ours", "remedy=recovery", "force=true"))
    # determinism: the same config and seed give the same removed units and the same perplexity
    assert forced["run_id"] == rec["run_id"] and forced["finished_at"] >= rec["finished_at"]
    assert forced["pruning"]["per_layer"] == rec["pruning"]["per_layer"]
    assert forced["eval"]["ppl"] == {k: {**v, "tokens_per_second": forced["eval"]["ppl"][k]["tokens_per_second"]}
                                     for k, v in rec["eval"]["ppl"].items()}


def test_failed_run_leaves_no_complete_record(tmp_path, monkeypatch):
    import harness.run as run_module

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(run_module, "prune", boom)
    cfg = _cfg(tmp_path, "model=tiny-llama")
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(cfg)
    (path,) = tmp_path.glob("*/result.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "failed" and "disk on fire" in rec["error"]
    assert not records.is_complete(path)
    assert not list(tmp_path.glob("*/.result.*.tmp"))


@pytest.mark.parametrize("override,message", [
    ("model.layers=[2,9]", "outside the model's 4 blocks"),
    ("calibration.seqlen=4096", "exceeds the model's context of 512"),
    ("sparsity=0.9", "allows at most"),
])
def test_model_dependent_checks_fail_before_pruning(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(_cfg(tmp_path, "model=tiny-gpt2", override))


def test_cli_multirun_and_collect(tmp_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "harness", "-m", *FAST, f"out_dir={tmp_path / 'runs'}",
                        f"hydra.sweep.dir={sweep}", "model=tiny-llama", "metric=random,l2", "sparsity=0.2,0.4",
                        "collect.where=['metric=random']"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(records.load_complete(tmp_path / "runs")) == 4
    # the multirun callback collected the runs matching collect.where into out_dir/.. at the end of the sweep
    after_sweep = (tmp_path / "tables" / "table3_tiny-llama.md").read_text()
    assert "random" in after_sweep and "l2" not in after_sweep
    c = subprocess.run([sys.executable, "-m", "harness", "collect", "--runs", str(tmp_path / "runs"), "--out",
                        str(tmp_path / "results"), "--rows", "metric", "--cols", "sparsity", "--values", "ppl.wikitext2"],
                       capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-3000:]
    md = (tmp_path / "results" / "tables" / "pivot_ppl.wikitext2.md").read_text()
    assert "random" in md and "l2" in md and "0.4" in md
    tex = (tmp_path / "results" / "tables" / "table3_tiny-llama.tex").read_text()
    assert "\\textbf{" in tex and "not significantly worse" in tex and "\\toprule" in tex
    assert (tmp_path / "results" / "plots" / "ppl_vs_sparsity_tiny-llama_attention+mlp_c4_8_ptb.png").exists()


def _wait_for_pruned_record(tmp_path, timeout=300):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:  # until pruning is recorded, i.e. evaluation is running
        found = list(tmp_path.glob("*/result.json"))
        if found and "pruning" in (records.read(found[0]) or {}):
            return found[0]
        time.sleep(0.2)
    raise AssertionError("the run never reached evaluation")


def test_sigterm_stops_the_whole_local_sweep(tmp_path):
    """SIGTERM ends the sweep (like Ctrl-C), not just the current job."""
    import os
    import signal

    args = [sys.executable, "-m", "harness", "-m", "model=tiny-llama", "logger=none", "calibration.n_samples=8",
            f"out_dir={tmp_path}", "eval.efficiency.seqlen=32", "sparsity=0.2,0.3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = _wait_for_pruned_record(tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert [records.read(p)["status"] for p in tmp_path.glob("*/result.json")] == ["interrupted"]
    assert records.read(path)["error"] == "Interrupted: signal 15"


def test_sigint_during_evaluation_leaves_no_complete_record_and_rerun_completes(tmp_path):
    import os
    import signal
    import time

    args = [sys.executable, "-m", "harness", "model=tiny-llama", "logger=none", "calibration.n_samples=8",
            f"out_dir={tmp_path}", "eval.efficiency.seqlen=32", "eval.ppl.max_tokens=131072",
            "eval.ppl.datasets=[wikitext2]"]
    # a shell's background job (`nohup ... &`) ignores SIGINT, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    path = _wait_for_pruned_record(tmp_path)
    while not (records.read(path) or {}).get("eval", {}).get("partial"):  # WikiText-2 windows under way
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=300)  # generous: a loaded machine slows the unwinding
    rec = records.read(path)
    assert rec["status"] == "interrupted" and not records.is_complete(path)
    done_before = rec["eval"]["partial"]["ppl.wikitext2"]["windows_done"]
    assert 0 < done_before < 131072 // 128
    assert not list(path.parent.glob(".result.*.tmp"))
    assert (path.parent / "checkpoint" / "config.json").exists()  # the pruned model is kept
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    final = records.read(path)
    assert final["status"] == "complete" and final["attempts"] == 2  # resumed, not re-pruned
    assert final["pruning"] == rec["pruning"]
    assert final["eval"]["ppl"]["wikitext2"]["windows_resumed"] == done_before  # finished windows were kept
    assert "partial" not in final["eval"]
    assert not (path.parent / "checkpoint").exists()


def test_eval_full_records_all_seven_tasks(tmp_path):
    from harness.evaluate.zeroshot import TASKS

    rec = run(_cfg(tmp_path, "model=tiny-llama", "metric=l2", "eval=full", "eval.zeroshot.limit=10",
                   "eval.ppl.max_tokens=1024"))
    zs = rec["eval"]["zeroshot"]
    assert set(zs) == set(TASKS) and all(v["n"] == 10 for v in zs.values())
    assert rec["eval"]["zeroshot_protocol"]["average_metrics"]["hellaswag"] == "acc_norm"
    assert 0 <= rec["eval"]["zeroshot_avg"] <= 1


def test_recovery_on_its_own_set_is_recorded_and_labelled(gpt2_record, tmp_path, zoo):
    """Both calibration sets go into the record (sources, splits, sequences, a hash of the token
    ids that a fresh draw reproduces) and into the collected rows' labels."""
    from harness.collect.frame import frame
    from harness.data import calibration

    shared, _ = gpt2_record
    assert shared["pruning"]["remedy_calibration"] == {"same_as": "calibration"}
    rec = run(_cfg(tmp_path, "model=tiny-gpt2", "remedy=recovery", "remedy.calibration.dataset=downstream",
                   "remedy.calibration.n_samples=32"))
    scoring, fitting = rec["pruning"]["calibration"], rec["pruning"]["remedy_calibration"]
    (part,) = fitting["sources"]
    assert part["source"] == "downstream" and sum(part["examples"].values()) == 32
    assert set(part["splits"].values()) == {"validation"} and fitting["sequences"] == part["sequences"] > 0
    _, tok = zoo("tiny-gpt2")
    again = calibration.draw(tok, "downstream", 32, fitting["seqlen"], fitting["seed"])
    assert fitting["sha256"] == again.describe()["sha256"] != scoring["sha256"]
    assert scoring["sources"] == [{"source": "c4", "count": 8, "split": "train", "sequences": 8}]
    assert list(frame([shared, rec])["remedy_data"]) == ["same", "downstream/32"]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_lazy_run_records_what_the_in_memory_run_does(tmp_path, model):
    """model.lazy=true: pruned and evaluated (perplexity, zero-shot) one block at a time from
    the safetensors, the pruned model exported shard by shard; the same run (one run id), the
    same numbers."""
    from harness.models.export import load_exported

    overrides = (f"model={model}", "metric=flap", "remedy=bias", "allocation=adaptive", "save_model=true", "eval=full",
                 "eval.efficiency=null", "eval.zeroshot.tasks=[piqa,arc_challenge]", "eval.zeroshot.limit=5")
    held = run(_cfg(tmp_path / "held", *overrides))
    lazy = run(_cfg(tmp_path / "lazy", *overrides, "model.lazy=true"))
    assert lazy["run_id"] == held["run_id"] and lazy["status"] == "complete"
    assert lazy["pruning"]["per_layer"] == held["pruning"]["per_layer"]
    for dataset, ppl in held["eval"]["ppl"].items():
        assert lazy["eval"]["ppl"][dataset]["value"] == pytest.approx(ppl["value"], rel=1e-5)
    for task, scores in held["eval"]["zeroshot"].items():
        assert [lazy["eval"]["zeroshot"][task][k] for k in ("acc", "acc_norm", "n")] == [scores[k] for k in ("acc", "acc_norm", "n")]
    assert lazy["eval"]["zeroshot_avg"] == held["eval"]["zeroshot_avg"]
    assert not (tmp_path / "lazy" / lazy["run_id"] / "checkpoint").exists()
    exported, reference = load_exported(lazy["saved_model"]), load_exported(held["saved_model"])
    for (name, a), (_, b) in zip(exported.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("track", [("sparsity_type=unstructured", "sparsity=0.5", "metric=sparsegpt"),
                                   ("sparsity_type=nm", "nm=2:4", "sparsity=0.5", "metric=wanda"),
                                   ("sparsity_type=unstructured", "sparsity=0.5", "metric=magnitude", "model.layers=[1,3]")],
                         ids=["sparsegpt", "wanda-2:4", "magnitude-data-free-layers"])
def test_a_lazy_masked_run_masks_and_evaluates_as_the_in_memory_run(tmp_path, track):
    """The masking track on the block engine with model.lazy=true: the same masks (every layer's
    zeros where the in-memory run put them) and the same perplexities, the model never whole."""
    from harness.models.export import load_exported

    overrides = ("model=tiny-llama", *track, "save_model=true", "eval.efficiency=null")
    held = run(_cfg(tmp_path / "held", *overrides))
    lazy = run(_cfg(tmp_path / "lazy", *overrides, "model.lazy=true"))
    assert lazy["run_id"] == held["run_id"] and lazy["status"] == "complete"
    assert lazy["pruning"]["per_layer"] == held["pruning"]["per_layer"]
    assert lazy["pruning"]["zero_weights"] == held["pruning"]["zero_weights"] > 0
    for dataset, ppl in held["eval"]["ppl"].items():
        assert lazy["eval"]["ppl"][dataset]["value"] == pytest.approx(ppl["value"], rel=1e-5)
    exported, reference = load_exported(lazy["saved_model"]), load_exported(held["saved_model"])
    for (name, a), (_, b) in zip(exported.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a == 0, b == 0), name  # the same mask
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("available,lazy", [(2**20, True), (2**50, False)])
def test_lazy_auto_holds_the_model_block_by_block_only_when_it_would_not_fit(tmp_path, monkeypatch, available, lazy):
    """model.lazy=auto decides from the checkpoint's weights against the memory available (here
    set to 1 MiB, or 1 PiB), records why, and then runs exactly as model.lazy=true or false does."""
    from safetensors.torch import load_file

    from harness import holding
    from harness.models import loading, zoo

    monkeypatch.setattr(loading, "free_memory", lambda device: available)
    held_lazily, load = [], holding.load
    monkeypatch.setattr(holding, "load", lambda *a: held_lazily.append(a[-1]) or load(*a))
    overrides = ("model=tiny-llama", "metric=flap", "eval.efficiency=null")
    auto = run(_cfg(tmp_path / "auto", *overrides, "model.lazy=auto"))
    assert held_lazily == [lazy]
    fixed = run(_cfg(tmp_path / "fixed", *overrides, f"model.lazy={str(lazy).lower()}"))
    weights = sum(t.numel() * 4 for t in load_file(zoo.locate("tiny-llama") / "model.safetensors").values())  # float32
    assert auto["lazy_auto"] == {"lazy": lazy, "weights_bytes": weights, "available_bytes": available}
    assert auto["run_id"] == fixed["run_id"] and auto["status"] == "complete"
    assert auto["pruning"]["per_layer"] == fixed["pruning"]["per_layer"]
    for dataset, ppl in fixed["eval"]["ppl"].items():
        assert auto["eval"]["ppl"][dataset]["value"] == pytest.approx(ppl["value"], rel=1e-6)


def test_a_resumed_lazy_auto_run_keeps_its_first_decision(tmp_path, monkeypatch):
    """The first attempt went lazy and checkpointed its exported blocks; memory has grown since,
    but the re-run resumes from that checkpoint on the same path instead of deciding again."""
    import harness.run as run_module
    from harness.models import loading

    cfg = _cfg(tmp_path, "model=tiny-llama", "metric=flap", "eval.efficiency=null", "model.lazy=auto")
    monkeypatch.setattr(loading, "free_memory", lambda device: 2**20)
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    monkeypatch.setattr(loading, "free_memory", lambda device: 2**50)
    rec = run(cfg)
    assert rec["status"] == "complete" and rec["attempts"] == 2
    assert rec["lazy_auto"]["lazy"] and rec["lazy_auto"]["available_bytes"] == 2**20


def test_lazy_auto_refuses_what_needs_the_whole_model_when_it_would_not_fit(tmp_path, monkeypatch):
    from harness.models import loading

    monkeypatch.setattr(loading, "free_memory", lambda device: 2**20)
    with pytest.raises(ConfigError, match=r"metric=taylor needs whole-model gradients, which model.lazy=auto "
                                          r"\(the weights, 0\.\d+ GB, exceed 80% of the 0\.00 GB available\) never holds"):
        run(_cfg(tmp_path, "model=tiny-llama", "model.lazy=auto", "metric=taylor", "eval.efficiency=null"))
    record = json.loads(next(tmp_path.glob("*/result.json")).read_text())
    assert record["status"] == "failed" and record["lazy_auto"]["lazy"] and "pruning" not in record


def test_model_lazy_accepts_true_false_and_auto_only(tmp_path):
    with pytest.raises(ConfigError, match="model.lazy='sometimes' is not accepted; accepted: true, false, auto"):
        run(_cfg(tmp_path, "model=tiny-llama", "model.lazy=sometimes"))


@pytest.mark.parametrize("override,message", [("metric=taylor", "whole-model gradients"), ("finetune=lora", "finetune=lora"),
                                               ("eval.efficiency.seqlen=16", "eval.efficiency"),
                                               ("calibration=selfgen", "samples text from the whole model")])
def test_lazy_refuses_what_needs_the_whole_model_before_loading(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(_cfg(tmp_path, "model=tiny-llama", "model.lazy=true", *(["eval.efficiency=null"] * ("efficiency" not in override)),
                 *override.split()))
