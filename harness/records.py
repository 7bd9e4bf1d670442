"""The result record (DESIGN.md): results/runs/<config-hash>/result.json, written atomically.

A run writes `status: running` when it starts and `status: complete` only at its very end;
a failure writes `status: failed` with the error. Every write goes to a temporary file in the
same folder and is renamed over the record, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

SCHEMA_VERSION = 1
# Keys that do not change what a run computes, left out of the config hash.
NON_SEMANTIC = ("force", "out_dir", "logger", "launcher", "data_dir", "save_model", "resume", "hydra", "collect")


def config_hash(config: dict) -> str:
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC}
    blob = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def record_path(out_dir: str | Path, run_id: str) -> Path:
    return Path(out_dir) / run_id / "result.json"


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".result.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(path: Path) -> bool:
    rec = read(path)
    return bool(rec) and rec.get("status") == "complete"


def load_complete(root: str | Path) -> list[dict]:
    """Every complete record under `root` (incomplete and failed ones are skipped)."""
    out = []
    for p in sorted(Path(root).glob("*/result.json")):
        rec = read(p)
        if rec and rec.get("status") == "complete":
            out.append(rec)
    return out
