"""One harness run end to end: load -> calibrate -> prune -> evaluate -> record -> track.

`run(cfg)` is the Python API (a `RunConfig`, or a composed config: harness.config.compose);
`main` is the Hydra entry point behind `python -m harness` and the `harness` console script.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from harness import config as schema
from harness import metrics, preflight, records, resume, sparse, tracking
from harness.checks import ConfigError
from harness.data import calibration, evaluation_text
from harness.environment import environment, now
from harness.evaluate import efficiency, perplexity, zeroshot
from harness.finetune import lora_finetune
from harness.interrupts import is_interrupt, sigterm_marks
from harness.models import adapter_for, loading
from harness.models.export import PRUNING_KEY, export, write_card
from harness.models.lazy import LazyCheckpoint
from harness.prune import prunable_layers, prune
from harness.record_entries import model_entry, pruning_entry, scalars, sparse_pruning_entry
from harness.remedy import fits_on_data as remedy_fits_on_data

log = logging.getLogger("harness")


def run(cfg: schema.RunConfig | DictConfig | dict, group: str | None = None) -> dict:
    """Run one configuration; returns its record. Skips a run whose complete record exists."""
    run_config = schema.typed(cfg)  # every value checked, before anything is read or loaded
    config = schema.as_dict(run_config)
    check_data(config)
    run_id = records.config_hash(config)
    path = records.record_path(Path(config["out_dir"]).expanduser().resolve(), run_id)
    if records.is_complete(path) and not config["force"]:
        log.info("complete record exists, skipping (force=true to redo): %s", path)
        return records.read(path)
    device = loading.resolve_device(config["device"])
    dtype = loading.resolve_dtype(config["dtype"], device)
    memory = preflight.check_model(run_config, dtype, device)  # shapes and memory, before any weight loads

    with records.claim(path.parent):  # a concurrent run of this config waits here
        if records.is_complete(path) and not config["force"]:
            log.info("complete record exists (finished while waiting), skipping: %s", path)
            return records.read(path)
        if config["force"] and records.is_complete(path):
            # Redone on request; the replaced result is kept until nothing can be lost.
            shutil.copy2(path, path.with_name("result.replaced.json"))
        record = {"schema_version": records.SCHEMA_VERSION, "run_id": run_id, "path": str(path), "config": config,
                  "status": "running", "started_at": now(), "process": records.process(), "env": environment(device),
                  "memory_estimate": memory}

        def mark_requeued(signum: int) -> None:
            record.update(status="interrupted", error=f"signal {signum} (requeued)", requeued=True, finished_at=now())
            records.write(path, record)

        try:
            with sigterm_marks(mark_requeued), \
                    tracking.tracking(config["logger"], config, run_id, group or "local", path.parent) as tracker:
                record["tracking"] = tracker.status
                return _execute(run_config, config, record, device, dtype, path, tracker)
        except BaseException as e:
            record.update(status="interrupted" if is_interrupt(e) else "failed",
                          error=f"{type(e).__name__}: {e}", finished_at=now())
            records.write(path, record)
            raise


def check_data(config: dict) -> None:
    """Read (and hash-check) the evaluation and calibration text before any model loads."""

    ppl = config["eval"].get("ppl")
    for dataset in (ppl or {}).get("datasets", []):
        evaluation_text(dataset, ppl["protocol"], config["data_dir"])
    used = [("calibration", config["calibration"])]
    if remedy_fits_on_data(config["remedy"]["name"]):
        used.append(("remedy.calibration", config["remedy"]["calibration"]))
    if config["finetune"]["name"] != "none":
        used.append(("finetune.data", config["finetune"]["data"]))
    for key, cal in used:
        try:
            calibration.check_available(cal["dataset"], cal["n_samples"], config["data_dir"], cal["downstream_tasks"],
                                        cal["downstream_split"], key, cal["seqlen"])
        except ValueError as e:  # e.g. more downstream examples asked for than the splits hold
            raise ConfigError(str(e)) from e


def _lazy(run_config: schema.RunConfig, config: dict, record: dict, dtype, prior: dict) -> bool:
    """Whether the model is held one block at a time: model.lazy, with `auto` decided here from
    the checkpoint's size and the memory available (kept in the record; a resumed attempt keeps
    its first attempt's decision, which its checkpoint was written for)."""
    lazy = config["model"]["lazy"]
    if lazy != "auto":
        return lazy
    resuming = config["resume"] and not config["force"] and "pruning" in prior and "lazy_auto" in prior
    decided = record["lazy_auto"] = prior["lazy_auto"] if resuming else loading.lazy_auto(
        OmegaConf.create(config["model"]), dtype)
    if decided["lazy"]:
        run_config.check_lazy(f"model.lazy=auto (the weights, {decided['weights_bytes'] / 1e9:.2f} GB, exceed "
                              f"{loading.LAZY_AUTO_SHARE:.0%} of the {decided['available_bytes'] / 1e9:.2f} GB available)")
    return decided["lazy"]


