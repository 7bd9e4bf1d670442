"""Sweeps through Hydra's submitit launcher on a real single-node Slurm (scripts/slurm-local).

The session starts its own cluster (own folder and ports) and stops it afterwards; it is
skipped, with the reason, where Slurm cannot be installed or started."""

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from harness import records

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parent.parent
FAST = ["logger=none", "calibration.n_samples=8", "eval.efficiency.seqlen=32"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "HARNESS_SLURM_DIR": str(folder), "HARNESS_SLURM_PORT": "6927"}
    up = subprocess.run([str(ROOT / "scripts" / "slurm-local"), "up"], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.skip(f"could not start a local Slurm cluster: {up.stderr[-500:]}")
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    yield env
    subprocess.run([str(ROOT / "scripts" / "slurm-local"), "down"], env=env, capture_output=True, timeout=120)


def _sweep(env, tmp_path, *overrides, timeout=600, wait=True):
    args = [sys.executable, "-m", "harness", "-m", "launcher=slurm", *FAST, f"out_dir={tmp_path / 'runs'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
            *overrides]
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def _queue_empty(env, deadline=300):
    end = time.time() + deadline
    while time.time() < end:
        out = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(1)
    raise AssertionError(f"jobs still queued: {out}")


def test_sweep_runs_as_a_job_array_survives_scancel_and_the_rerun_finishes_only_the_missing_run(cluster, tmp_path):
    """A two-point sweep as a Slurm job array, one task at a time; the second is cancelled while
    it evaluates; the re-run skips the finished one, resumes the cancelled one from its checkpoint,
    and the collector (the sweep's end callback) tabulates both."""
    # 64k tokens per dataset: an evaluation long enough to be caught and cut, short enough for a shared CPU
    overrides = ["model=tiny-llama", "metric=random,l2", "sparsity=0.2", "hydra.launcher.array_parallelism=1",
                 "eval.ppl.max_tokens=65536"]
    proc = _sweep(cluster, tmp_path, *overrides, wait=False)
    victim = None
    end = time.time() + 900  # generous: a loaded machine slows every job
    while time.time() < end and victim is None:  # wait for a job that is evaluating after another completed
        found = [records.read(p) or {} for p in (tmp_path / "runs").glob("*/result.json")]
        if any(r.get("status") == "complete" for r in found):
            victim = next((r for r in found if r.get("status") == "running" and "pruning" in r), None)
        time.sleep(0.5)
    assert victim is not None, "no second job reached evaluation"
    slurm = victim["env"]["slurm"]
    subprocess.run(["scancel", f"{slurm['array_job_id']}_{slurm['array_task_id']}"], env=cluster, check=True)
    proc.communicate(timeout=600)
    _queue_empty(cluster)
    path = Path(victim["path"])
    assert records.read(path)["status"] == "interrupted" and not records.is_complete(path)
    before = {r["run_id"]: r["finished_at"] for r in records.load_complete(tmp_path / "runs")}
    assert len(before) == 1

    r = _sweep(cluster, tmp_path, *overrides)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    after = {r["run_id"]: r for r in records.load_complete(tmp_path / "runs")}
    assert len(after) == 2
    assert all(rec["env"]["slurm"]["array_job_id"] for rec in after.values())  # they ran as Slurm array tasks
    assert all(after[k]["finished_at"] == v for k, v in before.items())  # finished runs were skipped
    assert after[victim["run_id"]]["attempts"] == 2  # the cancelled one resumed from its checkpoint
    collected = pd.read_csv(tmp_path / "tables" / "runs.csv")  # collect.out = out_dir/..
    assert sorted(collected["metric"]) == ["l2", "random"]


@contextlib.contextmanager
def _requeued_jobs_start_at_once(env):
    """Slurm makes a requeued job eligible only two minutes later (EligibleTime = requeue + 121 s);
    start such jobs at once, so that the test waits for the harness's resume, not for that delay."""
    stop = threading.Event()

    def release():
        while not stop.wait(2):
            pending = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], env=env, capture_output=True,
                                     text=True).stdout.split("\n")
            for job in (line.split()[0] for line in pending if line.endswith("BeginTime")):
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _partial_windows(record: dict) -> int:
    """Perplexity windows an unfinished evaluation has recorded so far."""
    return sum(len(p.get("nll_windows", [])) for p in record.get("eval", {}).get("partial", {}).values())


def test_job_signalled_before_its_time_limit_is_requeued_and_resumes_where_it_stopped(cluster, tmp_path):
    """Slurm warns a job before its time limit with USR2 (hydra.launcher.signal_delay_s); submitit
    then checkpoints and requeues it. The signal is sent here as soon as the record shows evaluation
    progress, not by a clock, so the test does not depend on how loaded the machine is: the requeued
    attempt must resume from the pruned-model checkpoint and the windows already done, and finish."""
    with _requeued_jobs_start_at_once(cluster):
        proc = _sweep(cluster, tmp_path, "model=tiny-llama", "eval.ppl.seqlen=512", "hydra.launcher.timeout_min=30",
                      "hydra.launcher.cpus_per_task=2", wait=False)
        try:
            cut = None
            end = time.time() + 900
            while time.time() < end and cut is None:
                found = [records.read(p) or {} for p in (tmp_path / "runs").glob("*/result.json")]
                cut = next((r for r in found if _partial_windows(r) > 0), None)
                time.sleep(0.5)
            assert cut is not None, "the job never reached its perplexity evaluation"
            job = cut["env"]["slurm"]["job_id"]
            subprocess.run(["scancel", "--signal=USR2", str(job)], env=cluster, check=True)
            out, _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out[-3000:]
    (rec,) = records.load_complete(tmp_path / "runs")
    assert rec["attempts"] == 2
    resumed = {d: p["windows_resumed"] for d, p in rec["eval"]["ppl"].items()}
    assert sum(resumed.values()) >= _partial_windows(cut) > 0, resumed  # nothing done before the cut was redone
    assert rec["eval"]["ppl"]["wikitext2"]["tokens"] > 500_000  # whole datasets, not a cap
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").glob(".submitit/*/*.out"))
    assert "preempted" in logs or "requeu" in logs.lower()
