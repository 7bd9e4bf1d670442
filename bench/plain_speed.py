"""Forward and generation speed of model folders loaded by plain transformers (run as a
script in its own process: nothing from harness is imported, as for a user of the export).

    python bench/plain_speed.py FOLDER [FOLDER ...] [--seqlen 128] [--device cpu]

Prints one JSON line per folder: forward tokens/s at batch 1 and 8 (best of 5, no cache)
and the latency of a 32-token prompt followed by --new-tokens (64) greedily generated tokens
(best of 3)."""

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def _best(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def measure(folder: str, seqlen: int, device: torch.device, new_tokens: int = 64) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    row = {"folder": folder, "params": sum(p.numel() for p in model.parameters())}
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
        seconds = _best(lambda ids=ids: model(input_ids=ids, use_cache=False), 5, device)
        row[f"forward_tokens_per_s_batch{batch}"] = batch * seqlen / seconds
    prompt = torch.randint(0, vocab, (1, 32), generator=gen).to(device)
    row["generate_seconds"] = _best(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0), 3, device)
    return row


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    for folder in a.folders:
        print(json.dumps(measure(folder, a.seqlen, torch.device(a.device), a.new_tokens)), flush=True)
    sys.exit(1 if "harness" in sys.modules else 0)
