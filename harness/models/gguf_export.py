"""A pruned model written as one GGUF file that llama.cpp loads (`gguf` package's writer).

Which llama.cpp architecture holds it (`plan`):
  - uniform blocks (every block the same heads, KV heads and MLP width, including depth-pruned
    models: fewer blocks of the dense shape) as llama.cpp's architecture for the family: `llama`
    (LLaMA, Mistral, Phi-3), `qwen2`, `qwen3`, `gemma3` (with its sliding-window layers), `gpt2`;
  - blocks of different shapes, MLP output biases the bias remedy added, or a removed attention,
    as `deci` (DeciLM / Nemotron-NAS), whose `head_count`, `head_count_kv` and
    `feed_forward_length` are per-layer arrays: LLaMA, Mistral and Phi-3;
  - Phi-3 as LLaMA blocks, its fused q|k|v and gate|up projections split (llama.cpp's `phi3` sizes
    the query by the hidden width, so it could not hold Phi-3 with heads removed); a Qwen2 with
    heads removed as `llama` (`qwen2` sizes the query the same way; `llama` by heads x head size,
    and it takes q/k/v biases).
llama.cpp reads per-layer arrays for every architecture but sizes the tensors of all but `deci`
from layer 0. What it cannot express is refused with the reason (`GGUFRefused`), before anything
is written:
  - OPT (llama.cpp has no such architecture);
  - GPT-2 with heads removed (`gpt2` sizes the attention projections by the hidden width);
  - per-layer shapes or removed sub-blocks of GPT-2, Qwen3 and Gemma-3 (their architectures are
    uniform and `deci` lacks their norms / layer norms), and of models with q/k/v biases (deci
    sizes a query bias by the hidden width);
  - MLP output biases on Qwen3 / Gemma-3; a removed MLP in a block that keeps its attention (deci's
    graph then drops the attention's output too); block 0 without attention (llama.cpp reads the
    head size from layer 0);
  - a sliding attention window outside Gemma-3 (those architectures attend to the whole context),
    rope scaling other than none (Gemma-3: linear on its global layers), Gemma-3 attention scales
    other than 1/sqrt(head size) or with a logit soft-cap.
The rotary layout of `llama` / `deci` differs from transformers': the query and key rows of each
head are permuted (the two halves interleaved), as llama.cpp's own converter does; the NeoX-style
architectures keep transformers' layout. Gemma's norms store w for a scale of 1 + w; llama.cpp
multiplies by its weight, so 1 is added (as its converter does). The tokenizer is copied from the
GGUF the model was loaded from (every offline model here), or given as such a file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.models import adapter_for
from harness.models.surgery import ATTENTION, MLP, PARTS, block_shape, config_head_dim, part_skipped

GGUF_DTYPES = ("f32", "f16", "bf16")
# uniform blocks; Phi-3's blocks are LLaMA's with fused projections, which are split
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "phi3": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma3_text": "gemma3", "gpt2": "gpt2"}
_UNIFORM_ONLY = ("gpt2", "qwen3", "gemma3_text")  # no per-layer route (deci has no such blocks)
_NEOX = ("qwen2", "qwen3", "gemma3")  # architectures that keep transformers' rotary layout


class GGUFRefused(ValueError):
    """The model is one llama.cpp cannot express; the message says why."""


def _refuse(reason: str) -> GGUFRefused:
    return GGUFRefused(f"{reason}: export it as a transformers folder")


def check_config(config) -> None:
    """What the model's config alone decides (before any weight loads): GGUFRefused, or nothing."""
    kind = config.model_type
    if kind not in FAMILY_ARCH:
        raise _refuse(f"GGUF export writes {', '.join(FAMILY_ARCH)} models (llama.cpp has no {kind} architecture)")
    if kind == "gemma3_text":
        _check_gemma3(config)
        return
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise _refuse(f"sliding_window={window}: llama.cpp's {FAMILY_ARCH[kind]} architecture attends to the whole "
                      "context")
    scaling = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if scaling != "default":
        raise _refuse(f"rope scaling {scaling!r} is not written here; accepted: none (rope_type default)")


def _check_gemma3(config) -> None:
    rope = config.rope_parameters
    if rope["sliding_attention"].get("rope_type", "default") != "default" or \
            rope["full_attention"].get("rope_type", "default") not in ("default", "linear"):
        raise _refuse(f"rope scaling {rope}: llama.cpp's gemma3 takes linear scaling on its global layers only")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise _refuse("an attention logit soft-cap: llama.cpp's gemma3 has none")
    if config.query_pre_attn_scalar != config_head_dim(config):
        raise _refuse(f"query_pre_attn_scalar={config.query_pre_attn_scalar}: llama.cpp's gemma3 scales queries by "
                      f"1/sqrt(head size {config_head_dim(config)})")


