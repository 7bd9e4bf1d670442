"""One harness run end to end: load -> calibrate -> prune -> finetune -> evaluate -> record -> track.

`run(cfg)` is the Python API (a `RunConfig`, or a composed config: harness.config.compose);
`main` is the Hydra entry point behind `python -m harness` and the `harness` console script.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from harness import config as schema
from harness import depth, holding, metrics, preflight, records, resume, sparse, tracking
from harness.checks import ConfigError
from harness.data import calibration, evaluation_text
from harness.environment import environment, now
from harness.evaluate import efficiency, perplexity, zeroshot
from harness.finetune import lora_finetune
from harness.interrupts import is_interrupt, sigterm_marks
from harness.models import adapter_for, loading
from harness.prune import prunable_layers, prune
from harness.record_entries import (
    depth_pruning_entry,
    model_entry,
    pruning_entry,
    scalars,
    sparse_pruning_entry,
)
from harness.remedy import fits_on_data

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
    if fits_on_data(config["remedy"]["name"]):
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
    """The data flow: load, calibrate, prune, finetune, evaluate, record, track. How the model is
    held (in memory or block by block) and an earlier attempt's checkpoint are holding.py's."""
    folder, prior = path.parent, records.read(path) or {}
    save = lambda: records.write(path, record)  # noqa: E731 - the record after every part
    lazy = _lazy(run_config, config, record, dtype, prior)
    held = _resume(config, record, prior, folder, dtype, device, lazy)
    if held is None:
        held = holding.load(config["model"], device, dtype, lazy)
        record["model"] = model_entry(config["model"], held.model, adapter_for(held.model))
        save()
        data = calibrate(run_config, config, held)
        prune_model(run_config, config, record, held, data, device, holding.pruned_blocks(folder))
        finetune(config, record, held, device)
        held = holding.checkpoint(held, folder, dtype, keep=config["resume"])
        record["eval"] = {}
    save()
    evaluate(held.model, held.tok, config["eval"], config["data_dir"], record["eval"], save, held.store, device)
    if config["save_model"]:  # a transformers folder with a model card from the finished record
        record["saved_model"] = str(holding.save(held, folder, {**record, "status": "complete", "finished_at": now()}))
    if config["save_gguf"]:  # llama.cpp's file, where it can express the pruned model
        record["saved_gguf"] = holding.save_gguf(held, folder, config["model"], config["save_gguf"])
    _complete(record, path, tracker)
    holding.discard_checkpoint(folder)
    return record


def _resume(config: dict, record: dict, prior: dict, folder: Path, dtype, device, lazy: bool) -> holding.Held | None:
    """An earlier attempt's pruned model, its record entries and finished evaluations, or None."""
    if not (config["resume"] and not config["force"] and "pruning" in prior):
        return None
    resume.refuse_a_stalled_requeue(prior, config["eval"])
    held = holding.resumed(folder, dtype, device, lazy)
    if held is not None:
        log.info("resuming from %s (attempt %d)", folder / "checkpoint", prior.get("attempts", 1) + 1)
        record.update(model=prior["model"], pruning=prior["pruning"], eval=prior.get("eval", {}),
                      attempts=prior.get("attempts", 1) + 1, progress_at_start=resume.progress(prior.get("eval", {})))
        if "finetune" in prior:
            record["finetune"] = prior["finetune"]
    return held


def _complete(record: dict, path: Path, tracker) -> None:
    record["status"], record["finished_at"] = "complete", now()
    record.pop("progress_at_start", None)
    records.write(path, record)
    path.with_name("result.replaced.json").unlink(missing_ok=True)
    _track(record, path, tracker)


@dataclass
class Calibration:
    """The scoring set, the remedy's own fit set where it has one, and how long drawing took."""

    scoring: calibration.CalibrationSet
    fitting: calibration.CalibrationSet | None
    seconds: float


def calibrate(run_config: schema.RunConfig, config: dict, held: holding.Held) -> Calibration:
    start = time.perf_counter()
    scoring = _draw(held.tok, config["calibration"], held.model, config["data_dir"])
    # The remedy's fit data is a second set only when it is asked for and differs (else: the same stream).
    fitting = None
    if fits_on_data(config["remedy"]["name"]) and run_config.remedy.calibration.sampling() != run_config.calibration.sampling():
        fitting = _draw(held.tok, config["remedy"]["calibration"], held.model, config["data_dir"])
    return Calibration(scoring, fitting, time.perf_counter() - start)


