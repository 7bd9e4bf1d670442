"""wandb tracking: one run read back from its offline transaction log; the tracker's failure
modes and collecting from a project without running anything (tests/synthetic.py)."""

import json
import time
from pathlib import Path

import pytest

from harness import collect
from harness.collect import sources
from harness.config import compose
from harness.run import run
from tests import synthetic

FAST = ["+debug=fast", "logger=wandb", "eval.ppl.max_tokens=2048"]


def _cfg(out, *overrides):
    return compose(*FAST, f"out_dir={out}", *overrides)


def read_wandb_log(path: Path):
    """The protobuf records of a .wandb file: a ':W&B' header, then LevelDB-log framed chunks
    (crc32c, little-endian length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0 or pos + 7 + length > len(data):  # end of what has been written so far
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def complete_wandb_log(path: Path, timeout_s: float = 60.0) -> list:
    """The log's records once its closing `exit` record is on disk: wandb-core writes the file
    in blocks and may close it a moment after `run.finish()` has returned (a CI run read it
    half-written)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(read_wandb_log(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_offline_wandb_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rec = run(_cfg(tmp_path, "logger=wandb"), group="sweep-42")
    logs = list((tmp_path / rec["run_id"]).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    got = {"config": {}, "summary": {}, "history": set(), "files": set()}
    for r in complete_wandb_log(logs[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            got["run"] = r.run
            got["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            got["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            got["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update})
        elif kind == "history":
            got["history"].update(i.key or ".".join(i.nested_key) for i in r.history.item)
        elif kind == "files":
            got["files"].update(f.path for f in r.files.files)
    assert got["run"].run_id == rec["run_id"] and got["run"].run_group == "sweep-42" and got["run"].job_type == "prune_eval"
    assert got["config"]["metric.name"] == "ours" and got["config"]["sparsity"] == 0.2
    assert got["config"]["model.name"] == "tiny-gpt2"
    assert got["summary"]["eval.ppl.wikitext2"] == pytest.approx(rec["eval"]["ppl"]["wikitext2"]["value"])
    assert got["summary"]["pruning.sparsity_achieved"] == pytest.approx(rec["pruning"]["sparsity_achieved"])
    assert "per_layer._type" in got["history"]  # the per-layer kept heads/channels table
    assert "result.json" in got["files"]
    assert rec["status"] == "complete" and rec["tracking"] == "wandb offline, not uploaded (`wandb sync` the run folder)"


def _tracker(out, **logger):
    from harness import tracking

    config = synthetic.record()["config"]
    return tracking.tracking({"name": "wandb", "project": "harness", "mode": "auto", **logger}, config, "run0001",
                             "local", out)


def test_wandb_failure_never_fails_the_run(tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    with _tracker(tmp_path, mode="offline") as tracker:
        assert tracker.status == "none (wandb init failed: wandb is down)"
        tracker.summary({"eval": {"ppl.wikitext2": 1.0}})  # every call is a no-op, none raises
        tracker.table("per_layer", [{"layer": 0}])
        tracker.save_record(tmp_path / "result.json")


class _FakeRun:
    def __init__(self, record: dict, state: str = "finished"):
        self.id, self.state, self._record = record["run_id"], state, record

    def file(self, name):
        record = self._record

        class _File:
            def download(self, root, replace=False):
                Path(root).mkdir(parents=True, exist_ok=True)
                (Path(root) / name).write_text(json.dumps(record))

        return _File()


class _FakeApi:
    def __init__(self, runs):
        self._runs = runs

    def runs(self, project):
        assert project == "me/harness"
        return self._runs


def test_collect_reads_records_from_a_wandb_project(tmp_path, monkeypatch):
    local = synthetic.record()
    synthetic.write(tmp_path / "runs", [local])
    remote = json.loads(json.dumps(local))
    remote.update(run_id="remote000001")
    remote["config"]["metric"]["name"] = "remote-metric"
    unfinished = {**remote, "run_id": "remote000002"}
    api = _FakeApi([_FakeRun(remote), _FakeRun(local), _FakeRun(unfinished, state="running")])
    got = sources.wandb_records("me/harness", api=api)
    assert {r["run_id"] for r in got} == {"remote000001", local["run_id"]}
    merged = sources.merge([local], got)
    assert [r["run_id"] for r in merged] == [local["run_id"], "remote000001"]

    monkeypatch.setattr(sources, "wandb_records", lambda project: got)
    collect.collect(tmp_path / "runs", tmp_path / "out", wandb_project="me/harness")
    runs_csv = (tmp_path / "out" / "tables" / "runs.csv").read_text()
    assert "remote-metric" in runs_csv and local["run_id"] in runs_csv


def test_online_without_a_server_falls_back_to_offline_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with _tracker(tmp_path, init_timeout_s=2) as tracker:
        assert tracker.status.startswith("wandb offline, not uploaded (online init failed")
    assert list(tmp_path.glob("wandb/offline-run-*"))  # kept for `wandb sync`
    assert time.perf_counter() - start < 120
