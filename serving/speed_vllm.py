"""Run in vLLM's environment: prefill and decode tokens/s of each exported folder, batch 1.

    .venv-vllm/bin/python serving/speed_vllm.py MODELS.json OUT.json

MODELS.json: [{"name", "folder", "remote", "prompt": [ids], "new_tokens": n, "repeats": r}].
Prefill: a request for one new token (time to first token); decode: the rest of a request for
`new_tokens`, per token. The median of `repeats` timings after one warm-up request.
"""

import gc
import statistics
import time

from cases import main  # serving/cases.py, beside this script
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def timed(llm: LLM, prompt: list[int], n: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    return time.perf_counter() - start


def run(case: dict) -> dict:
    llm = LLM(model=case["folder"], dtype=case.get("dtype", "bfloat16"), trust_remote_code=case["remote"],
              max_model_len=len(case["prompt"]) + case["new_tokens"], enforce_eager=True, seed=0,
              model_impl=case.get("model_impl", "auto"))
    prompt, n = case["prompt"], case["new_tokens"]
    timed(llm, prompt, n)  # warm-up
    first = [timed(llm, prompt, 1) for _ in range(case["repeats"])]
    whole = [timed(llm, prompt, n) for _ in range(case["repeats"])]
    del llm
    gc.collect()
    prefill, total = statistics.median(first), statistics.median(whole)
    return {"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": (n - 1) / (total - prefill),
            "prefill_seconds": prefill, "total_seconds": total}


if __name__ == "__main__":
    main(run)
