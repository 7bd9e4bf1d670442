"""What lets an interrupted or requeued run continue: the checkpoint of the pruned model, and
the progress a requeued attempt must make (one that finishes nothing would requeue forever)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer

from harness.models.export import export, load_exported

log = logging.getLogger(__name__)
CHECKPOINT_DONE = ".complete"  # written last: a checkpoint folder without it is discarded


def _partial(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".partial")


def save_checkpoint(model, tok, checkpoint: Path) -> None:
    write_checkpoint(checkpoint, lambda folder: export(model, tok, folder))


def write_checkpoint(checkpoint: Path, write: Callable[[Path], object]) -> None:
    """`write` fills a temporary folder, which is marked complete, then renamed into place."""
    partial = _partial(checkpoint)
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    (partial / CHECKPOINT_DONE).touch()
    shutil.rmtree(checkpoint, ignore_errors=True)
    os.replace(partial, checkpoint)


def load_checkpoint(checkpoint: Path, dtype):
    """(model, tokenizer) of a complete checkpoint; None, discarding it, if it is absent or broken."""
    if not (checkpoint / CHECKPOINT_DONE).exists():
        if checkpoint.exists() or _partial(checkpoint).exists():
            log.warning("discarding the incomplete checkpoint in %s; pruning again", checkpoint.parent)
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(_partial(checkpoint), ignore_errors=True)
        return None
    try:
        return load_exported(checkpoint, dtype), AutoTokenizer.from_pretrained(checkpoint)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is redone, never trusted
        log.warning("discarding the checkpoint in %s (%s: %s); pruning again", checkpoint, type(e).__name__, e)
        shutil.rmtree(checkpoint, ignore_errors=True)
        return None


def progress(evaluation: dict) -> dict:
    """What evaluation has finished: the measure a requeued attempt must advance."""
    return {"parts": sorted(k for k in evaluation if k != "partial"), "ppl": sorted(evaluation.get("ppl", {})),
            "zeroshot": sorted(evaluation.get("zeroshot", {})),
            "windows": {k: v.get("windows_done", 0) for k, v in evaluation.get("partial", {}).items()}}


def refuse_a_stalled_requeue(prior: dict, eval_config: dict) -> None:
    """A requeued attempt that resumed and finished nothing would requeue forever: stop it."""
    if not prior.get("requeued") or "progress_at_start" not in prior:
        return
    done = prior.get("eval", {})
    if prior["progress_at_start"] != progress(done):
        return
    stage = next((f"perplexity on {d}" for d in (eval_config.get("ppl") or {}).get("datasets", [])
                  if d not in done.get("ppl", {})), None)
    stage = stage or next((f"zero-shot task {t}" for t in (eval_config.get("zeroshot") or {}).get("tasks", [])
                           if t not in done.get("zeroshot", {})), "the evaluation")
    raise RuntimeError(f"attempt {prior.get('attempts', 1)} was requeued at its time limit without finishing anything: "
                       f"{stage} does not fit in one job; raise hydra.launcher.timeout_min (or lower "
                       "hydra.launcher.signal_delay_s) and re-run the sweep, which resumes from the checkpoint")
