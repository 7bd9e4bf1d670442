import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if os.path.isdir(_SHARED):
    os.environ.setdefault("HARNESS_DATA_DIR", os.path.abspath(_SHARED))


def random_model(model_type: str, **overrides):
    """A small randomly initialised model (shape tests need no training)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if model_type == "llama":
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
        kw.update(overrides)
        cfg = LlamaConfig(**kw)
    else:
        kw = dict(vocab_size=128, n_embd=64, n_layer=3, n_head=8, n_positions=128, bos_token_id=0, eos_token_id=0)
        kw.update(overrides)
        cfg = GPT2Config(**kw)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(params=["llama", "gpt2"])
def model_type(request):
    return request.param


@pytest.fixture(scope="session")
def zoo_models():
    from omegaconf import OmegaConf

    from harness.models import loading

    out = {}
    for name in ("tiny-llama", "tiny-gpt2"):
        cfg = OmegaConf.create({"name": name, "source": "zoo", "path": None})
        out[name] = loading.load(cfg, torch.device("cpu"), torch.float32)
    return out


@pytest.fixture
def zoo(zoo_models):
    def get(name):
        model, tok = zoo_models[name]
        return copy.deepcopy(model), tok

    return get
