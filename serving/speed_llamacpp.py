"""Run in llama.cpp's environment: prefill and decode tokens/s of each GGUF file, batch 1.

    .venv-llamacpp/bin/python serving/speed_llamacpp.py MODELS.json OUT.json

MODELS.json: [{"name", "gguf", "prompt": [ids], "new_tokens": n, "repeats": r, "threads": t}].
Prefill: evaluating the prompt; decode: evaluating one token at a time after it (greedy), per
token. The median of `repeats` timings after one warm-up.
"""

import statistics
import time

import numpy as np
from cases import main  # serving/cases.py, beside this script
from llama_cpp import Llama


def once(llm: Llama, prompt: list[int], n: int) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return prefill, time.perf_counter() - start


def run(case: dict) -> dict:
    prompt, n = case["prompt"], case["new_tokens"]
    llm = Llama(model_path=case["gguf"], n_ctx=len(prompt) + n + 8, n_batch=len(prompt), verbose=False, seed=0,
                n_threads=case["threads"], logits_all=True)  # as the prefill of transformers: every position's logits
    once(llm, prompt, n)  # warm-up
    timings = [once(llm, prompt, n) for _ in range(case["repeats"])]
    prefill = statistics.median(t[0] for t in timings)
    decode = statistics.median(t[1] for t in timings)
    return {"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": n / decode,
            "prefill_seconds": prefill, "decode_seconds": decode}


if __name__ == "__main__":
    main(run)