def prune_model(run_config: schema.RunConfig, config: dict, record: dict, held: holding.Held, data: Calibration,
                device, blocks_out: Path | None = None) -> None:
    """Prune (structured) or mask (unstructured / N:M) the held model in place, filling the
    record's pruning entry (a model held block by block writes its blocks to `blocks_out`)."""
    settings = run_config.prune_settings()
    model, out = held.model, blocks_out if held.lazy else None
    layer_range = prunable_layers(len(adapter_for(model).layers(model)), settings.layers)
    calibration_entry = {**config["calibration"], **data.scoring.describe()}
    if settings.sparsity_type == "depth":
        method = depth.build(config["metric"]["name"], config["metric"]["params"])
        report = depth.prune_depth(model, data.scoring.ids, method, settings, device)
        record["model"]["params_after"] = report.params_after
        record["pruning"] = depth_pruning_entry(report, settings, method, calibration_entry, data.seconds)
        return
    if settings.sparsity_type != "structured":
        method = sparse.build(config["metric"]["name"], config["metric"]["params"])
        report = sparse.prune_sparse(model, data.scoring.ids, method, settings, settings.pattern, device,
                                     store=held.store, out=out)
        record["model"]["params_after"] = report.params
        record["pruning"] = sparse_pruning_entry(report, settings, layer_range, calibration_entry, data.seconds)
        return
    metric = metrics.build(config["metric"]["name"], config["metric"]["params"])
    report = prune(model, data.scoring.ids, metric, settings, device,
                   fit_ids=None if data.fitting is None else data.fitting.ids, store=held.store, out=out)
    record["model"]["params_after"] = report.params_after
    record["pruning"] = pruning_entry(report, settings, layer_range, calibration_entry, data.seconds)
    record["pruning"]["method"] = metric.label
    if fits_on_data(config["remedy"]["name"]):
        record["pruning"]["remedy_calibration"] = ({"same_as": "calibration"} if data.fitting is None else
                                                   {**config["remedy"]["calibration"], **data.fitting.describe()})


def finetune(config: dict, record: dict, held: holding.Held, device) -> None:
    """LoRA after pruning, merged into the held model: the record's `finetune` entry says on
    what, how long, with what loss (finetune=none: nothing)."""
    ft = config["finetune"]
    if ft["name"] == "none":
        return
    data = _draw(held.tok, ft["data"], held.model, config["data_dir"])
    held.model, entry = lora_finetune(held.model, adapter_for(held.model).layers(held.model), data.ids, rank=ft["rank"],
                                      alpha=ft["alpha"], dropout=ft["dropout"], targets=ft["targets"], steps=ft["steps"],
                                      lr=ft["lr"], batch_size=ft["batch_size"], seed=config["seed"], device=device)
    record["finetune"] = {**entry, "data": {**ft["data"], **data.describe()}}


def load_and_prune(run_config: schema.RunConfig, config: dict, record: dict, device, dtype) -> holding.Held:
    """The pruned (and fine-tuned) model in memory, as a run makes it (`harness export` of a run
    without a saved model); fills the record's model and pruning entries."""
    held = holding.load(config["model"], device, dtype, lazy=False)
    record["model"] = model_entry(config["model"], held.model, adapter_for(held.model))
    prune_model(run_config, config, record, held, calibrate(run_config, config, held), device)
    finetune(config, record, held, device)
    return held


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
    with refusals_in_one_line():
        run(cfg, group=group)


@contextmanager
def refusals_in_one_line() -> Iterator[None]:
    """A refused value is the user's to fix: its one line, not a traceback (exit status 2, as
    argparse); HYDRA_FULL_ERROR=1 (Hydra's convention) shows the whole trace."""
    try:
        yield
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"harness: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def command_line() -> None:
    """`python -m harness OVERRIDES`: a `metric=` choice the run's track does not have is refused
    before Hydra composes (config.check_choices), then Hydra's app runs."""
    with refusals_in_one_line():
        schema.check_choices(sys.argv[1:])
    main()
