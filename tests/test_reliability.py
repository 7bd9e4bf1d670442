"""Faults a user meets: bad values refused before the model loads, records that never lie or
get lost, malformed records reported, checkpoints that cannot half-exist, stalled requeues."""

import json
import logging
import math
import threading
import time

import pytest
import torch
from omegaconf import OmegaConf

from harness import records, resume
from harness.config import ConfigError, compose
from harness.data.corpora import CorruptDataError
from harness.run import run

FAST = ["+debug=fast", "calibration.n_samples=4"]


def _cfg(out, *overrides):
    return compose(*FAST, f"out_dir={out}", *overrides)


class _ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything gets as far as loading a model."""
    from harness.models import loading

    def refuse(*args, **kwargs):
        raise _ModelLoaded("a model was loaded")

    monkeypatch.setattr(loading, "load", refuse)


BAD_VALUES = [  # override, the start of the message that must name it
    ("remedy=recovery remedy.damp=-1", "remedy.damp=-1.0; accepted: a finite number > 0"),
    ("remedy=recovery remedy.damp=nan", "remedy.damp=nan; accepted: a finite number > 0"),
    ("remedy=recovery remedy.damp=0", "remedy.damp=0.0; accepted"),
    ("eval.ppl.max_tokens=-5", "eval.ppl.max_tokens=-5; accepted: an integer >= 128, or null (the whole stream)"),
    ("eval.ppl.max_tokens=100", "eval.ppl.max_tokens=100; accepted: an integer >= 128"),
    ("eval.ppl.max_tokens=0", "eval.ppl.max_tokens=0; accepted: an integer >= 128"),
    ("eval=full eval.zeroshot.limit=0", "eval.zeroshot.limit=0; accepted: an integer >= 1, or null (every example)"),
    ("eval=full eval.zeroshot.batch_size=0", "eval.zeroshot.batch_size=0; accepted: an integer >= 1"),
    ("prune.chunk_size=0", "prune.chunk_size=0; accepted: an integer >= 1"),
    ("prune.chunk_size=-1", "prune.chunk_size=-1; accepted: an integer >= 1"),
    ("prune.modules=[mlp,mlp]", "prune.modules=['mlp', 'mlp']; accepted: a non-empty subset of [attention, mlp], each at most once"),
    ("prune.modules=[]", "prune.modules=[]; accepted"),
    ("device=cudafoo", "device='cudafoo' is not accepted; accepted: auto, cpu, cuda, cuda:N, mps"),
    ("sparsity=1.5", "sparsity=1.5 is outside [0, 1)"),
    ("sparsity=-0.1", "sparsity=-0.1 is outside [0, 1)"),
    ("calibration.n_samples=0", "calibration.n_samples=0; accepted: an integer >= 1"),
    ("calibration.seqlen=1", "calibration.seqlen=1; accepted: an integer >= 2"),
    ("eval.ppl.seqlen=1", "eval.ppl.seqlen=1; accepted: an integer >= 2"),
    ("eval.ppl.batch_size=0", "eval.ppl.batch_size=0; accepted: an integer >= 1"),
    ("seed=-1", "seed=-1; accepted: an integer >= 0"),
    ("dtype=float8", "dtype='float8' is not accepted"),
    ("eval.ppl.protocol=nope", "eval.ppl.protocol='nope' is not accepted; accepted: llmpruner, gptq"),
    ("eval.ppl.datasets=[c5]", "eval.ppl.datasets item='c5' is not accepted; accepted: wikitext2, ptb"),
    ("model.bos=every", "model.bos='every' is not accepted; accepted: stream, window"),
    ("prune.attention_unit=head", "prune.attention_unit='head' is not accepted; accepted: kv_group, query_head"),
    ("model.path=/does/not/exist", "model.path='/does/not/exist' does not exist"),
    ("model.layers=[2,1]", "model.layers=[2, 1]; accepted: [start, end) with 0 <= start < end"),
    ("remedy=recovery remedy.toward=one", "remedy.toward='one' is not accepted; accepted: zero, weights"),
    ("sparsity_mode=layer", "sparsity_mode='layer' is not accepted; accepted: model, module"),
    ("calibration.dataset=wiki", "calibration.dataset='wiki': unknown source 'wiki'; accepted: wikitext2, ptb, c4"),
    ("remedy.calibration.n_samples=0", "remedy.calibration.n_samples=0; accepted: an integer >= 1"),
    ("calibration.dataset=downstream calibration.downstream_split=dev",
     "calibration.downstream_split='dev'; accepted: auto, train, validation, test"),
    ("remedy=recovery remedy.calibration.dataset=downstream remedy.calibration.downstream_tasks=[arc_easy] "
     "remedy.calibration.downstream_split=test", "calibration on arc_easy/test would train on evaluated data"),
    ("remedy=recovery remedy.calibration.dataset=downstream remedy.calibration.n_samples=5000",
     "remedy.calibration.n_samples asks for 5000 downstream examples; arc_easy/validation, arc_challenge/validation, "
     "openbookqa/validation hold 1369"),
    # the unstructured / N:M track
    ("sparsity_type=blocky", "sparsity_type='blocky' is not accepted; accepted: structured, unstructured, nm"),
    ("sparsity_type=nm sparsity=0.5 metric=similarity",
     "metric='similarity' is not accepted with sparsity_type=nm; accepted: magnitude, mrp_m, mrp_s, sparsegpt, wanda"),
    ("sparsity_type=unstructured metric=sparsegpt remedy=recovery",
     "remedy='recovery' acts on removed units; with sparsity_type=unstructured accepted: none"),
    ("sparsity_type=nm nm=2:4 sparsity=0.2 metric=wanda", "sparsity=0.2 does not match nm=2:4"),
    ("sparsity_type=nm nm=4:2 sparsity=0.5 metric=wanda", "nm='4:2'"),
    ("sparsity_type=unstructured metric=wanda allocation=adaptive", "allocation='adaptive' is structured-only"),
    ("metric=sparsegpt", "metric='sparsegpt' is not accepted with sparsity_type=structured; accepted:"),
    # HyWIA and LoRA
    ("metric=hywia metric.params.policy=cosine", "metric: unknown hywia policy 'cosine'; accepted: fixed, depth, softmax"),
    ("metric=hywia metric.params.alpha=2", "metric: hywia alpha=2 is out of range; accepted: 0 <= alpha <= 1"),
    ("finetune=lora finetune.rank=0", "finetune.rank=0; accepted: an integer >= 1"),
    ("finetune=lora finetune.lr=0", "finetune.lr=0.0; accepted: a finite number > 0"),
    ("finetune=lora finetune.lr=inf", "finetune.lr=inf; accepted: a finite number > 0"),
    ("finetune=lora finetune.alpha=inf", "finetune.alpha=inf; accepted: a finite number > 0"),
    ("finetune=lora finetune.alpha=nan", "finetune.alpha=nan; accepted: a finite number > 0"),
    ("finetune=lora finetune.dropout=1", "finetune.dropout=1.0 is out of range; accepted: 0 <= dropout < 1"),
    ("finetune=lora finetune.rank=100000", "finetune.rank=100000 exceeds the width of the adapted layer"),
    # parameters and values the methods' own code would only trip over deep inside
    ("sparsity_type=unstructured sparsity=0.5 metric=sparsegpt metric.params.damp=nan",
     "metric.params.damp=nan; accepted: a finite number >= 0"),
    ("sparsity_type=unstructured sparsity=0.5 metric=sparsegpt metric.params.damp=inf",
     "metric.params.damp=inf; accepted: a finite number >= 0"),
    ("+metric.params.bogus=1", "metric.params.bogus is not a parameter of metric=ours; accepted: tau, data_free"),
    ("metric=l2 +metric.params.bogus=1", "metric.params.bogus is not a parameter of metric=l2; accepted: none"),
    ("sparsity_type=nm sparsity=0.5 metric=wanda +metric.params.damp=0.1",
     "metric.params.damp is not a parameter of metric=wanda; accepted: none"),
    # more than the data or the machine can hold
    ("remedy=recovery remedy.calibration.n_samples=100000",
     "remedy.calibration.n_samples=100000: 100000 windows of 128 tokens from c4 need 12,800,000 tokens"),
    ("out_dir=/proc/forbidden", "out_dir='/proc/forbidden' is not writable"),
    ("finetune=lora finetune.data.n_samples=0", "finetune.data.n_samples=0; accepted: an integer >= 1"),
    ("finetune=lora sparsity_type=unstructured metric=wanda",
     "finetune=lora would make the masked weights dense again"),
]
if not torch.cuda.is_available():
    BAD_VALUES.append(("device=cuda", "device='cuda' but no CUDA device is available; accepted here: auto, cpu"))


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_refused_naming_it_before_any_model_loads(overrides, message, tmp_path, no_model):
    with pytest.raises(ConfigError) as e:
        run(_cfg(tmp_path / "runs", *overrides.split()))
    assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "runs").exists()  # no record, not even a folder


def test_unwritable_out_dir_is_refused_before_the_model_loads(tmp_path, no_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="out_dir=.*a-file/runs' is not writable"):
        run(_cfg(blocker / "runs"))


def test_wrong_wikitext2_copy_is_refused_before_the_model_loads(tmp_path, no_model, monkeypatch):
    from harness.data import corpora

    rows = list(corpora.documents("wikitext2", "test"))
    bad = tmp_path / "data" / "wikitext-2-raw-v1"
    bad.mkdir(parents=True)
    (bad / "test.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:-1]))
    corpora.documents.cache_clear()
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "data"))
    try:
        with pytest.raises(CorruptDataError, match="has sha256 .* the file is truncated or altered"):
            run(_cfg(tmp_path / "runs", f"data_dir={tmp_path / 'data'}"))
    finally:
        corpora.documents.cache_clear()
    assert not (tmp_path / "runs").exists()


def test_records_are_strict_json(tmp_path):
    path = tmp_path / "r" / "result.json"
    records.write(path, {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}})
    strict = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert strict == {"a": None, "b": [1.0, None], "c": {"d": None}}


def _fake_complete(run_id: str) -> dict:
    return {"run_id": run_id, "status": "complete", "config": {}, "model": {}, "pruning": {}, "eval": {"fake": True}}


def test_a_concurrent_duplicate_waits_and_never_overwrites_a_complete_record(tmp_path):
    cfg = _cfg(tmp_path)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    run_id = records.config_hash(config)
    folder = tmp_path / run_id
    results = []
    with records.claim(folder):  # another process is running this config
        worker = threading.Thread(target=lambda: results.append(run(cfg)))
        worker.start()
        time.sleep(3)
        assert worker.is_alive() and not (folder / "result.json").exists()  # it waits, doing nothing
        assert records.is_locked(folder)
        records.write(folder / "result.json", _fake_complete(run_id))  # ... and that process completes
    worker.join(120)
    assert results == [_fake_complete(run_id)]  # the waiter skipped it: nothing was redone or overwritten
    assert records.read(folder / "result.json")["eval"] == {"fake": True}
    assert not records.is_locked(folder)


def test_collector_reports_malformed_and_dead_records_and_never_crashes(tmp_path, caplog):
    from harness import collect

    bad = {"truncated": '{"run_id": "x", "stat', "empty": "", "list": "[1]", "no-config": '{"status": "complete"}',
           "complete-without-results": json.dumps({"run_id": "y", "status": "complete", "config": {}})}
    for name, text in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(text)
    records.write(tmp_path / "dead" / "result.json", {"run_id": "d", "status": "running", "config": {},
                                                      "process": {"host": "node7", "pid": 4242}})
    (tmp_path / "dead" / ".lock").write_text("{}")
    records.write(tmp_path / "shapeless" / "result.json", _fake_complete("s"))
    with caplog.at_level(logging.WARNING):
        assert [r["run_id"] for r in records.load_complete(tmp_path)] == ["s"]
        assert collect.frame(records.load_complete(tmp_path)).empty
        with pytest.raises(SystemExit, match="no record matches|no complete records"):
            collect.collect(tmp_path, tmp_path / "out")
    text = caplog.text
    for name, why in [("truncated", "not JSON"), ("empty", "empty file"), ("list", "not a record (a JSON list)"),
                      ("no-config", "not a record (no config, run_id)"),
                      ("complete-without-results", "says complete but has no model/pruning/eval"),
                      ("dead", "says running (host node7, pid 4242) but no process holds its lock")]:
        assert f"{tmp_path / name / 'result.json'}" in text and why in text, (name, text)
    assert "malformed record" in text  # the shapeless one reaches the table code and is skipped there


def test_a_live_running_record_is_not_reported_as_dead(tmp_path, caplog):
    records.write(tmp_path / "live" / "result.json", {"run_id": "l", "status": "running", "config": {}})
    with records.claim(tmp_path / "live"), caplog.at_level(logging.WARNING):
        records.load_complete(tmp_path)
    assert "no process holds its lock" not in caplog.text


def test_a_checkpoint_write_failing_midway_is_discarded_and_the_rerun_completes(tmp_path, monkeypatch):


    real_save = resume.export

    def full_disk(model, tok, path):
        real_save(model, tok, path)
        next(path.glob("*.safetensors")).write_bytes(b"\0" * 10)  # the weights are cut short
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume, "export", full_disk)
    cfg = _cfg(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        run(cfg)
    (path,) = tmp_path.glob("*/result.json")
    assert records.read(path)["status"] == "failed"
    assert not (path.parent / "checkpoint").exists()  # only the marked-incomplete temporary folder
    monkeypatch.setattr(resume, "export", real_save)
    rec = run(cfg)
    assert rec["status"] == "complete" and "attempts" not in rec  # pruned again, not resumed from junk
    assert not (path.parent / "checkpoint.partial").exists()


def test_a_corrupt_complete_checkpoint_is_discarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import harness.run as run_module

    cfg = _cfg(tmp_path)
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    (path,) = tmp_path.glob("*/result.json")
    weights = next((path.parent / "checkpoint").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        rec = run(cfg)
    assert rec["status"] == "complete" and "attempts" not in rec
    assert "discarding the checkpoint" in caplog.text


def test_a_requeued_attempt_that_finished_nothing_stops_with_a_clear_message(tmp_path, monkeypatch):
    import harness.run as run_module

    cfg = _cfg(tmp_path)
    real_evaluate = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)  # attempt 1: pruned and checkpointed, then cut before any evaluation finished
    (path,) = tmp_path.glob("*/result.json")
    with pytest.raises(KeyboardInterrupt):
        run(cfg)  # attempt 2 resumes and is cut again, as a job at its time limit
    rec = records.read(path)
    assert rec["attempts"] == 2 and rec["progress_at_start"] == resume.progress(rec["eval"])
    records.write(path, {**rec, "requeued": True})  # as the requeue signal marks it
    monkeypatch.setattr(run_module, "evaluate", real_evaluate)
    with pytest.raises(RuntimeError, match="attempt 2 was requeued at its time limit without finishing anything: "
                                           "perplexity on wikitext2 does not fit in one job; raise hydra.launcher.timeout_min"):
        run(cfg)
    assert records.read(path)["status"] == "failed"
    assert run(cfg)["status"] == "complete"  # re-run by hand (the limit raised): resumes and finishes


def test_recovery_fits_that_fall_back_are_recorded_and_all_falling_back_fails(tmp_path, monkeypatch):
    from harness.remedy import recovery

    real = recovery.ridge_solve
    monkeypatch.setattr(recovery, "ridge_solve",
                        lambda xtx, rhs, damp, where, prior=None: None if where.startswith("block 0 ") else
                        real(xtx, rhs, damp, where, prior))
    rec = run(_cfg(tmp_path, "remedy=recovery"))
    fell_back = rec["pruning"]["recovery"]["fell_back"]
    assert fell_back and all(w.startswith("block 0 ") for w in fell_back)
    assert rec["pruning"]["recovery"]["fits"] > 0
    monkeypatch.setattr(recovery, "ridge_solve", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="remedy=recovery: every one of the .* fits fell back"):
        run(_cfg(tmp_path, "remedy=recovery", "seed=1"))


def test_truncated_weights_under_model_path_are_named(tmp_path):
    import shutil

    from harness.models import zoo

    folder = tmp_path / "model"
    shutil.copytree(zoo.locate("tiny-gpt2"), folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(Exception, match=f"model.path: cannot read the weights in {folder}: {weights.name}: .*truncated"):
        run(_cfg(tmp_path / "runs", f"model.path={folder}"))


def test_a_run_over_a_malformed_record_warns_and_completes(tmp_path, caplog):
    from omegaconf import OmegaConf

    cfg = _cfg(tmp_path)
    path = records.record_path(tmp_path, records.config_hash(OmegaConf.to_container(cfg, resolve=True)))
    path.parent.mkdir(parents=True)
    path.write_text("[1]")
    with caplog.at_level(logging.WARNING):
        assert run(cfg)["status"] == "complete"
    assert f"ignoring {path}: not a record (a JSON list)" in caplog.text


def test_a_run_that_would_not_fit_in_memory_is_refused_before_loading(tmp_path, no_model, monkeypatch):
    from harness import preflight

    monkeypatch.setattr(preflight, "free_memory", lambda device: 10_000_000)  # 10 MB free
    with pytest.raises(ConfigError, match=r"this run needs at least 0\.\d+ GB \(weights .*calibration stream .*\) and "
                                          r"0\.01 GB are free on cpu"):
        run(_cfg(tmp_path / "runs", "calibration.n_samples=64"))
    assert not (tmp_path / "runs").exists()


def test_the_memory_estimate_counts_what_the_run_holds():
    """By hand for tiny-gpt2: its parameters at 4 bytes; the stream into and out of a block,
    float32, doubled by recovery's dense stream beside it."""
    from harness import preflight
    from harness.config import typed
    from harness.prune import n_params

    cfg = typed(compose(*FAST, "calibration.n_samples=10", "remedy=recovery"))
    model = preflight.skeleton(OmegaConf.structured(cfg.model), torch.float32)
    parts = preflight.memory_estimate(cfg, model, torch.float32)
    hidden = model.config.n_embd
    assert parts == {"weights": 4 * n_params(model), "calibration stream": 4 * 10 * cfg.calibration.seqlen * hidden * 4}


