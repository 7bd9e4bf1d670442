"""Where and with what a run ran: versions, device, commit, Slurm job (the record's `env`)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch

from harness import __version__


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness")).expanduser()


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    import lm_eval
    import transformers

    slurm = {key: os.environ[var] for key, var in (("job_id", "SLURM_JOB_ID"), ("array_job_id", "SLURM_ARRAY_JOB_ID"),
                                                   ("array_task_id", "SLURM_ARRAY_TASK_ID")) if var in os.environ}
    return {"versions": {"harness": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "lm_eval": lm_eval.__version__, "python": platform.python_version()},
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "git_sha": git_sha(), "slurm": slurm or None}
