"""Complete result records built without running anything, shaped as `harness.run` writes them
(tests/test_run.py checks that a real record gives the collector the same columns), so that
table and tracking tests take milliseconds."""

from __future__ import annotations

import itertools

from harness import records
from harness.config import as_dict, compose, typed
from harness.evaluate.tasks import DEFAULT_AVERAGE_METRICS, TASKS

_ids = itertools.count()


def record(*overrides: str, ppl: dict[str, float] | None = None, zeroshot: dict[str, float] | None = None,
           heads: int = 8, groups_removed: int = 0, heads_per_group: int = 2, layers: int = 4,
           divergence: bool = False) -> dict:
    """A complete record of the run `python -m harness OVERRIDES` with the given numbers:
    `groups_removed` attention units of `heads_per_group` heads removed in every block."""
    config = as_dict(typed(compose("+debug=fast", *overrides)))
    ppl = ppl or {"wikitext2": 100.0, "ptb": 50.0}
    kept = heads - groups_removed * heads_per_group
    per_layer = [{"layer": i, "heads_kept": kept, "kv_heads_kept": kept // heads_per_group, "channels_kept": 64,
                  "attention_units_removed": list(range(groups_removed)), "mlp_channels_removed": [],
                  **({"head_divergence": [[abs(a - b) / heads for b in range(heads)] for a in range(heads)]}
                     if divergence else {})}
                 for i in range(layers)]
    evaluation = {"ppl": {d: {"value": v, "dataset": d, "tokens": 1024} for d, v in ppl.items()}}
    if zeroshot is not None:
        evaluation["zeroshot"] = {t: {"acc": zeroshot[t], "acc_norm": zeroshot[t]} for t in TASKS if t in zeroshot}
        evaluation["zeroshot_avg"] = sum(zeroshot.values()) / len(zeroshot)
        evaluation["zeroshot_protocol"] = {"average_metrics": {t: DEFAULT_AVERAGE_METRICS[t] for t in zeroshot}}
    run_id = f"{records.config_hash(config)[:8]}{next(_ids):04d}"
    return {"schema_version": records.SCHEMA_VERSION, "run_id": run_id, "status": "complete", "config": config,
            "model": {"name": config["model"]["name"], "params_before": 1000, "params_after": 800,
                      "heads_before": heads * layers},
            "pruning": {"sparsity_achieved": config["sparsity"], "seconds": 1.0, "per_layer": per_layer},
            "eval": evaluation}


def write(out, recs: list[dict]):
    for rec in recs:
        records.write(records.record_path(out, rec["run_id"]), rec)
    return out
