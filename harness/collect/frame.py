"""Records -> one pandas row per run, with flat, human-named columns (runs.csv)."""

from __future__ import annotations

import logging
from datetime import datetime

import pandas as pd

from harness import remedy as remedies
from harness import uncertainty
from harness.collect.cells import RAW
from harness.config import methods_of

log = logging.getLogger(__name__)

METHOD = ["metric", "remedy", "allocation"]
# Settings that change a result besides the method; where the records of a table differ in
# one, it becomes an extra row level, so different configurations are never averaged
# (only repeated seeds are).
SETTINGS = ["sparsity_type", "nm", "finetune", "metric_params", "remedy_params", "remedy_data", "attention_unit",
            "calibration", "n_samples", "sparsity_mode", "modules", "ppl_tokens", "zs_limit", "bos", "dtype"]
# The method part a parameter setting belongs to: with that part as a table column, the
# setting varies with the column, not within a row.
OWNER = {"metric_params": "metric", "remedy_params": "remedy", "remedy_data": "remedy"}
_SAMPLING = ("dataset", "n_samples", "seqlen", "bos", "seed", "downstream_tasks", "downstream_split")


def _params(d: dict, skip: tuple[str, ...] = ()) -> str:
    """`k=v,...` of the set parameters (an unset value and a switched-off flag are left out; a 0 stays)."""
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()) if k not in skip and v is not None and v is not False) or "-"


FAMILIES = ("dense", "data-free", "training-aware", "inference-aware", "retraining")  # the paper's Table 1 order


def family(config: dict) -> str:
    """The paper's Table 1 group of a run: dense (sparsity 0), retraining (fine-tuned after
    pruning), else what its metric scores from (Metric.family)."""
    if config["sparsity"] == 0:
        return "dense"
    if (config.get("finetune") or {}).get("name", "none") != "none":
        return "retraining"
    try:
        return _method(config).family
    except (ValueError, TypeError):  # a metric this version does not know
        return "other"


def _method(config: dict):
    """The run's method, from its track's registry (structured metric, masking or depth method)."""
    return methods_of(config.get("sparsity_type", "structured")).build(config["metric"]["name"],
                                                                        config["metric"].get("params"))


def _label(config: dict) -> str:
    """How tables name the method (HyWIA: "HyWIA-like (<policy>)"); the metric's name when unknown."""
    try:
        return getattr(_method(config), "label", config["metric"]["name"])
    except (ValueError, TypeError):
        return config["metric"]["name"]


def _nm(config: dict) -> str:
    """The N:M pattern of an nm run (2:4), "-" for every other sparsity type."""
    return config["nm"] if config.get("sparsity_type") == "nm" else "-"


def _finetune(config: dict) -> str:
    ft = config.get("finetune") or {"name": "none"}
    return "none" if ft["name"] == "none" else f"{ft['name']}(r={ft['rank']},steps={ft['steps']})"


def _remedy_params(remedy: dict) -> str:
    """Only the keys the remedy reads: recovery's damp and toward, nothing for none or bias."""
    try:
        reads = remedies.get(remedy["name"]).params
    except ValueError:  # a remedy this version does not know: every key it was given
        reads = tuple(k for k in remedy if k != "name")
    return _params({k: v for k, v in remedy.items() if k in reads})


def _remedy_data(config: dict) -> str:
    """What a remedy that fits on data fitted on: `same` (the scoring calibration) or `dataset/n`."""
    remedy = config["remedy"]
    try:
        fits = remedies.fits_on_data(remedy["name"])
    except ValueError:
        fits = "calibration" in remedy
    own = remedy.get("calibration")
    if not fits:
        return "-"
    if not own or all(own.get(k) == config["calibration"].get(k) for k in _SAMPLING):
        return "same"
    return f"{own['dataset']}/{own['n_samples']}"


def ppl_columns(df: pd.DataFrame) -> list[str]:
    """The perplexity value columns (not their token counts or interval bounds)."""
    return [c for c in df.columns if c.startswith("ppl.") and not c.endswith((".tokens", ".low", ".high"))]


