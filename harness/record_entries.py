"""The record's `model` and `pruning` entries, built from what loading and pruning return."""

from __future__ import annotations

from harness.depth import DepthReport
from harness.models.surgery import PARTS
from harness.prune import PruneReport, PruneSettings, n_params
from harness.sparse import SparseReport

_CALIBRATION_KEYS = ("dataset", "n_samples", "seqlen", "bos", "seed", "sources", "sequences", "tokens", "sha256")


def model_entry(model_config: dict, model, adapter) -> dict:
    return {"id": model_config.get("path") or model_config.get("hub_id") or model_config["name"],
            "name": model_config["name"], "model_type": model.config.model_type, "params_before": n_params(model),
            "heads_before": sum(adapter.shape(b)["heads"] for b in adapter.layers(model))}


def pruning_entry(report: PruneReport, settings: PruneSettings, layer_range: range, calibration: dict,
                  calibration_seconds: float) -> dict:
    per_layer = [{"layer": i, "heads_kept": shape["heads"], "kv_heads_kept": shape["kv_heads"],
                  "channels_kept": shape["channels"],
                  "attention_units_removed": report.removed.get((i, "attention"), []),
                  "mlp_channels_removed": report.removed.get((i, "mlp"), []),
                  **({"head_divergence": report.divergence[i]} if i in report.divergence else {})}
                 for i, shape in enumerate(report.per_layer)]
    return {
        "sparsity_target": settings.sparsity, "sparsity_mode": settings.sparsity_mode,
        "sparsity_achieved": report.sparsity_achieved, "module_ratio": report.ratio,
        "attention_unit": settings.attention_unit, "layers": [layer_range.start, layer_range.stop],
        "per_layer": per_layer,
        **({settings.remedy: report.remedy} if report.remedy else {}),  # e.g. recovery: its fits and fall-backs
        "seconds": report.seconds, "calibration_seconds": calibration_seconds, "stage_seconds": report.stage_seconds,
        "calibration": {key: calibration[key] for key in _CALIBRATION_KEYS if key in calibration},
    }


def sparse_pruning_entry(report: SparseReport, settings: PruneSettings, layer_range: range, calibration: dict,
                         calibration_seconds: float) -> dict:
    """The unstructured / N:M track's entry: achieved sparsity over the pruned linear layers,
    and per block each layer's fraction of zeros and relative output error on the calibration inputs."""
    return {
        "sparsity_type": settings.sparsity_type, "pattern": report.pattern, "sparsity_target": settings.sparsity,
        "sparsity_achieved": report.sparsity_achieved, "pruned_weights": report.pruned_weights,
        "zero_weights": report.zero_weights, "sparsity_of_model": report.zero_weights / report.params,
        "layers": [layer_range.start, layer_range.stop], "per_layer": report.per_layer,
        "seconds": report.seconds, "calibration_seconds": calibration_seconds, "stage_seconds": report.stage_seconds,
        "calibration": {key: calibration[key] for key in _CALIBRATION_KEYS if key in calibration},
    }


def depth_pruning_entry(report: DepthReport, settings: PruneSettings, method, calibration: dict,
                        calibration_seconds: float) -> dict:
    """The depth track's entry: the blocks removed (original indices, in the order chosen; for a
    sub-block method also the sub-blocks, and per kept block which parts it kept), the blocks kept, the achieved fraction of parameters, what the method scored, and the cost."""
    return {
        "sparsity_type": "depth", "sparsity_target": settings.sparsity, "blocks_requested": settings.blocks,
        "sparsity_achieved": report.sparsity_achieved, "blocks_removed": report.removed,
        "blocks_kept": report.kept, "n_blocks_removed": len(report.removed),
        "protected": method.protected, "unit": method.unit,
        **({"sub_blocks_removed": [[k, part] for k, part in report.sub_blocks],
            "n_sub_blocks_removed": len(report.sub_blocks)} if method.unit == "sub-block" else {}),
        "scored_on": ("transformers' output_hidden_states (the last after the final norm)" if method.hidden_states == "hf"
                      else "raw block inputs and outputs"),
        "scores": report.scores, "full_forwards": report.full_forwards,
        **({settings.remedy: report.remedy} if report.remedy else {}),
        "per_layer": [{"layer": new, "original": old,
                       **{part: [old, part] not in [list(u) for u in report.sub_blocks] for part in PARTS}}
                      for new, old in enumerate(report.kept)],
        "seconds": report.seconds, "calibration_seconds": calibration_seconds, "stage_seconds": report.stage_seconds,
        "calibration": {key: calibration[key] for key in _CALIBRATION_KEYS if key in calibration},
    }


def scalars(evaluation: dict) -> dict:
    """The evaluation's headline numbers with their 95% intervals and standard errors, flat (the
    tracker's summary); the per-window and per-question data stay in the record."""
    out = {}
    for k, v in evaluation.get("ppl", {}).items():
        out[f"ppl.{k}"] = v["value"]
        if v.get("interval"):
            out[f"ppl.{k}.ci_low"], out[f"ppl.{k}.ci_high"] = v["interval"]["low"], v["interval"]["high"]
    for k, v in evaluation.get("zeroshot", {}).items():
        for m in ("acc", "acc_norm"):
            if m in v:
                out[f"zeroshot.{k}.{m}"] = v[m]
            if v.get(f"{m}_stderr") is not None:
                out[f"zeroshot.{k}.{m}_stderr"] = v[f"{m}_stderr"]
    if "zeroshot_avg" in evaluation:
        out["zeroshot_avg"] = evaluation["zeroshot_avg"]
    if evaluation.get("zeroshot_avg_stderr") is not None:
        out["zeroshot_avg_stderr"] = evaluation["zeroshot_avg_stderr"]
    return out