def plan(model: nn.Module) -> dict:
    """The GGUF architecture and per-layer shapes of `model`, or GGUFRefused with the reason."""
    config = model.config
    kind = config.model_type
    check_config(config)
    ad = adapter_for(model)
    blocks = ad.layers(model)
    shapes = [block_shape(ad, b) for b in blocks]
    skipped = any(part_skipped(ad, b, part) for b in blocks for part in PARTS)
    uniform = not skipped and all(s == shapes[0] for s in shapes)
    qkv_bias = any(getattr(m, "bias", None) is not None for b in blocks if not part_skipped(ad, b, ATTENTION)
                   for m in _qkv(ad.attention_module(b)))
    down_bias = kind != "gpt2" and any(ad.mlp(b).level2.bias is not None for b in blocks if not part_skipped(ad, b, MLP))
    full_heads = shapes[0]["heads"] * config_head_dim(config) == config.hidden_size
    family = FAMILY_ARCH[kind]
    if kind in _UNIFORM_ONLY:
        if not uniform:
            raise _refuse(f"llama.cpp's {family} architecture gives every block block 0's heads and MLP width, and "
                          "every block its attention and MLP; this model's blocks differ")
        if down_bias:
            raise _refuse(f"the bias remedy added MLP output biases, which llama.cpp's {family} does not have")
        if kind == "gpt2" and not full_heads:
            raise _refuse(f"llama.cpp's gpt2 sizes the attention projections by the hidden width "
                          f"({config.hidden_size}); this model keeps {shapes[0]['heads']} heads of {config_head_dim(config)}")
        return {"arch": family, "shapes": shapes}
    if kind == "phi3":
        _check_full_rotary(config)
    if uniform and not down_bias:
        if kind == "qwen2" and full_heads:
            return {"arch": family, "shapes": shapes}
        return {"arch": "llama", "shapes": shapes}  # also a Qwen2 with heads removed
    for k, b in enumerate(blocks):
        if part_skipped(ad, b, MLP) and not part_skipped(ad, b, ATTENTION):
            raise _refuse(f"block {k} lost its MLP but kept its attention; llama.cpp's deci graph skips a layer's "
                          "whole output when it has no MLP")
    if qkv_bias:
        raise _refuse("blocks of different shapes (or MLP output biases) need llama.cpp's deci architecture, which "
                      f"sizes a query bias by the hidden width; {kind} has q/k/v biases")
    if shapes[0]["heads"] == 0:
        raise _refuse("block 0 has no attention; llama.cpp reads the head size from layer 0")
    return {"arch": "deci", "shapes": shapes}


def _check_full_rotary(config) -> None:
    factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise _refuse(f"partial_rotary_factor={factor}: llama.cpp's llama / deci, which hold Phi-3, rotate the whole "
                      "head")


