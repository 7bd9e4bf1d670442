"""Export a pruned model as a folder that plain transformers loads (no harness import).

Two routes, chosen by what a stock config can say:
  stock   every block has the same shapes: the stock config with the new head counts, MLP
          width and an explicit head_dim (plus the architecture's own bias flags where the
          bias remedy added level-2 biases; the other biases those flags create are zeros);
          `AutoModelForCausalLM.from_pretrained(folder)` builds it as is.
  remote  anything else (per-layer shapes, biases no flag creates, GPT-2/OPT with heads
          removed, attention sub-blocks removed): the dense config plus the recorded
          per-module shapes and attributes, the names of the removed sub-blocks, and
          `auto_map` to `modeling_pruned.py`, copied into the folder (the causal LM for
          `AutoModelForCausalLM`, its decoder for `AutoModel`, which vLLM's Transformers
          backend builds); load with `trust_remote_code=True`.
The route is decided by building the stock model from the candidate config on the meta
device and comparing every parameter's name and shape with the pruned model's.
The folder also holds a model card (README.md) and, when given, the run's record.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from harness import records
from harness.models import adapter_for, module_view
from harness.models.card import model_card
from harness.models.surgery import ATTENTION, PARTS, block_shape, config_head_dim, part_skipped

PRUNING_KEY = "harness_pruning"  # per-layer shapes, for the model card and the reader
_MODELING = Path(__file__).with_name("modeling_pruned.py")
_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_COUNT_ATTRIBUTES = ("num_heads", "num_key_value_heads", "num_key_value_groups", "split_size", "embed_dim")


def layer_shapes(model) -> list[dict]:
    ad = adapter_for(model)
    shapes = []
    for block in ad.layers(model):
        shape = block_shape(ad, block)
        shape["level2_bias"] = [not part_skipped(ad, block, part) and (ad.attention(block) if part == ATTENTION else
                                                                      ad.mlp(block)).level2.bias is not None
                                for part in PARTS]
        shapes.append(shape)
    return shapes


def skipped_modules(model) -> dict[str, str]:
    """{module name: part} of the sub-blocks replaced by their skipped form (models/surgery.py)."""
    ad = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for block in ad.layers(model):
        for part in PARTS:
            module = ad.attention_module(block) if part == ATTENTION else ad.mlp_module(block)
            if module is not None and part_skipped(ad, block, part):
                out[names[id(module)]] = part
    return out


def _dense_config(model):
    config = copy.deepcopy(model.config)
    for key in (PRUNING_KEY, "pruned_modules", "pruned_attributes", "skipped_modules", "auto_map"):
        config.__dict__.pop(key, None)
    return config


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _stock_model(config) -> nn.Module | None:
    """The stock model a config builds (on the meta device), or None where the config is refused
    (LLaMA: the width must be a multiple of the head count; GPT-2: heads x head_dim = width)."""
    try:
        config.validate()
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - any refusal of the candidate means: the remote route
        return None


def _stock_candidate(model, shapes: list[dict]):
    """The stock config that would describe the pruned model if all blocks are alike, or None."""
    first = shapes[0]
    if any(s != first for s in shapes):
        return None
    config = _dense_config(model)
    t = config.model_type
    if t in _LLAMA_FAMILY or t == "phi3":
        config.update({"num_attention_heads": first["heads"], "num_key_value_heads": first["kv_heads"],
                       "intermediate_size": first["channels"], "head_dim": config_head_dim(config)})
        o_bias, down_bias = first["level2_bias"]
        if o_bias and hasattr(config, "attention_bias"):
            config.attention_bias = True
        if down_bias and hasattr(config, "mlp_bias"):
            config.mlp_bias = True
    elif t == "gpt2":
        config.update({"n_head": first["heads"], "n_inner": first["channels"]})
    elif t == "opt":
        config.update({"num_attention_heads": first["heads"], "ffn_dim": first["channels"]})
    return config


def _fits(stock: nn.Module | None, pruned: dict[str, tuple]) -> bool:
    """Every pruned tensor is in the stock model with its shape; the stock model's extras are biases."""
    if stock is None:
        return False
    have = _shapes(stock)
    tied = set(getattr(stock, "_tied_weights_keys", None) or {})
    if any(have.get(name) != shape for name, shape in pruned.items() if name not in tied):
        return False
    return all(name.endswith(".bias") for name in set(have) - set(pruned))


def _module_diff(model: nn.Module, stock: nn.Module) -> tuple[dict, dict]:
    """(modules whose parameters differ from the stock model's, attributes that differ)."""
    modules, attributes = {}, {}
    stock_modules = dict(stock.named_modules())
    for name, module in model.named_modules():
        ref = stock_modules.get(name)
        if ref is None:
            continue
        w, w_ref = getattr(module, "weight", None), getattr(ref, "weight", None)
        if isinstance(w, torch.Tensor) and isinstance(w_ref, torch.Tensor):
            bias = getattr(module, "bias", None)
            ref_bias = getattr(ref, "bias", None)
            if w.shape != w_ref.shape or (bias is None) != (ref_bias is None) or (
                    bias is not None and bias.shape != ref_bias.shape):
                modules[name] = {"weight": list(w.shape), "bias": None if bias is None else list(bias.shape)}
        changed = {k: getattr(module, k) for k in _COUNT_ATTRIBUTES
                   if isinstance(getattr(module, k, None), int) and getattr(module, k) != getattr(ref, k, None)}
        own = getattr(module, "config", None).__dict__.get("_own") if hasattr(module, "config") else None
        if own:
            changed["config"] = dict(own)
        if changed:
            attributes[name] = changed
    return modules, attributes