def test_a_refused_value_reaches_the_command_line_as_one_line(tmp_path):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "harness", "+debug=fast", "sparsity=1.5", f"out_dir={tmp_path}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert r.returncode == 2
    assert r.stderr.strip() == ("harness: sparsity=1.5 is outside [0, 1); accepted: a number with 0 <= sparsity < 1"), r.stderr
    full = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert "Traceback" in full.stderr and "ConfigError" in full.stderr  # the whole trace on request


@pytest.mark.parametrize("overrides,accepted", [(["metric=nope"], "flap, hywia"),
                                                (["metric=nope", "sparsity_type=nm"], "magnitude, mrp_m, mrp_s, sparsegpt, wanda"),
                                                (["-m", "metric=ours,sparsegpt"], "flap, hywia")])
def test_an_unknown_metric_choice_lists_the_choices_of_the_runs_track(overrides, accepted):
    from harness.config import check_choices

    with pytest.raises(ConfigError) as e:
        check_choices(overrides)
    track = "nm" if "sparsity_type=nm" in overrides else "structured"
    assert f"with sparsity_type={track}; accepted: {accepted}" in str(e.value)
    assert ("ours" in str(e.value)) == (track == "structured")


def test_known_metric_choices_pass_the_choice_check():
    from harness.config import check_choices

    check_choices(["-m", "metric=ours,flap,taylor_mix", "sparsity=0.2,0.5"])
    check_choices(["metric=sparsegpt", "sparsity_type=unstructured"])