def _qkv(attention: nn.Module) -> list[nn.Module]:
    return [getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn") if hasattr(attention, n)]


def write_gguf(model: nn.Module, path: str | Path, vocab_from: str | Path, dtype: str = "f16",
               name: str = "") -> Path:
    """Write `model` (pruned in memory) to the GGUF file `path`; the tokenizer comes from the GGUF
    file `vocab_from`. Returns `path`."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r}; accepted: {', '.join(GGUF_DTYPES)}")
    layout = plan(model)
    arch, shapes = layout["arch"], layout["shapes"]
    config = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or config.model_type)
    _add_hyperparameters(writer, config, arch, shapes)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer.add_file_type(file_type)
    _copy_tokenizer(writer, Path(vocab_from), config.vocab_size)
    tensors = _gpt2_tensors(model) if arch == "gpt2" else _decoder_tensors(model, arch, shapes)
    for gguf_name, tensor in tensors:
        writer.add_tensor(gguf_name, _array(gguf_name, tensor, dtype), raw_dtype=_raw_type(gguf_name, tensor, dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hyperparameters(writer, config, arch: str, shapes: list[dict]) -> None:
    import gguf

    head_dim = config_head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(shapes))
    per_layer = arch == "deci"
    writer.add_feed_forward_length([s["channels"] for s in shapes] if per_layer else shapes[0]["channels"])
    writer.add_head_count([s["heads"] for s in shapes] if per_layer else shapes[0]["heads"])
    writer.add_head_count_kv([s["kv_heads"] for s in shapes] if per_layer else shapes[0]["kv_heads"])
    writer.add_key_length(head_dim)  # with heads removed, llama.cpp's default (width / heads) is wrong
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    rope = config.rope_parameters
    if arch == "gemma3":
        full, sliding = rope["full_attention"], rope["sliding_attention"]
        writer.add_rope_freq_base(float(full["rope_theta"]))
        if full.get("rope_type", "default") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        layer_types = list(config.layer_types)
        if "sliding_attention" in layer_types:
            writer.add_sliding_window(config.sliding_window)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
        if getattr(config, "final_logit_softcapping", None) is not None:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        return
    writer.add_rope_freq_base(float(rope["rope_theta"]))


def _copy_tokenizer(writer, source: Path, vocab_size: int) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFRefused(f"{source} holds no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_size:
        raise GGUFRefused(f"{source}'s tokenizer has {len(tokens.data)} tokens; the model's vocabulary is {vocab_size}")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = field.types
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), types[0], sub_type=types[-1])
        else:
            writer.add_key_value(key, field.contents(), types[0])


_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GEMMA3_NAMES = {**_NAMES, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}


def _decoder_tensors(model: nn.Module, arch: str, shapes: list[dict]):
    """(GGUF name, tensor) of every weight of a LLaMA-like decoder: Phi-3's fused projections split,
    query and key rows permuted for the non-NeoX layouts,
    Gemma's norms shifted by one."""
    config = model.config
    head_dim = config_head_dim(config)
    gemma = arch == "gemma3"
    names = _GEMMA3_NAMES if gemma else _NAMES
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for k, shape in enumerate(shapes):
        prefix = f"model.layers.{k}."
        layer = {n.removeprefix(prefix): t for n, t in state.items() if n.startswith(prefix)}
        layer = _split_fused(layer, shape, head_dim)
        for local, tensor in layer.items():
            module, _, suffix = local.rpartition(".")
            short = names.get(module)
            if short is None or (short == "attn_norm" and shape["heads"] == 0):
                continue  # deci loads no attention tensors for a layer without attention
            if arch not in _NEOX and short in ("attn_q", "attn_k"):
                tensor = _interleave(tensor, shape["heads"] if short == "attn_q" else shape["kv_heads"], head_dim)
            if gemma and "norm" in short:
                tensor = tensor + 1
            yield f"blk.{k}.{short}.{suffix}", tensor
    norm = state["model.norm.weight"]
    yield "output_norm.weight", norm + 1 if gemma else norm
    if not config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]


def _split_fused(layer: dict[str, torch.Tensor], shape: dict, head_dim: int) -> dict[str, torch.Tensor]:
    """Phi-3's q|k|v and gate|up projections as LLaMA's separate ones (a no-op elsewhere)."""
    out = dict(layer)
    for suffix in ("weight", "bias"):
        qkv = out.pop(f"self_attn.qkv_proj.{suffix}", None)
        if qkv is not None:
            sizes = [shape["heads"] * head_dim, shape["kv_heads"] * head_dim, shape["kv_heads"] * head_dim]
            for part, t in zip(("q_proj", "k_proj", "v_proj"), qkv.split(sizes), strict=True):
                out[f"self_attn.{part}.{suffix}"] = t
        gate_up = out.pop(f"mlp.gate_up_proj.{suffix}", None)
        if gate_up is not None:
            out[f"mlp.gate_proj.{suffix}"], out[f"mlp.up_proj.{suffix}"] = gate_up.chunk(2)
    return out


_GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # weights stored [in, out]


def _gpt2_tensors(model: nn.Module):
    """(GGUF name, tensor) of every GPT-2 weight, Conv1D weights transposed to a Linear's [out, in]."""
    state = model.state_dict()
    yield "token_embd.weight", state["transformer.wte.weight"]
    yield "position_embd.weight", state["transformer.wpe.weight"]
    for k in range(len(model.transformer.h)):
        for hf, short in _GPT2_NAMES.items():
            weight, bias = state[f"transformer.h.{k}.{hf}.weight"], state[f"transformer.h.{k}.{hf}.bias"]
            yield f"blk.{k}.{short}.weight", weight.T if hf in _CONV1D else weight
            yield f"blk.{k}.{short}.bias", bias
    yield "output_norm.weight", state["transformer.ln_f.weight"]
    yield "output_norm.bias", state["transformer.ln_f.bias"]
    if not model.config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]


def _interleave(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Per head, the rotary halves [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}] reordered to pairs (x_i, x_{i+d/2})."""
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _array(name: str, tensor: torch.Tensor, dtype: str) -> np.ndarray:
    t = tensor.detach().float().contiguous()
    if name.endswith(".weight") and t.dim() == 2 and dtype != "f32":
        if dtype == "f16":
            return t.half().numpy()
        return t.bfloat16().view(torch.int16).numpy()  # the writer takes bf16 as raw 16-bit words
    return t.numpy()  # norms, biases and f32: float32, as llama.cpp's converter keeps them


def _raw_type(name: str, tensor: torch.Tensor, dtype: str):
    import gguf

    if name.endswith(".weight") and tensor.dim() == 2 and dtype == "bf16":
        return gguf.GGMLQuantizationType.BF16
    return None
