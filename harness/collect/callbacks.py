"""Hydra callbacks: build the tables and plots when a sweep ends (config.yaml `hydra.callbacks`)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class CollectAfterSweep(Callback):
    """Runs the collector over the records in `out_dir` that match `collect.where`, into
    `collect.out`, at the end of a multirun (with the submitit launcher: after the whole job
    array, on the submitting node). A failure is logged, never raised: the records are what
    matters and `harness collect` redoes it."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not config.collect.after_sweep:
            return
        from harness.collect import collect

        runs, out = Path(config.out_dir), Path(config.collect.out)
        try:
            written = collect(runs, out, conditions=list(config.collect.where))
            log.info("collected %s into %s (%d files)", runs, out, len(written))
        except (Exception, SystemExit) as e:  # noqa: BLE001
            log.warning("collecting %s after the sweep failed (run `harness collect` by hand): %s", runs, e)
