"""Complete result records built without running anything, shaped as `harness.run` writes them
(tests/test_run.py checks that a real record gives the collector the same columns), so that
table and tracking tests take milliseconds."""

from __future__ import annotations

import itertools
import math

import numpy as np

from harness import records, uncertainty
from harness.config import as_dict, compose, typed
from harness.data.zeroshot_tasks import DEFAULT_AVERAGE_METRICS, TASKS

_ids = itertools.count()


def record(*overrides: str, ppl: dict[str, float] | None = None, zeroshot: dict[str, float] | None = None,
           heads: int = 8, groups_removed: int = 0, heads_per_group: int = 2, layers: int = 4,
           divergence: bool = False, raw: bool = True, windows: int = 64, questions: int = 200,
           noise: float = 0.3, draw: int | None = None) -> dict:
    """A complete record of the run `python -m harness OVERRIDES` with the given numbers:
    `groups_removed` attention units of `heads_per_group` heads removed in every block.

    With `raw` (as a real record has), every perplexity comes with `windows` per-window NLL sums
    (per-token noise of sd `noise` around it, shifted so they reproduce the value exactly) and
    every task with `questions` per-question bits (in a random order) whose mean is its accuracy;
    `draw` seeds both (default: the record's seed), so records drawn alike share their windows'
    and questions' difficulty as two methods on the same data do. raw=False is a record from
    before per-window data were kept."""
    config = as_dict(typed(compose("+debug=fast", *overrides)))
    ppl = ppl or {"wikitext2": 100.0, "ptb": 50.0}
    kept = heads - groups_removed * heads_per_group
    per_layer = [{"layer": i, "heads_kept": kept, "kv_heads_kept": kept // heads_per_group, "channels_kept": 64,
                  "attention_units_removed": list(range(groups_removed)), "mlp_channels_removed": [],
                  **({"head_divergence": [[abs(a - b) / heads for b in range(heads)] for a in range(heads)]}
                     if divergence else {})}
                 for i in range(layers)]
    rng = np.random.default_rng(config["seed"] if draw is None else draw)
    evaluation = {"ppl": {d: {"value": v, "dataset": d, "tokens": 1024} for d, v in ppl.items()}}
    if raw:
        for entry in evaluation["ppl"].values():
            entry.update(_windows(entry["value"], windows, 1024 // windows - 1, noise, rng))
    if zeroshot is not None:
        evaluation["zeroshot"] = {t: {"acc": zeroshot[t], "acc_norm": zeroshot[t]} for t in TASKS if t in zeroshot}
        evaluation["zeroshot_avg"] = sum(zeroshot.values()) / len(zeroshot)
        evaluation["zeroshot_protocol"] = {"average_metrics": {t: DEFAULT_AVERAGE_METRICS[t] for t in zeroshot}}
        if raw:
            for entry in evaluation["zeroshot"].values():
                entry.update(_questions(entry["acc"], questions, rng))
            se = uncertainty.average_stderr([e["acc_stderr"] for e in evaluation["zeroshot"].values()])
            evaluation["zeroshot_avg_stderr"] = se
            evaluation["zeroshot_avg_interval"] = uncertainty.normal_interval(evaluation["zeroshot_avg"], se)
    if config["eval"].get("efficiency"):  # the pruned model's speed, as evaluate/efficiency.py records it
        evaluation["efficiency"] = {"params": 800, "macs_per_token": 800, "batch_size": 1,
                                    "seqlen": config["eval"]["efficiency"]["seqlen"], "latency_s": 0.01,
                                    "tokens_per_s": 100.0 * config["eval"]["efficiency"]["seqlen"]}
    run_id = f"{records.config_hash(config)[:8]}{next(_ids):04d}"
    return {"schema_version": records.SCHEMA_VERSION, "run_id": run_id, "status": "complete", "config": config,
            "started_at": "2026-12-01T00:00:00+00:00", "finished_at": "2026-12-01T00:00:02+00:00",
            "model": {"name": config["model"]["name"], "params_before": 1000, "params_after": 800,
                      "heads_before": heads * layers},
            "pruning": {"sparsity_achieved": config["sparsity"], "seconds": 1.0, "per_layer": per_layer},
            "eval": evaluation}


def _windows(value: float, windows: int, per_window: int, noise: float, rng) -> dict:
    per_token = rng.normal(0, noise, windows)
    nll = (per_token - per_token.mean() + math.log(value)) * per_window
    return {"nll_windows": uncertainty.encode_floats(nll), "tokens_per_window": per_window, "windows": windows,
            "interval": uncertainty.ppl_interval(nll, per_window)}


def _questions(accuracy: float, n: int, rng) -> dict:
    bits = rng.permutation(np.arange(n) < round(accuracy * n))
    se = uncertainty.accuracy_stderr(bits)
    entry = {"n": n, "correct": {"acc": uncertainty.encode_bits(bits), "acc_norm": uncertainty.encode_bits(bits)},
             "questions_sha256": "synthetic"}
    for metric in ("acc", "acc_norm"):
        entry[f"{metric}_stderr"] = se
        entry[f"{metric}_interval"] = uncertainty.normal_interval(accuracy, se)
    return entry


def write(out, recs: list[dict]):
    for rec in recs:
        records.write(records.record_path(out, rec["run_id"]), rec)
    return out