def _execute(run_config: schema.RunConfig, config: dict, record: dict, device, dtype, path: Path, tracker) -> dict:
    prior = records.read(path) or {}
    if _lazy(run_config, config, record, dtype, prior):
        return _execute_lazy(run_config, config, record, device, dtype, path, tracker)
    checkpoint = path.parent / "checkpoint"
    resumed = None
    if config["resume"] and not config["force"] and "pruning" in prior:
        resume.refuse_a_stalled_requeue(prior, config["eval"])
        resumed = resume.load_checkpoint(checkpoint, dtype)
    if resumed:
        # An earlier attempt pruned and checkpointed: continue with its model and finished evaluations.
        log.info("resuming from %s (attempt %d)", checkpoint, prior.get("attempts", 1) + 1)
        model, tok = resumed
        model.to(device).eval()
        record.update(model=prior["model"], pruning=prior["pruning"], eval=prior.get("eval", {}),
                      attempts=prior.get("attempts", 1) + 1, progress_at_start=resume.progress(prior.get("eval", {})))
        if "finetune" in prior:
            record["finetune"] = prior["finetune"]
    else:
        model, tok = _load_and_prune(run_config, config, record, device, dtype, lambda: records.write(path, record))
        if config["resume"]:
            resume.save_checkpoint(model, tok, checkpoint)
        record["eval"] = {}
    records.write(path, record)

    evaluate(model, tok, config["eval"], config["data_dir"], record["eval"], lambda: records.write(path, record))
    if config["save_model"]:  # a transformers folder with a model card from the finished record
        record["saved_model"] = str(path.parent / "model")
        export(model, tok, path.parent / "model", {**record, "status": "complete", "finished_at": now()})
    _complete(record, path, tracker)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return record


def _complete(record: dict, path: Path, tracker) -> None:
    record["status"], record["finished_at"] = "complete", now()
    record.pop("progress_at_start", None)
    records.write(path, record)
    path.with_name("result.replaced.json").unlink(missing_ok=True)
    _track(record, path, tracker)


def _execute_lazy(run_config: schema.RunConfig, config: dict, record: dict, device, dtype, path: Path, tracker) -> dict:
    """model.lazy=true: pruned block by block from the checkpoint into `checkpoint/` (the
    exported folder, always written: it is the only place the pruned model exists), then
    evaluated block by block from there. A re-run resumes from a complete `checkpoint/`."""

    checkpoint = path.parent / "checkpoint"
    prior = records.read(path) or {}
    if (config["resume"] and not config["force"] and "pruning" in prior
            and (checkpoint / resume.CHECKPOINT_DONE).exists()):
        resume.refuse_a_stalled_requeue(prior, config["eval"])
        record.update(model=prior["model"], pruning=prior["pruning"], eval=prior.get("eval", {}),
                      attempts=prior.get("attempts", 1) + 1, progress_at_start=resume.progress(prior.get("eval", {})))
    else:
        store, tok = loading.load_lazy(OmegaConf.create(config["model"]), dtype)
        blocks = path.parent / "pruned_blocks"
        _prune_loaded(run_config, config, record, store.model, tok, device, lambda: records.write(path, record),
                      store=store, out=blocks)
        resume.write_checkpoint(checkpoint, lambda folder: store.export(tok, blocks, folder))
        shutil.rmtree(blocks, ignore_errors=True)
        record["eval"] = {}
    records.write(path, record)
    pruned = LazyCheckpoint(checkpoint, dtype)
    pruned.skeleton()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    evaluate(pruned.model, tok, config["eval"], config["data_dir"], record["eval"], lambda: records.write(path, record),
             store=pruned, device=device)
    if config["save_model"]:

        record["saved_model"] = str(path.parent / "model")
        write_card(checkpoint, {**record, "status": "complete", "finished_at": now()},
                   getattr(pruned.model.config, PRUNING_KEY)["route"])
        (checkpoint / resume.CHECKPOINT_DONE).unlink()
        shutil.rmtree(path.parent / "model", ignore_errors=True)
        checkpoint.replace(path.parent / "model")
    _complete(record, path, tracker)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return record


def _load_and_prune(run_config: schema.RunConfig, config: dict, record: dict, device, dtype, save=lambda: None):
    """Load and prune as the config says, filling the record's model and pruning entries (`save` after loading)."""
    model, tok = loading.load(OmegaConf.create(config["model"]), device, dtype)
    return _prune_loaded(run_config, config, record, model, tok, device, save)


