"""One harness run end to end: load -> calibrate -> prune -> evaluate -> record -> track.

`run(cfg)` is the Python API (a composed Hydra/OmegaConf config); `main` is the Hydra entry
point behind `python -m harness` and the `harness` console script.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from harness import __version__, calibration, metrics, records, tracking
from harness.evaluate import efficiency as eff
from harness.evaluate import perplexity
from harness.models import adapter_for, loading
from harness.models.pruned import load_pruned, save_pruned
from harness.prune import PruneSettings, n_params, prunable_layers, prune
from harness.validation import validate_config, validate_model

log = logging.getLogger("harness")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _environment(device: torch.device) -> dict:
    import lm_eval
    import transformers

    return {"versions": {"harness": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "lm_eval": lm_eval.__version__, "python": platform.python_version()},
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "git_sha": _git_sha(),
            "slurm": {k: os.environ[v] for k, v in (("job_id", "SLURM_JOB_ID"), ("array_job_id", "SLURM_ARRAY_JOB_ID"),
                                                    ("array_task_id", "SLURM_ARRAY_TASK_ID")) if v in os.environ} or None}


class _Interrupted(BaseException):
    """SIGTERM, raised like KeyboardInterrupt: a local launcher must not take it for one
    failed job and go on with the rest of the sweep."""


class _JobInterrupted(Exception):
    """SIGTERM inside a submitit job (scancel): an ordinary exception, so that submitit
    writes the job's failure and the waiting launcher returns instead of hanging."""


