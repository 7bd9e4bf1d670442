"""What uncertainty costs (`make bench`): JSON + Markdown in results/bench/uncertainty.*.

    python -m bench.uncertainty_cost           # smollm2-135m windows, 1,000 full-size records (a few minutes)
    OMP_NUM_THREADS=1 python -m bench.uncertainty_cost   # beside another job: ratios need no second core
    python -m bench.uncertainty_cost --smoke   # tiny sizes (seconds; the test suite runs it)

1. Perplexity: perplexity_of keeps every window's NLL sum (per-position cross-entropy summed
   per window) where it used to keep one sum per batch. Timed against that batch-sum loop on
   the same windows, interleaved, fastest of several repeats each.
2. Zero-shot: one lm-eval call with log_samples=True (the per-question bits) against
   log_samples=False, interleaved, on tiny-llama.
3. Collecting: 1,000 synthetic records the size of a full evaluation (WikiText-2 2,400 and PTB
   730 windows, seven tasks at their full sizes) through `harness collect` (frame, every
   table with intervals and paired marks, plots), wall time.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.run import cli, named_model, report
from harness.evaluate import perplexity, windows

TASK_SIZES = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
              "arc_challenge": 1172, "openbookqa": 500}


@torch.no_grad()
def batch_sum_perplexity(model, ids: torch.Tensor, seqlen: int, batch_size: int) -> float:
    """The loop before per-window sums: one float64 NLL sum per batch."""
    total, tokens = 0.0, 0
    for batch in windows.windows(ids, seqlen).split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits
        targets = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], 1).reshape(-1)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum").item()
        tokens += batch[:, 1:].numel()
    return math.exp(total / tokens)


def _interleaved(a, b, repeats: int) -> tuple[float, float]:
    times_a, times_b = [], []
    for _ in range(repeats):
        for f, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
    return min(times_a), min(times_b)


def perplexity_cost(smoke: bool) -> dict:
    model = named_model("tiny-llama" if smoke else "smollm2-135m")
    windows = 16 if smoke else 64
    ids = torch.randint(0, model.config.vocab_size, (windows * 128,), generator=torch.Generator().manual_seed(0))
    per_window, batch_sum = _interleaved(lambda: perplexity.perplexity_of(model, ids, 128, batch_size=8),
                                         lambda: batch_sum_perplexity(model, ids, 128, 8), 2 if smoke else 3)
    return {"model": "tiny-llama" if smoke else "smollm2-135m", "windows": windows, "per_window_s": per_window,
            "batch_sum_s": batch_sum, "ratio": per_window / batch_sum}


def zeroshot_cost(smoke: bool) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from omegaconf import OmegaConf

    from harness.config import CONFIG_DIR
    from harness.data.zeroshot_tasks import offline_task_dir
    from harness.models import loading

    model, tok = loading.load(OmegaConf.load(CONFIG_DIR / "model" / "tiny-llama.yaml"), torch.device("cpu"),
                              torch.float32)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16, add_bos_token=False)
    manager = TaskManager(include_path=str(offline_task_dir(["arc_easy"])), include_defaults=False)
    limit = 20 if smoke else 200

    def call(log_samples: bool):
        return lambda: lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], num_fewshot=0, task_manager=manager,
                                               limit=limit, bootstrap_iters=1, log_samples=log_samples)

    with_bits, without = _interleaved(call(True), call(False), 2 if smoke else 3)
    return {"task": "arc_easy", "questions": limit, "log_samples_s": with_bits, "plain_s": without,
            "ratio": with_bits / without}


def collect_cost(smoke: bool) -> dict:
    from harness import records, uncertainty
    from harness.collect import collect
    from tests import synthetic

    n = 20 if smoke else 1000
    rng = np.random.default_rng(0)
    sizes = {"wikitext2": 2400, "ptb": 730}
    metrics = ["ours", "flap", "wanda", "taylor", "random", "l2", "l1", "second_moment", "similarity", "hywia"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        templates = [synthetic.record(f"metric={m}", zeroshot=dict.fromkeys(TASK_SIZES, 0.5), raw=False)
                     for m in metrics]
        for i in range(n):  # 10 metrics x 5 seeds x 5 sparsities x 4 calibration sizes
            rec = copy.deepcopy(templates[i % len(metrics)])
            rec["config"].update(seed=i // 10 % 5, sparsity=0.1 * (1 + i // 50 % 5))
            rec["config"]["calibration"]["n_samples"] = 8 * 2 ** (i // 250 % 4)
            rec["run_id"] = f"{i:012d}"
            for name, windows in sizes.items():
                nll = rng.normal(5.0, 0.3, windows) * 127
                rec["eval"]["ppl"][name].update(nll_windows=uncertainty.encode_floats(nll), tokens_per_window=127,
                                                windows=windows, interval=uncertainty.ppl_interval(nll, 127))
            for task, size in TASK_SIZES.items():
                bits = rng.random(size) < 0.5
                entry = rec["eval"]["zeroshot"][task]
                entry.update(n=size, acc=float(bits.mean()), acc_norm=float(bits.mean()),
                             correct={"acc": uncertainty.encode_bits(bits), "acc_norm": uncertainty.encode_bits(bits)},
                             acc_stderr=uncertainty.accuracy_stderr(bits), acc_norm_stderr=uncertainty.accuracy_stderr(bits),
                             questions_sha256="bench")
            records.write(records.record_path(runs, rec["run_id"]), rec)
        record_bytes = sum(p.stat().st_size for p in runs.glob("*/result.json")) / n
        start = time.perf_counter()
        written = collect(runs, Path(tmp) / "out")
        seconds = time.perf_counter() - start
    return {"records": n, "record_kb": record_bytes / 1024, "seconds": seconds, "files_written": len(written)}


def run(smoke: bool, out: Path) -> dict:
    result = {"perplexity": perplexity_cost(smoke), "zeroshot": zeroshot_cost(smoke), "collect": collect_cost(smoke),
              "smoke": smoke, "torch_threads": torch.get_num_threads()}
    return report(out, "uncertainty", result, markdown)


def markdown(r: dict) -> str:
    p, z, c = r["perplexity"], r["zeroshot"], r["collect"]
    return "\n".join([
        "# What uncertainty costs", "",
        "| measurement | with per-window / per-question data | before | ratio |", "| --- | ---: | ---: | ---: |",
        f"| perplexity, {p['model']}, {p['windows']} windows of 128 | {p['per_window_s']:.3f} s | "
        f"{p['batch_sum_s']:.3f} s | {p['ratio']:.3f} |",
        f"| lm-eval {z['task']}, {z['questions']} questions, tiny-llama | {z['log_samples_s']:.3f} s | "
        f"{z['plain_s']:.3f} s | {z['ratio']:.3f} |", "",
        f"Collecting {c['records']:,} full-size records ({c['record_kb']:.0f} KB each: WikiText-2 2,400 and PTB 730 "
        f"windows, the seven tasks at full size) with intervals and paired marks: {c['seconds']:.1f} s "
        f"({c['files_written']} files).", ""])


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__, run, "uncertainty.md")


if __name__ == "__main__":
    main()