def _prune_loaded(run_config: schema.RunConfig, config: dict, record: dict, model, tok, device, save=lambda: None,
                  store=None, out: Path | None = None):
    """Calibrate and prune a loaded model (a lazy skeleton with its `store`: pruned blocks to `out`)."""
    model_config, cal = config["model"], config["calibration"]
    settings = run_config.prune_settings()
    structured = settings.sparsity_type == "structured"
    metric = (metrics.build if structured else sparse.build)(config["metric"]["name"], config["metric"]["params"])
    adapter = adapter_for(model)
    record["model"] = model_entry(model_config, model, adapter)
    save()

    start = time.perf_counter()
    scoring = _draw(tok, cal, model, config["data_dir"])
    # The remedy's fit data is a second set only when it is asked for and differs (else: the same stream).
    fitting = None
    if remedy_fits_on_data(config["remedy"]["name"]) and run_config.remedy.calibration.sampling() != run_config.calibration.sampling():
        fitting = _draw(tok, config["remedy"]["calibration"], model, config["data_dir"])
    calibration_seconds = time.perf_counter() - start
    layer_range = prunable_layers(len(adapter.layers(model)), settings.layers)
    calibration_entry = {**cal, **scoring.describe()}
    if not structured:
        sparse_report = sparse.prune_sparse(model, scoring.ids, metric, settings, settings.pattern, device,
                                            store=store, out=out)
        record["model"]["params_after"] = sparse_report.params
        record["pruning"] = sparse_pruning_entry(sparse_report, settings, layer_range, calibration_entry,
                                                 calibration_seconds)
        return model, tok
    report = prune(model, scoring.ids, metric, settings, device, fit_ids=None if fitting is None else fitting.ids,
                   store=store, out=out)
    record["model"]["params_after"] = report.params_after
    record["pruning"] = pruning_entry(report, settings, layer_range, calibration_entry, calibration_seconds)
    record["pruning"]["method"] = metric.label
    if remedy_fits_on_data(config["remedy"]["name"]):
        record["pruning"]["remedy_calibration"] = ({"same_as": "calibration"} if fitting is None else
                                                   {**config["remedy"]["calibration"], **fitting.describe()})
    if config["finetune"]["name"] != "none":
        model = _finetune(config, model, tok, adapter, record, device)
    return model, tok


def _finetune(config: dict, model, tok, adapter, record: dict, device):
    """LoRA after pruning, merged: the record's `finetune` entry says on what, how long, with what loss."""

    ft = config["finetune"]
    data = _draw(tok, ft["data"], model, config["data_dir"])
    model, entry = lora_finetune(model, adapter.layers(model), data.ids, rank=ft["rank"], alpha=ft["alpha"],
                                 dropout=ft["dropout"], targets=ft["targets"], steps=ft["steps"], lr=ft["lr"],
                                 batch_size=ft["batch_size"], seed=config["seed"], device=device)
    record["finetune"] = {**entry, "data": {**ft["data"], **data.describe()}}
    return model


def _draw(tok, cal: dict, model, data_dir: str | None) -> calibration.CalibrationSet:
    return calibration.draw(tok, cal["dataset"], cal["n_samples"], cal["seqlen"], cal["seed"], model=model,
                            data_dir=data_dir, bos=cal["bos"], downstream_tasks=cal["downstream_tasks"],
                            downstream_split=cal["downstream_split"])


def evaluate(model, tok, eval_config: dict, data_dir: str | None, out: dict, save=lambda: None, store=None,
             device=None) -> dict:
    """Fill `out` with what `eval_config` asks for, skipping parts already there; `save` after each
    part (`store`: a lazily loaded model's LazyCheckpoint, evaluated block by block on `device`)."""
    if eval_config.get("ppl"):
        ppl = eval_config["ppl"]
        done = out.setdefault("ppl", {})
        for dataset in ppl["datasets"]:
            if dataset not in done:
                # Windows finished by an interrupted attempt live under eval.partial until the dataset is done.
                progress = out.setdefault("partial", {}).setdefault(f"ppl.{dataset}", {})
                done[dataset] = perplexity.evaluate(model, tok, dataset, ppl["protocol"], ppl["seqlen"],
                                                    ppl["batch_size"], ppl.get("max_tokens"), data_dir,
                                                    ppl.get("bos", "stream"), progress, save, store,
                                                    device).as_dict()
                del out["partial"][f"ppl.{dataset}"]
                if not out["partial"]:
                    del out["partial"]
                save()
    if eval_config.get("zeroshot") and "zeroshot_avg" not in out:

        zeroshot.evaluate(model, tok, eval_config["zeroshot"], out, save, store, device)
        save()
    if eval_config.get("efficiency") and "efficiency" not in out:
        out["efficiency"] = efficiency.efficiency(model, eval_config["efficiency"]["seqlen"],
                                                  eval_config["efficiency"]["batch_size"])
        save()
    return out


def _track(record: dict, path: Path, tracker) -> None:
    tracker.summary({"eval": scalars(record["eval"]), "pruning": {k: v for k, v in record["pruning"].items()
                                                                  if not isinstance(v, list | dict)}})
    tracker.table("per_layer", [{k: v for k, v in row.items() if k != "head_divergence"}
                                for row in record["pruning"]["per_layer"]])
    if "finetune" in record:
        tracker.table("finetune_loss", [{"step": i + 1, "loss": loss} for i, loss in enumerate(record["finetune"]["losses"])])
    tracker.save_record(path)
    print(tracking.summary_text(record), flush=True)


@hydra.main(version_base="1.3", config_path=str(schema.CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hydra_config = HydraConfig.get()
    group = Path(hydra_config.sweep.dir).name if hydra_config.mode.name == "MULTIRUN" else None
    try:
        run(cfg, group=group)
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's convention for the whole trace
            raise
        # A refused value is the user's to fix: its one line, not a traceback (exit status 2, as argparse).
        print(f"harness: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
