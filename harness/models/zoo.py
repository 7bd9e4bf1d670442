"""The embedded models: small LLaMA- and GPT-2-architecture LMs trained here on real text.

No package ships GPT-2 weights, and the fast tests need small real models, so the project
trains its own, deterministically, on Penn Treebank train (Mikolov's version):

    python -m harness.models.zoo build            # all models into harness/zoo_weights (committed)
    python -m harness.models.zoo build tiny-gpt2 --out DIR

A byte-level BPE tokenizer (4096 tokens) is trained on the same text. Weights are stored in
float16 safetensors; `load` returns a float32 model through the same code path as a hub model.
The manifest records the training losses of the first steps and the file hashes, which the
test suite uses to show that the command reproduces the committed weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.data.corpora import documents
from harness.data.tokens import token_ids

COMMITTED_DIR = Path(__file__).parent.parent / "zoo_weights"
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 180
    batch_size: int = 32
    seqlen: int = 128
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 2


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=512, n_embd=256, n_layer=4, n_head=8, n_inner=1024,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )


MODELS = {"tiny-llama": _llama_config, "tiny-gpt2": _gpt2_config}


def train_tokenizer():
    """Byte-level BPE on PTB train, wrapped as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents("ptb", "train"), vocab_size=VOCAB_SIZE, min_frequency=2,
                            special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, unk_token=EOS, model_max_length=512)


def _token_stream(tokenizer) -> torch.Tensor:
    # Same join as the perplexity protocol, so train and evaluation text look alike.
    return token_ids(tokenizer, "\n\n".join(documents("ptb", "train")), add_special_tokens=True)


def train(name: str, tokenizer, spec: TrainSpec = TrainSpec(), steps: int | None = None):
    """Train one zoo model; returns (model, per-step losses). Deterministic on CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    torch.set_num_threads(spec.threads)
    torch.use_deterministic_algorithms(True)
    model = AutoModelForCausalLM.from_config(MODELS[name](), dtype=torch.float32)
    stream = _token_stream(tokenizer)
    n_windows = (len(stream) - 1) // spec.seqlen
    windows = stream[: n_windows * spec.seqlen].view(n_windows, spec.seqlen)
    gen = torch.Generator().manual_seed(spec.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses = []
    model.train()
    order = torch.randperm(n_windows, generator=gen)
    total = spec.steps if steps is None else steps
    for step in tqdm(range(total), desc=f"train {name}", disable=None):
        idx = order[(step * spec.batch_size + torch.arange(spec.batch_size)) % n_windows]
        batch = windows[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    torch.use_deterministic_algorithms(False)
    model.eval()
    return model, losses


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(name: str, out_dir: Path, spec: TrainSpec = TrainSpec()) -> Path:
    """Train `name` and save it (float16) with its tokenizer and manifest under out_dir/name."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; accepted: {', '.join(MODELS)}")
    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    start = time.time()
    tokenizer = train_tokenizer()
    model, losses = train(name, tokenizer, spec)
    model.to(torch.float16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    manifest = {
        "name": name, "spec": asdict(spec), "torch": torch.__version__,
        "first_losses": losses[:10], "final_loss": losses[-1], "train_seconds": round(time.time() - start, 1),
        "sha256": {"model.safetensors": _sha256(target / "model.safetensors")},
    }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness")).expanduser() / "zoo"


def locate(name: str) -> Path:
    """The folder of a zoo model: committed weights if present, else the cache, built if needed."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; accepted: {', '.join(MODELS)}")
    for base in (COMMITTED_DIR, cache_dir()):
        if (base / name / "model.safetensors").exists():
            return base / name
    return build(name, cache_dir())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.models.zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train zoo models")
    b.add_argument("names", nargs="*", default=list(MODELS), help=f"any of {', '.join(MODELS)}")
    b.add_argument("--out", type=Path, default=COMMITTED_DIR)
    b.add_argument("--steps", type=int, default=TrainSpec.steps)
    args = parser.parse_args(argv)
    for name in args.names:
        path = build(name, args.out, TrainSpec(steps=args.steps))
        print(f"{name}: {path} ({json.loads((path / 'manifest.json').read_text())['train_seconds']} s)")


if __name__ == "__main__":
    main()
