"""Where the collector finds records besides the local result store: a wandb project.

Every tracked run uploads its result.json to its wandb run (tracking.Tracker.save_record),
so a project's finished runs give back the same records, e.g. from runs made on another
machine whose results/runs folder is not at hand.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
RECORD_FILE = "result.json"


def wandb_records(project: str, api=None) -> list[dict]:
    """Complete records of the finished runs of `project` ("entity/project" or "project")."""
    if api is None:
        import wandb

        api = wandb.Api()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in api.runs(project):
            if run.state != "finished":
                continue
            try:
                run.file(RECORD_FILE).download(root=str(Path(tmp) / run.id), replace=True)
                rec = json.loads((Path(tmp) / run.id / RECORD_FILE).read_text())
            except Exception as e:  # noqa: BLE001 - a run without a record is skipped, not fatal
                log.warning("wandb run %s has no readable %s, skipped: %s", run.id, RECORD_FILE, e)
                continue
            if rec.get("status") == "complete":
                out.append(rec)
    return out


def merge(local: list[dict], remote: list[dict]) -> list[dict]:
    """Local records win over remote ones with the same run id (config hash)."""
    seen = {r["run_id"] for r in local}
    return local + [r for r in remote if r["run_id"] not in seen]