@contextlib.contextmanager
def _sigterm_marks(record: dict, path: Path):
    """SIGTERM ends the run as `interrupted` (the exception reaches submitit, which reports it).
    Inside a submitit job, a SIGTERM that follows its requeue signal (USR2 before the time
    limit) is part of the requeue: mark the record and hand the signal on to submitit."""
    if not _main_thread():
        yield
        return
    requeue_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG"))
    previous_term, previous_requeue = signal.getsignal(signal.SIGTERM), signal.getsignal(requeue_signal)
    requeueing = False

    def on_requeue(signum, frame):
        nonlocal requeueing
        requeueing = True
        previous_requeue(signum, frame)

    def on_term(signum, frame):
        if not (requeueing and callable(previous_term)):
            raise (_JobInterrupted if os.environ.get("SUBMITIT_EXECUTOR") else _Interrupted)(f"signal {signum}")
        record.update(status="interrupted", error=f"signal {signum} (requeued)", requeued=True, finished_at=_now())
        records.write(path, record)
        previous_term(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    if callable(previous_requeue):
        signal.signal(requeue_signal, on_requeue)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(requeue_signal, previous_requeue)


def run(cfg: DictConfig, group: str | None = None) -> dict:
    """Run one configuration; returns its record. Skips a run whose complete record exists."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    validate_config(config)
    check_data(config)
    run_id = records.config_hash(config)
    path = records.record_path(Path(config["out_dir"]).expanduser().resolve(), run_id)
    if records.is_complete(path) and not config["force"]:
        log.info("complete record exists, skipping (force=true to redo): %s", path)
        return records.read(path)

    with records.claim(path.parent):  # a concurrent run of this config waits here
        if records.is_complete(path) and not config["force"]:
            log.info("complete record exists (finished while waiting), skipping: %s", path)
            return records.read(path)
        if config["force"] and records.is_complete(path):
            # Redone on request; the replaced result is kept until nothing can be lost.
            shutil.copy2(path, path.with_name("result.replaced.json"))
        device = loading.resolve_device(config["device"])
        dtype = loading.resolve_dtype(config["dtype"], device)
        record = {"schema_version": records.SCHEMA_VERSION, "run_id": run_id, "path": str(path), "config": config,
                  "status": "running", "started_at": _now(), "process": records.process(), "env": _environment(device)}
        try:
            with _sigterm_marks(record, path), \
                    tracking.tracking(config["logger"], config, run_id, group or "local", path.parent) as tracker:
                record["tracking"] = tracker.status
                return _execute(config, record, device, dtype, path, tracker)
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt | _Interrupted | _JobInterrupted)
            record.update(status="interrupted" if interrupted else "failed",
                          error=f"{type(e).__name__}: {e}", finished_at=_now())
            records.write(path, record)
            raise


def check_data(config: dict) -> None:
    """Read (and hash-check) the evaluation and calibration text before any model loads."""
    from harness.data import documents, evaluation_text

    ppl = config["eval"].get("ppl")
    for dataset in (ppl or {}).get("datasets", []):
        evaluation_text(dataset, ppl["protocol"], config["data_dir"])
    if config["calibration"]["dataset"] in calibration.DATASETS:
        documents(*calibration.DATASETS[config["calibration"]["dataset"]], config["data_dir"])


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _execute(config: dict, record: dict, device, dtype, path: Path, tracker) -> dict:
    checkpoint = path.parent / "checkpoint"
    prior = records.read(path) or {}
    resumed = None
    if config["resume"] and not config["force"] and "pruning" in prior:
        resumed = _load_checkpoint(checkpoint, dtype)
    if resumed:
        # An earlier attempt pruned and checkpointed: continue with its model and finished evaluations.
        _refuse_a_stalled_requeue(prior, config["eval"])
        log.info("resuming from %s (attempt %d)", checkpoint, prior.get("attempts", 1) + 1)
        model, tok = resumed
        model.to(device).eval()
        record.update(model=prior["model"], pruning=prior["pruning"], eval=prior.get("eval", {}),
                      attempts=prior.get("attempts", 1) + 1, progress_at_start=_progress(prior.get("eval", {})))
    else:
        model, tok = _load_and_prune(config, record, device, dtype, path)
        if config["resume"]:
            _save_checkpoint(model, tok, checkpoint)
        record["eval"] = {}
    records.write(path, record)

    evaluate(model, tok, config["eval"], config["data_dir"], record["eval"], lambda: records.write(path, record))
    if config["save_model"]:
        record["saved_model"] = str(save_pruned(model, tok, path.parent / "model"))
    record["status"], record["finished_at"] = "complete", _now()
    record.pop("progress_at_start", None)
    records.write(path, record)
    shutil.rmtree(checkpoint, ignore_errors=True)
    path.with_name("result.replaced.json").unlink(missing_ok=True)
    tracker.summary({"eval": _scalars(record["eval"]), "pruning": {k: v for k, v in record["pruning"].items()
                                                                   if not isinstance(v, list | dict)}})
    tracker.table("per_layer", [{k: v for k, v in row.items() if k != "head_divergence"}
                                for row in record["pruning"]["per_layer"]])
    tracker.save_record(path)
    print(tracking.summary_text(record), flush=True)
    return record


CHECKPOINT_DONE = ".complete"  # written last: a checkpoint folder without it is discarded


def _save_checkpoint(model, tok, checkpoint: Path) -> None:
    """Write to a temporary folder, mark it complete, then rename it into place."""
    partial = checkpoint.with_name(checkpoint.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pruned(model, tok, partial)
    (partial / CHECKPOINT_DONE).touch()
    shutil.rmtree(checkpoint, ignore_errors=True)
    os.replace(partial, checkpoint)


def _load_checkpoint(checkpoint: Path, dtype):
    """(model, tokenizer) of a complete checkpoint; None, discarding it, if it is absent or broken."""
    if not (checkpoint / CHECKPOINT_DONE).exists():
        if checkpoint.exists() or checkpoint.with_name(checkpoint.name + ".partial").exists():
            log.warning("discarding the incomplete checkpoint in %s; pruning again", checkpoint.parent)
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(checkpoint.with_name(checkpoint.name + ".partial"), ignore_errors=True)
        return None
    try:
        return load_pruned(checkpoint, dtype), AutoTokenizer.from_pretrained(checkpoint)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is redone, never trusted
        log.warning("discarding the checkpoint in %s (%s: %s); pruning again", checkpoint, type(e).__name__, e)
        shutil.rmtree(checkpoint, ignore_errors=True)
        return None


def _progress(ev: dict) -> dict:
    """What evaluation has finished: the measure a requeued attempt must advance."""
    return {"parts": sorted(k for k in ev if k != "partial"), "ppl": sorted(ev.get("ppl", {})),
            "zeroshot": sorted(ev.get("zeroshot", {})),
            "windows": {k: v.get("windows_done", 0) for k, v in ev.get("partial", {}).items()}}


def _refuse_a_stalled_requeue(prior: dict, ev_config: dict) -> None:
    """A requeued attempt that resumed and finished nothing would requeue forever: stop it."""
    if not prior.get("requeued") or "progress_at_start" not in prior:
        return
    if prior["progress_at_start"] != _progress(prior.get("eval", {})):
        return
    ev = prior.get("eval", {})
    stage = next((f"perplexity on {d}" for d in (ev_config.get("ppl") or {}).get("datasets", [])
                  if d not in ev.get("ppl", {})), None)
    stage = stage or next((f"zero-shot task {t}" for t in (ev_config.get("zeroshot") or {}).get("tasks", [])
                           if t not in ev.get("zeroshot", {})), "the evaluation")
    raise RuntimeError(f"attempt {prior.get('attempts', 1)} was requeued at its time limit without finishing anything: "
                       f"{stage} does not fit in one job; raise hydra.launcher.timeout_min (or lower "
                       "hydra.launcher.signal_delay_s) and re-run the sweep, which resumes from the checkpoint")


def _load_and_prune(config: dict, record: dict, device, dtype, path: Path):
    mc, cal = config["model"], config["calibration"]
    metric = metrics.build(config["metric"]["name"], config["metric"].get("params"))
    model, tok = loading.load(OmegaConf.create(mc), device, dtype)
    validate_model(model, config)
    adapter = adapter_for(model)
    record["model"] = {"id": mc.get("path") or mc.get("hub_id") or mc["name"], "name": mc["name"],
                       "model_type": model.config.model_type, "params_before": n_params(model),
                       "heads_before": sum(adapter.shape(b)["heads"] for b in adapter.layers(model))}
    records.write(path, record)

    t = time.perf_counter()
    ids = calibration.batches(tok, cal["dataset"], cal["n_samples"], cal["seqlen"], cal["seed"], model=model,
                              data_dir=config["data_dir"], bos=cal.get("bos", "stream"))
    calib_seconds = time.perf_counter() - t
    settings = PruneSettings(
        sparsity=config["sparsity"], sparsity_mode=config["sparsity_mode"], allocation=config["allocation"]["name"],
        remedy=config["remedy"]["name"], layers=tuple(mc["layers"]) if mc.get("layers") else None,
        modules=tuple(config["prune"]["modules"]), damp=config["remedy"].get("damp", 1e-2),
        ridge_toward=config["remedy"].get("toward", "zero"),
        chunk_size=config["prune"]["chunk_size"], seed=config["seed"], flap_faithful=config["prune"]["flap_faithful"],
        attention_unit=config["prune"]["attention_unit"],
    )
    report = prune(model, ids, metric, settings, device)
    record["model"]["params_after"] = report.params_after
    layer_range = prunable_layers(len(adapter.layers(model)), settings.layers)
    record["pruning"] = {
        "sparsity_target": config["sparsity"], "sparsity_mode": config["sparsity_mode"],
        "sparsity_achieved": report.sparsity_achieved, "module_ratio": report.ratio,
        "attention_unit": settings.attention_unit,
        "layers": [layer_range.start, layer_range.stop],
        "per_layer": [{"layer": i, "heads_kept": s["heads"], "kv_heads_kept": s["kv_heads"], "channels_kept": s["channels"],
                       "attention_units_removed": report.removed.get((i, "attention"), []),
                       "mlp_channels_removed": report.removed.get((i, "mlp"), []),
                       **({"head_divergence": report.divergence[i]} if i in report.divergence else {})}
                      for i, s in enumerate(report.per_layer)],
        **({"recovery": {"fits": report.recovery_fits, "fell_back": report.recovery_fallbacks}}
           if settings.remedy == "recovery" else {}),
        "seconds": report.seconds, "calibration_seconds": calib_seconds, "stage_seconds": report.stage_seconds,
        "calibration": {"dataset": cal["dataset"], "n_samples": cal["n_samples"], "seqlen": cal["seqlen"],
                        "bos": cal.get("bos", "stream")},
    }
    return model, tok


def evaluate(model, tok, ev: dict, data_dir: str | None, out: dict, save=lambda: None) -> dict:
    """Fill `out` with what `ev` asks for, skipping parts already there; `save` after each part."""
    if ev.get("ppl"):
        p = ev["ppl"]
        done = out.setdefault("ppl", {})
        for d in p["datasets"]:
            if d not in done:
                # Windows finished by an interrupted attempt live under eval.partial until the dataset is done.
                progress = out.setdefault("partial", {}).setdefault(f"ppl.{d}", {})
                done[d] = perplexity.evaluate(model, tok, d, p["protocol"], p["seqlen"], p["batch_size"],
                                              p.get("max_tokens"), data_dir, p.get("bos", "stream"),
                                              progress, save).as_dict()
                del out["partial"][f"ppl.{d}"]
                if not out["partial"]:
                    del out["partial"]
                save()
    if ev.get("zeroshot") and "zeroshot_avg" not in out:
        from harness.evaluate import zeroshot

        zeroshot.evaluate(model, tok, ev["zeroshot"], out, save)
        save()
    if ev.get("efficiency") and "efficiency" not in out:
        out["efficiency"] = eff.efficiency(model, ev["efficiency"]["seqlen"], ev["efficiency"]["batch_size"])
        save()
    return out


def _scalars(ev: dict) -> dict:
    out = {f"ppl.{k}": v["value"] for k, v in ev.get("ppl", {}).items()}
    out.update({f"zeroshot.{k}.{m}": v[m] for k, v in ev.get("zeroshot", {}).items() for m in ("acc", "acc_norm") if m in v})
    if "zeroshot_avg" in ev:
        out["zeroshot_avg"] = ev["zeroshot_avg"]
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None
    run(cfg, group=group)
