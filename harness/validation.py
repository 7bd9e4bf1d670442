"""Checks that run before any expensive work; each error names the bad value and what is accepted."""

from __future__ import annotations

import math
import os
import re
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


def _integer(name: str, value, low: int, none: str | None = None) -> None:
    """An integer >= low (bool is not one); `none` says what null means where null is allowed."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        accepted = f"an integer >= {low}" + (f", or null ({none})" if none else "")
        raise ConfigError(f"{name}={value!r}; accepted: {accepted}")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _writable_dir(name: str, path) -> None:
    """The nearest existing folder of `path` must be writable (the run creates the rest)."""
    p = Path(path).expanduser().resolve()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}={str(path)!r} is not writable ({existing} is not a writable folder); "
                          "accepted: a folder this user can create files in")


def validate_config(c: dict) -> None:
    s = c["sparsity"]
    if not isinstance(s, int | float) or not 0 <= s < 1:
        raise ConfigError(f"sparsity={s!r} is outside [0, 1); accepted: a number with 0 <= sparsity < 1")
    _one_of("sparsity_mode", c["sparsity_mode"], allocation.SPARSITY_MODES)
    _one_of("model.bos", c["model"].get("bos", "stream"), BOS_PLACEMENTS)
    _one_of("allocation", c["allocation"]["name"], allocation.ALLOCATIONS)
    _one_of("remedy", c["remedy"]["name"], remedy.REMEDIES)
    if "damp" in c["remedy"]:
        damp = c["remedy"]["damp"]
        if isinstance(damp, bool) or not isinstance(damp, int | float) or not math.isfinite(damp) or damp <= 0:
            raise ConfigError(f"remedy.damp={damp!r}; accepted: a finite number > 0 (lambda = damp * mean diag X^T X)")
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
    if not mods or any(m not in ("attention", "mlp") for m in mods) or len(set(mods)) != len(mods):
        raise ConfigError(f"prune.modules={mods!r}; accepted: a non-empty subset of [attention, mlp], each at most once")
    _integer("prune.chunk_size", c["prune"]["chunk_size"], 1)
    _integer("seed", c["seed"], 0)
    _integer("calibration.seed", cal.get("seed", 0), 0)
    _one_of("calibration.bos", cal.get("bos", "stream"), BOS_PLACEMENTS)
    _one_of("prune.attention_unit", c["prune"]["attention_unit"], ATTENTION_UNITS)
    _one_of("dtype", c["dtype"], ("auto", *DTYPES))
    if not DEVICE.fullmatch(str(c["device"])):
        raise ConfigError(f"device={c['device']!r} is not accepted; accepted: auto, cpu, cuda, cuda:N, mps")
    if str(c["device"]).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device={c['device']!r} but no CUDA device is available; accepted here: auto, cpu")
        index = int(c["device"].partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={c['device']!r}: this machine has {torch.cuda.device_count()} CUDA devices; "
                              f"accepted: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    _writable_dir("out_dir", c["out_dir"])
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
        _integer("eval.ppl.seqlen", ppl["seqlen"], 2)
        _integer("eval.ppl.batch_size", ppl["batch_size"], 1)
        _integer("eval.ppl.max_tokens", ppl.get("max_tokens"), ppl["seqlen"], none="the whole stream")
    zs = c["eval"].get("zeroshot")
    if zs:
        from harness.evaluate.tasks import TASKS

        for t in zs["tasks"]:
            _one_of("eval.zeroshot.tasks item", t, TASKS)
        _one_of("eval.zeroshot.bos", zs.get("bos", "stream"), BOS_PLACEMENTS)
        _integer("eval.zeroshot.limit", zs.get("limit"), 1, none="every example")
        _integer("eval.zeroshot.batch_size", zs["batch_size"], 1)
    efficiency = c["eval"].get("efficiency")
    if efficiency:
        _integer("eval.efficiency.seqlen", efficiency["seqlen"], 1)
        _integer("eval.efficiency.batch_size", efficiency["batch_size"], 1)


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
