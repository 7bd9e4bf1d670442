"""A pruned LLaMA-family model written as one GGUF file that llama.cpp loads (`gguf` package's writer).

Uniform blocks (every block the same heads, KV heads and MLP width, including depth-pruned
models: fewer blocks of the dense shape) are written as llama.cpp's architecture for the
family (`llama`, `qwen2`); blocks of different shapes as `deci` (DeciLM / Nemotron-NAS), whose
`head_count`, `head_count_kv` and `feed_forward_length` are per-layer arrays. What llama.cpp
cannot express is refused with the reason (`GGUFRefused`), before anything is written:
  - architectures other than llama / mistral / qwen2 (their GGUF writers are not here);
  - per-layer shapes of a model with q/k/v biases (deci sizes a query bias by the hidden width),
    and Qwen2 with query heads removed (its `qwen2` sizes the query projection the same way);
  - a removed MLP in a block that keeps its attention (deci's graph then drops the attention's
    output too), and block 0 without attention (llama.cpp reads the head size from layer 0);
  - biases the bias remedy added to the MLP's down projection of a uniform `llama`/`qwen2` model
    (those architectures have no such tensor; `deci` has);
  - a sliding attention window (those architectures attend to the whole context), rope scaling
    other than none.
LLaMA's rotary layout differs from llama.cpp's `llama`/`deci` one: the query and key rows of each
head are permuted (the two halves interleaved), as llama.cpp's own converter does; `qwen2` keeps
transformers' layout. The tokenizer is copied from the GGUF the model was loaded from (every
offline model here), or given as such a file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.models import adapter_for
from harness.models.surgery import ATTENTION, MLP, block_shape, part_skipped

GGUF_DTYPES = ("f32", "f16", "bf16")
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # uniform blocks
_NEOX = ("qwen2",)  # architectures that keep transformers' rotary layout


class GGUFRefused(ValueError):
    """The model is one llama.cpp cannot express; the message says why."""


def check_config(config) -> None:
    """What the model's config alone decides (before any weight loads): GGUFRefused, or nothing."""
    kind = config.model_type
    if kind not in FAMILY_ARCH:
        raise GGUFRefused(f"GGUF export writes LLaMA-family models ({', '.join(FAMILY_ARCH)}); "
                          f"this is {kind}: export it as a transformers folder")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise GGUFRefused(f"sliding_window={window}: llama.cpp's {FAMILY_ARCH[kind]} architecture attends to the whole "
                          "context; export it as a transformers folder")
    scaling = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if scaling != "default":
        raise GGUFRefused(f"rope scaling {scaling!r} is not written here; accepted: none (rope_type default)")


def plan(model: nn.Module) -> dict:
    """The GGUF architecture and per-layer shapes of `model`, or GGUFRefused with the reason."""
    config = model.config
    kind = config.model_type
    check_config(config)
    ad = adapter_for(model)
    blocks = ad.layers(model)
    shapes = [block_shape(ad, b) for b in blocks]
    for k, b in enumerate(blocks):
        if part_skipped(ad, b, MLP) and not part_skipped(ad, b, ATTENTION):
            raise GGUFRefused(f"block {k} lost its MLP but kept its attention; llama.cpp's deci graph skips a "
                              "layer's whole output when it has no MLP")
    uniform = all(s == shapes[0] for s in shapes)
    qkv_bias = any(getattr(m, "bias", None) is not None for b in blocks for m in _qkv(ad.attention_module(b)))
    down_bias = any(ad.mlp(b).level2.bias is not None for b in blocks if not part_skipped(ad, b, MLP))
    if uniform and not down_bias:
        arch = FAMILY_ARCH[kind]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if arch == "qwen2" and shapes[0]["heads"] * head_dim != config.hidden_size:
            raise GGUFRefused(f"llama.cpp's qwen2 architecture sizes the query projection by the hidden width "
                              f"({config.hidden_size}); this model keeps {shapes[0]['heads']} heads of {head_dim}: "
                              "export it as a transformers folder")
    else:
        if qkv_bias:
            raise GGUFRefused("blocks of different shapes (or MLP output biases) need llama.cpp's deci architecture, "
                              f"which sizes a query bias by the hidden width; {kind} has q/k/v biases: export it as a "
                              "transformers folder")
        if shapes[0]["heads"] == 0:
            raise GGUFRefused("block 0 has no attention; llama.cpp reads the head size from layer 0")
        arch = "deci"
    return {"arch": arch, "shapes": shapes}


def _qkv(attention: nn.Module) -> list[nn.Module]:
    return [getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj") if hasattr(attention, n)]


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
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(shapes))
    per_layer = arch == "deci"
    writer.add_feed_forward_length([s["channels"] for s in shapes] if per_layer else shapes[0]["channels"])
    writer.add_head_count([s["heads"] for s in shapes] if per_layer else shapes[0]["heads"])
    writer.add_head_count_kv([s["kv_heads"] for s in shapes] if per_layer else shapes[0]["kv_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer.add_file_type(file_type)
    _copy_tokenizer(writer, Path(vocab_from), config.vocab_size)
    for gguf_name, tensor in _tensors(model, arch, shapes, head_dim):
        writer.add_tensor(gguf_name, _array(gguf_name, tensor, dtype), raw_dtype=_raw_type(gguf_name, tensor, dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _tensors(model: nn.Module, arch: str, shapes: list[dict], head_dim: int):
    """(GGUF name, tensor) of every weight, query and key rows permuted for the non-NeoX layouts."""
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for k, shape in enumerate(shapes):
        prefix = f"model.layers.{k}."
        for hf, short in _NAMES.items():
            if short == "attn_norm" and shape["heads"] == 0:
                continue  # no attention: deci loads no attention tensors for the layer
            for suffix in ("weight", "bias"):
                tensor = state.get(f"{prefix}{hf}.{suffix}")
                if tensor is None:
                    continue
                if arch not in _NEOX and short in ("attn_q", "attn_k"):
                    tensor = _interleave(tensor, shape["heads"] if short == "attn_q" else shape["kv_heads"], head_dim)
                yield f"blk.{k}.{short}.{suffix}", tensor
    yield "output_norm.weight", state["model.norm.weight"]
    if not model.config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]


def _interleave(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Per head, the rotary halves [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}] reordered to pairs (x_i, x_{i+d/2})."""
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _array(name: str, tensor: torch.Tensor, dtype: str) -> np.ndarray:
    t = tensor.detach().float()
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
