"""The result record (DESIGN.md): results/runs/<config-hash>/result.json, written atomically.

A run writes `status: running` when it starts and `status: complete` only at its very end;
a failure writes `status: failed` with the error. Every write goes to a temporary file in the
same folder and is renamed over the record, so a reader never sees half a file. Records are
strict JSON: a non-finite number is written as null.

A run holds an exclusive lock on its folder (`.lock`, flock) while it works, so a second
process with the same config waits for it instead of redoing or overwriting its work, and a
`running` record whose lock nobody holds is recognisably left by a dead process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Keys that do not change what a run computes, left out of the config hash.
NON_SEMANTIC = ("force", "out_dir", "logger", "launcher", "data_dir", "save_model", "save_gguf", "resume", "hydra",
                "collect")


def config_hash(config: dict) -> str:
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC}
    # Keys added after records existed are left out where they keep the earlier behaviour (or
    # are not read by this run), so a config from before they existed keeps its run id.
    if semantic.get("sparsity_type", "structured") == "structured":
        semantic.pop("sparsity_type", None)
    if semantic.get("sparsity_type") != "nm":
        semantic.pop("nm", None)
    if (semantic.get("finetune") or {}).get("name", "none") == "none":
        semantic.pop("finetune", None)
    if "lazy" in (semantic.get("model") or {}):  # how the weights are held, not what is computed
        semantic["model"] = {k: v for k, v in semantic["model"].items() if k != "lazy"}
    zeroshot = (semantic.get("eval") or {}).get("zeroshot") or {}
    if "batch_size" in zeroshot and zeroshot["batch_size"] is None:  # batch size does not change a score
        semantic["eval"] = {**semantic["eval"], "zeroshot": {k: v for k, v in zeroshot.items() if k != "batch_size"}}
    blob = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def record_path(out_dir: str | Path, run_id: str) -> Path:
    return Path(out_dir) / run_id / "result.json"


def strict(value):
    """The record with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".result.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(strict(record), f, indent=2, default=str, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check(path: Path) -> tuple[dict | None, str | None]:
    """(record, None), (None, None) where there is no record, or (None, why it is not a record)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"unreadable: {e}"
    if not text.strip():
        return None, "empty file"
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e}; truncated?)"
    if not isinstance(rec, dict):
        return None, f"not a record (a JSON {type(rec).__name__})"
    missing = [k for k in ("status", "config", "run_id") if k not in rec]
    if missing:
        return None, f"not a record (no {', '.join(missing)})"
    if rec["status"] == "complete" and not {"model", "pruning", "eval"} <= set(rec):
        return None, "says complete but has no model/pruning/eval"
    return rec, None


def read(path: Path) -> dict | None:
    """The record at `path`; None if there is none or it is malformed (with a warning naming why)."""
    rec, problem = check(path)
    if problem:
        log.warning("ignoring %s: %s", path, problem)
    return rec


def is_complete(path: Path) -> bool:
    rec = read(path)
    return bool(rec) and rec.get("status") == "complete"


def load_complete(root: str | Path) -> list[dict]:
    """Every complete record under `root`; every malformed record and every `running` record
    left by a dead process is reported (a warning naming the path) and skipped."""
    out = []
    for p in sorted(Path(root).glob("*/result.json")):
        rec = read(p)
        if rec and rec["status"] == "complete":
            out.append(rec)
        elif rec and rec["status"] == "running" and not is_locked(p.parent):
            where = rec.get("process") or {}
            log.warning("%s says running (host %s, pid %s) but no process holds its lock: that run died; "
                        "re-run its sweep to resume it", p, where.get("host", "?"), where.get("pid", "?"))
    return out


def process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _lock_file(folder: Path) -> Path:
    return Path(folder) / ".lock"


def is_locked(folder: Path) -> bool:
    """Whether a live process holds `folder`'s run lock."""
    path = _lock_file(folder)
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def claim(folder: Path) -> Iterator[None]:
    """Hold `folder`'s run lock; a second claimer waits (saying for whom) until it is free.
    The lock dies with its process, so a killed run never blocks the next attempt."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(_lock_file(folder), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            log.warning("%s is being run by another process (%s); waiting for it to finish",
                        folder, f.read().strip() or "unknown")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(process()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