_MLP_WIDTH_KEY = {"gpt2": "n_inner", "opt": "ffn_dim"}  # else intermediate_size


def _per_layer_config(model_type: str, shapes: list[dict], head_dim: int) -> dict[int, dict]:
    """transformers' heterogeneous-config form of the per-layer shapes (vLLM sizes each layer's
    attention and KV cache from it; the head size is explicit, as vLLM otherwise derives it from
    the hidden width and the layer's head count)."""
    width = _MLP_WIDTH_KEY.get(model_type, "intermediate_size")
    return {i: {"num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], width: s["channels"],
                "head_dim": head_dim} for i, s in enumerate(shapes)}


def sparsity_config(model, record: dict | None) -> dict | None:
    """A masked run's sparsity in compressed-tensors' `SparsityCompressionConfig` form (what
    llm-compressor <= 0.14 wrote under `quantization_config`): dense storage, the N:M structure
    (or unstructured), the model's fraction of zeros, and the masked linear layers by name."""
    pruning = (record or {}).get("pruning", {})
    if "pattern" not in pruning:
        return None
    ad = adapter_for(model)
    blocks = ad.layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = {names[id(m)] for k in range(*pruning["layers"]) for kind in record["config"]["prune"]["modules"]
               for view in [module_view(ad, blocks[k], kind)] for m in (*view.level1, view.level2)}
    head = names.get(id(model.get_output_embeddings()))
    return {"format": "dense", "sparsity_structure": pruning["pattern"] if pruning["sparsity_type"] == "nm"
            else "unstructured", "global_sparsity": pruning["sparsity_of_model"], "targets": sorted(targets),
            "ignore": [head] if head else [], "registry_requires_subclass": False}


def export(model, tokenizer, path: str | Path, record: dict | None = None) -> Path:
    """Write `model` (pruned in memory) to `path` as a transformers folder; returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, route, zeros = export_config(model, path)
    sparsity = sparsity_config(model, record)
    if sparsity is not None:
        getattr(config, PRUNING_KEY)["sparsity_config"] = sparsity
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    state.update({name: torch.zeros(shape, dtype=dtype) for name, shape in zeros.items()})
    model.save_pretrained(path, state_dict=state)
    finish(config, tokenizer, path, route, record)
    return path


def export_config(model, path: Path):
    """(the config to save, the route, {name: shape} of the zero biases the stock route adds);
    writes modeling_pruned.py into `path` on the remote route. `model` may be on the meta device."""
    shapes = layer_shapes(model)
    pruned = _shapes(model)
    config = _stock_candidate(model, shapes)
    stock = _stock_model(config) if config is not None else None
    route = "stock" if _fits(stock, pruned) else "remote"
    zeros = {}
    if route == "stock":
        stock_shapes = _shapes(stock)
        zeros = {name: stock_shapes[name] for name in set(stock_shapes) - set(pruned)}  # the flag's other biases
    else:
        config = _dense_config(model)
        modules, attributes = _module_diff(model, _stock_model(config))
        config.pruned_modules, config.pruned_attributes = modules, attributes
        config.skipped_modules = skipped_modules(model)
        # The globals stay the dense model's (modeling_pruned.py builds from them, then resizes).
        config.allow_global_per_layer_attribute_access = True
        ad = adapter_for(model)
        head_dim = next((ad.attention(b).head_dim for b in ad.layers(model) if not part_skipped(ad, b, ATTENTION)), None)
        if head_dim is not None:  # OPT and GPT-2 configs have none: theirs is hidden / heads of the dense model
            config.head_dim = head_dim
        config.per_layer_config = _per_layer_config(config.model_type, shapes, head_dim)
        config.auto_map = {"AutoModel": "modeling_pruned.PrunedModel",
                           "AutoModelForCausalLM": "modeling_pruned.PrunedForCausalLM"}
        config.architectures = ["PrunedForCausalLM"]
        decoder = type(model.get_submodule(model.base_model_prefix)).__name__
        source = (_MODELING.read_text()
                  .replace('BASE_CLASS = "LlamaForCausalLM"', f'BASE_CLASS = "{type(model).__name__}"', 1)
                  .replace('BASE_MODEL_CLASS = "LlamaModel"', f'BASE_MODEL_CLASS = "{decoder}"', 1))
        (path / "modeling_pruned.py").write_text(source)
    if route == "stock" and not config.architectures:  # engines pick the model class by it (vLLM)
        config.architectures = [type(model).__name__]
    setattr(config, PRUNING_KEY, {"layers": shapes, "route": route})
    return config, route, zeros


def finish(config, tokenizer, path: Path, route: str, record: dict | None) -> None:
    """The config (over whatever the weights' writer put there), tokenizer, record and card."""
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if record is not None:
        write_card(path, record, route)


def write_card(path: Path, record: dict, route: str) -> None:
    """The run's record and the model card made from it, beside the weights."""

    # strict JSON as the record itself is written: a NaN (an interval too short to compute) is null
    (path / "record.json").write_text(json.dumps(records.strict(record), indent=2, allow_nan=False))
    (path / "README.md").write_text(model_card(record, route))


def load_exported(path: str | Path, dtype: torch.dtype = torch.float32):
    """An exported folder back in memory, through transformers as any user loads it."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=True)
    return model.eval()