def rows_of(df: pd.DataFrame, base: list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """`base` plus the model, the method parts and every setting that take several values
    among the runs of one row (equal `base`), so that a row is one configuration and nothing
    different is averaged (repeated seeds are); `exclude` are the table's column keys."""
    rows = list(base)
    for c in ["model", *METHOD, *SETTINGS]:
        if c not in df or c in rows or c in exclude:
            continue
        within = rows + ([OWNER[c]] if OWNER.get(c) in exclude else [])
        if df.groupby(within)[c].nunique().max() > 1:
            rows.append(c)
    return rows


def frame(recs: list[dict]) -> pd.DataFrame:
    """One row per run with flat, human-named columns; a malformed record is reported and skipped."""
    rows = []
    for r in recs:
        try:
            rows.append(_row(r))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            log.warning("ignoring %s: malformed record (%s: %s)", r.get("path") or r.get("run_id"), type(e).__name__, e)
    return pd.DataFrame(rows)


def _row(r: dict) -> dict:
    c, ev, p = r["config"], r.get("eval", {}), r["pruning"]
    row = {
        "model": c["model"]["name"], "family": family(c), "metric": _label(c), "remedy": c["remedy"]["name"],
        "sparsity_type": c.get("sparsity_type", "structured"), "nm": _nm(c), "finetune": _finetune(c),
        "allocation": c["allocation"]["name"], "calibration": c["calibration"]["dataset"],
        "n_samples": c["calibration"]["n_samples"], "sparsity": c["sparsity"], "sparsity_mode": c["sparsity_mode"],
        "sparsity_achieved": round(p["sparsity_achieved"], 4), "seed": c["seed"], "modules": "+".join(c["prune"]["modules"]),
        "attention_unit": c["prune"].get("attention_unit", "kv_group"), "bos": c["model"].get("bos", "stream"),
        "dtype": c.get("dtype", "auto"),
        "params": r["model"]["params_after"], "params_dense": r["model"]["params_before"], "prune_seconds": p["seconds"],
        "run_id": r["run_id"],
        "metric_params": _params(c["metric"].get("params") or {}),
        "remedy_params": _remedy_params(c["remedy"]),
        "remedy_data": _remedy_data(c),
    }
    if r.get("started_at") and r.get("finished_at"):  # the run's wall time, loading and evaluation included
        row["run_seconds"] = (datetime.fromisoformat(r["finished_at"]) - datetime.fromisoformat(r["started_at"])).total_seconds()
    if all("heads_kept" in layer for layer in p["per_layer"]):  # the structured track: units removed
        row["heads_kept"] = sum(layer["heads_kept"] for layer in p["per_layer"])
        if "heads_before" in r["model"]:
            row["heads_pruned"] = r["model"]["heads_before"] - row["heads_kept"]
    for name, v in ev.get("ppl", {}).items():
        row[f"ppl.{name}"] = v["value"]
        row[f"ppl.{name}.tokens"] = v["tokens"]
        if v.get("nll_windows"):  # the interval as this version computes it, from the stored windows
            row[f"{RAW}ppl.{name}"] = (v["nll_windows"], v["tokens_per_window"], v.get("windows_sha256"))
            _interval(row, f"ppl.{name}", uncertainty.ppl_interval(uncertainty.decode_floats(v["nll_windows"]),
                                                                   v["tokens_per_window"]))
        else:
            _interval(row, f"ppl.{name}", v.get("interval"))
    if ev.get("efficiency"):  # the pruned model's speed at batch 1 (evaluate/efficiency.py)
        row["tokens_per_s"] = ev["efficiency"]["tokens_per_s"]
        row["macs_per_token"] = ev["efficiency"]["macs_per_token"]
    max_tokens = (c["eval"].get("ppl") or {}).get("max_tokens")
    row["ppl_tokens"] = "all" if max_tokens is None else str(max_tokens)
    zeroshot = c["eval"].get("zeroshot")
    if zeroshot is not None:  # questions per task: a subset's accuracy is never averaged with the full task's
        row["zs_limit"] = "all" if zeroshot.get("limit") is None else str(zeroshot["limit"])
    zs = ev.get("zeroshot", {})
    avg_metric = ev.get("zeroshot_protocol", {}).get("average_metrics", {})
    for task, v in zs.items():
        metric = avg_metric.get(task, "acc") if v.get(avg_metric.get(task, "acc")) is not None else "acc"
        row[f"zs.{task}"] = v[metric]
        _interval(row, f"zs.{task}", v.get(f"{metric}_interval"))
        if (v.get("correct") or {}).get(metric):
            row[f"{RAW}zs.{task}"] = (v["correct"][metric], v["n"], v.get("questions_sha256"))
    if "zeroshot_avg" in ev:
        row["zs.avg"] = ev["zeroshot_avg"]
        row["zs.average_metrics"] = avg_metric
        _interval(row, "zs.avg", ev.get("zeroshot_avg_interval"))
        tasks = tuple((task, row.get(f"{RAW}zs.{task}")) for task in sorted(zs))
        if tasks and all(raw for _, raw in tasks):
            row[f"{RAW}zs.avg"] = tasks
    return row


def _interval(row: dict, column: str, interval: dict | None) -> None:
    """The run's own 95% evaluation interval as `<column>.low` / `.high` (absent in older records)."""
    if interval and interval.get("low") is not None:
        row[f"{column}.low"], row[f"{column}.high"] = interval["low"], interval["high"]


def public(df: pd.DataFrame) -> pd.DataFrame:
    """The frame without the raw columns paired tests read (what runs.csv holds)."""
    return df[[c for c in df.columns if not c.startswith(RAW)]]


def where(df: pd.DataFrame, conditions: list[str]) -> pd.DataFrame:
    """Keep the rows matching every `column=value` condition (`a|b`: any of the values); the
    columns hold the values the config accepts (sparsity_type=nm, nm=2:4)."""
    for cond in conditions:
        key, sep, values = cond.partition("=")
        if not sep or key not in df:
            raise ValueError(f"bad --where {cond!r}: expected COLUMN=VALUE[|VALUE...] with COLUMN one of {', '.join(df.columns)}")
        df = df[df[key].astype(str).isin(values.split("|"))]
    return df


