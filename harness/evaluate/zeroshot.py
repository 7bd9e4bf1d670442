"""Zero-shot accuracy through lm-eval's Python API on the in-memory (pruned) model, or on a
model larger than memory block by block (blockwise_lm.py).

With the hub reachable, lm-eval's own task definitions are used; offline, the copies of
harness/data/zeroshot_tasks.py. Both record acc and acc_norm per task and n; the 7-task average takes, per
task, the metric of `average_metrics` (LLM-Pruner's convention by default).
"""

from __future__ import annotations

import hashlib
import logging

import torch

from harness import uncertainty
from harness.data.corpora import hub_offline
from harness.data.zeroshot_tasks import DEFAULT_AVERAGE_METRICS, TASKS, offline_task_dir
from harness.environment import free_memory
from harness.evaluate.blockwise_lm import BlockwiseLM

log = logging.getLogger(__name__)

# What one request of the seven tasks costs in memory, per token: logits and their log-softmax
# (lm-eval keeps both, in the model's dtype, plus a margin for one more copy), and the block's
# widest activations. lm-eval batches the longest requests first; the longest of the seven
# tasks is BoolQ's (1292 tokens with SmolLM2's tokenizer), so a batch is sized for 2048.
REQUEST_TOKENS = 2048
MAX_BATCH = 64  # lm-eval's own cap for batch_size=auto


def fitting_batch_size(model, free_bytes: int | None = None) -> int:
    """The largest zero-shot batch whose logits and activations take at most half the free
    memory of the model's device (CUDA: mem_get_info; CPU: MemAvailable), within [1, MAX_BATCH]."""

    param = next(model.parameters())
    free_bytes = free_memory(param.device) if free_bytes is None else free_bytes
    cfg = model.config
    width = max(getattr(cfg, "intermediate_size", 0) or 0, 4 * cfg.hidden_size)
    per_token = (3 * cfg.vocab_size + 4 * width) * param.element_size()
    return max(1, min(MAX_BATCH, free_bytes // 2 // (per_token * REQUEST_TOKENS)))


class ModelCallThroughput:
    """Tokens per second of the model's forwards inside lm-eval (padding included: what the
    device computed), timed around HFLM._model_call."""

    def __init__(self, lm):
        import time

        self.tokens, self.seconds = 0, 0.0
        call = lm._model_call

        def timed(inps, *args, **kwargs):
            start = time.perf_counter()
            out = call(inps, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.tokens += inps.numel()
            return out

        lm._model_call = timed

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None


# Any positive count makes lm-eval report acc_stderr / acc_norm_stderr; for these metrics (mean
# aggregation) it is the closed form sample_sd / sqrt(n), so nothing is resampled.
STDERR_ITERS = 1
METRICS = ("acc", "acc_norm")


def task_entry(result: dict, task: str) -> dict:
    """One task's record entry from simple_evaluate's output (run with log_samples): each metric,
    lm-eval's stderr and a 95% interval, n, and every question's correctness in doc_id order
    (uncertainty.encode_bits), with a digest of the questions so paired tests can check they
    compare the same ones."""
    scores = result["results"][task]
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    entry = {"n": result["n-samples"][task]["effective"]}
    for metric in METRICS:
        value = scores.get(f"{metric},none")
        entry[metric] = value
        if value is None:
            continue
        stderr = scores.get(f"{metric}_stderr,none")
        entry[f"{metric}_stderr"] = stderr if isinstance(stderr, float) else None
        if entry[f"{metric}_stderr"] is not None:
            entry[f"{metric}_interval"] = uncertainty.normal_interval(value, stderr)
        entry.setdefault("correct", {})[metric] = uncertainty.encode_bits([s[metric] for s in samples])
    entry["questions_sha256"] = hashlib.sha256("".join(s["doc_hash"] for s in samples).encode()).hexdigest()
    return entry


def evaluate(model, tokenizer, cfg: dict, out: dict | None = None, save=lambda: None, store=None,
             device=None) -> dict:
    """Fill `out` with {'zeroshot': {task: task_entry}, 'zeroshot_avg', its stderr and interval,
    'zeroshot_protocol'}
    (`store`: the LazyCheckpoint `model` is the skeleton of, evaluated block by block on `device`).

    One lm-eval call per task, `save` after each, and tasks already in out['zeroshot'] are
    skipped: a full evaluation takes hours on a CPU, and an interrupted one resumes at the
    task it was on. Tasks are scored independently, so this equals a single call.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(cfg["tasks"])
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown zero-shot task(s) {bad}; accepted: {', '.join(TASKS)}")
    out = {} if out is None else out
    results = out.setdefault("zeroshot", {})
    if hub_offline() or cfg.get("source", "auto") == "offline":
        manager, source = TaskManager(include_path=str(offline_task_dir(tasks)), include_defaults=False), "offline"
    else:
        manager, source = TaskManager(), "lm-eval"
    bos = cfg.get("bos", "stream") == "window"  # lm-eval prepends BOS to every request
    if store is None:
        batch_size = cfg.get("batch_size") or fitting_batch_size(model)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos)
        throughput = ModelCallThroughput(lm)
    else:
        device = device or torch.device("cpu")
        batch_size = cfg.get("batch_size") or fitting_batch_size(model, free_memory(device))
        lm = throughput = BlockwiseLM(store, tokenizer, batch_size, bos, device)
    for task in [t for t in tasks if t not in results]:
        throughput.reset()
        r = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=0, task_manager=manager,
                                    limit=cfg.get("limit"), bootstrap_iters=STDERR_ITERS, log_samples=True)
        results[task] = {**task_entry(r, task), "batch_size": batch_size,
                         "tokens_per_second": throughput.tokens_per_second}
        save()
    average_metrics = {**DEFAULT_AVERAGE_METRICS, **(cfg.get("average_metrics") or {})}
    averaged = [average_metrics[t] if results[t].get(average_metrics[t]) is not None else "acc" for t in tasks]
    out["zeroshot_avg"] = sum(results[t][m] for t, m in zip(tasks, averaged, strict=True)) / len(tasks)
    stderrs = [results[t].get(f"{m}_stderr") for t, m in zip(tasks, averaged, strict=True)]
    if all(se is not None for se in stderrs):  # tasks finished by an attempt from before stderrs were kept have none
        se = uncertainty.average_stderr(stderrs)
        out["zeroshot_avg_stderr"] = se
        out["zeroshot_avg_interval"] = uncertainty.normal_interval(out["zeroshot_avg"], se)
    out["zeroshot_protocol"] = {"source": source, "num_fewshot": 0, "limit": cfg.get("limit"),
                                "average_metrics": {t: average_metrics[t] for t in tasks}, "bos": bos}
    return out
