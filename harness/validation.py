"""Checks that run before any expensive work; each error names the bad value and what is accepted."""

from __future__ import annotations

from pathlib import Path

from harness import allocation, calibration, metrics, remedy
from harness.data.corpora import CORPORA, PROTOCOLS
from harness.evaluate.perplexity import BOS_PLACEMENTS
from harness.models.base import ATTENTION_UNITS
from harness.models.loading import DTYPES, SOURCES


class ConfigError(ValueError):
    pass


def _one_of(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ConfigError(f"{name}={value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")


def validate_config(c: dict) -> None:
    s = c["sparsity"]
    if not isinstance(s, int | float) or not 0 <= s < 1:
        raise ConfigError(f"sparsity={s!r} is outside [0, 1); accepted: a number with 0 <= sparsity < 1")
    _one_of("sparsity_mode", c["sparsity_mode"], allocation.SPARSITY_MODES)
    _one_of("model.bos", c["model"].get("bos", "stream"), BOS_PLACEMENTS)
    _one_of("allocation", c["allocation"]["name"], allocation.ALLOCATIONS)
    _one_of("remedy", c["remedy"]["name"], remedy.REMEDIES)
    if "toward" in c["remedy"]:
        from harness.remedy.recovery import TOWARD

        _one_of("remedy.toward", c["remedy"]["toward"], TOWARD)
    try:
        metrics.build(c["metric"]["name"], c["metric"].get("params"))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"metric: {e}") from e
    cal = c["calibration"]
    _one_of("calibration.dataset", cal["dataset"], calibration.ACCEPTED)
    if not isinstance(cal["n_samples"], int) or cal["n_samples"] < 1:
        raise ConfigError(f"calibration.n_samples={cal['n_samples']!r}; accepted: an integer >= 1")
    if not isinstance(cal["seqlen"], int) or cal["seqlen"] < 2:
        raise ConfigError(f"calibration.seqlen={cal['seqlen']!r}; accepted: an integer >= 2")
    mods = c["prune"]["modules"]
    if not mods or any(m not in ("attention", "mlp") for m in mods):
        raise ConfigError(f"prune.modules={mods!r}; accepted: a non-empty subset of [attention, mlp]")
    _one_of("calibration.bos", cal.get("bos", "stream"), BOS_PLACEMENTS)
    _one_of("prune.attention_unit", c["prune"]["attention_unit"], ATTENTION_UNITS)
    _one_of("dtype", c["dtype"], ("auto", *DTYPES))
    if not (c["device"] in ("auto", "cpu") or str(c["device"]).startswith("cuda")):
        raise ConfigError(f"device={c['device']!r}; accepted: auto, cpu, cuda, cuda:N")
    m = c["model"]
    _one_of("model.source", m["source"], SOURCES)
    if m.get("path") and not Path(m["path"]).expanduser().exists():
        raise ConfigError(f"model.path={m['path']!r} does not exist")
    layers = m.get("layers")
    if layers is not None and (len(layers) != 2 or not 0 <= layers[0] < layers[1]):
        raise ConfigError(f"model.layers={layers!r}; accepted: [start, end) with 0 <= start < end, or null for all blocks")
    ppl = c["eval"].get("ppl")
    if ppl:
        for d in ppl["datasets"]:
            _one_of("eval.ppl.datasets item", d, CORPORA[:2])
        _one_of("eval.ppl.protocol", ppl["protocol"], tuple(PROTOCOLS))
        _one_of("eval.ppl.bos", ppl.get("bos", "stream"), BOS_PLACEMENTS)
    zs = c["eval"].get("zeroshot")
    if zs:
        from harness.evaluate.tasks import TASKS

        for t in zs["tasks"]:
            _one_of("eval.zeroshot.tasks item", t, TASKS)
        _one_of("eval.zeroshot.bos", zs.get("bos", "stream"), BOS_PLACEMENTS)


def validate_model(model, c: dict) -> None:
    """Checks that need the model's shape (still before calibration and pruning)."""
    from harness.allocation import budget
    from harness.models import adapter_for
    from harness.prune import module_shapes, n_params, prunable_layers

    ad = adapter_for(model)  # names the model_type and the supported ones
    n_layers = len(ad.layers(model))
    layers = c["model"].get("layers")
    if layers is not None and layers[1] > n_layers:
        raise ConfigError(f"model.layers={layers} is outside the model's {n_layers} blocks; accepted: [start, end) with end <= {n_layers}")
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    lengths = {"calibration.seqlen": c["calibration"]["seqlen"]}
    if c["eval"].get("ppl"):
        lengths["eval.ppl.seqlen"] = c["eval"]["ppl"]["seqlen"]
    for key, n in lengths.items():
        if context and n > context:
            raise ConfigError(f"{key}={n} exceeds the model's context of {context} tokens; accepted: 2 .. {context}")
    modules = tuple(c["prune"]["modules"])
    try:
        layer_range = prunable_layers(n_layers, tuple(layers) if layers else None)
        budget(module_shapes(ad, model, layer_range, modules, c["prune"]["attention_unit"]), n_params(model), c["sparsity"], c["sparsity_mode"],
               c["allocation"]["name"], layer_range)
    except ValueError as e:
        raise ConfigError(str(e)) from e
