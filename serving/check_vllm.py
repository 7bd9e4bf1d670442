"""Run in vLLM's own environment (.venv-vllm; serving/requirements-vllm.txt): load each exported
folder of a cases file with vLLM, generate greedily from its prompt and score its reference
sequence, and write what vLLM produced. Imports neither harness nor anything of this project.

    .venv-vllm/bin/python serving/check_vllm.py CASES.json OUT.json

CASES.json: [{"name", "folder", "remote", "model_impl", "prompt": [ids], "sequence": [ids], "new_tokens": n}];
OUT.json: per case the greedy tokens and the per-token NLL of `sequence` (positions 1..), or the
error vLLM raised.
"""

import gc
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its errors reach us whole

from cases import main  # serving/cases.py, beside this script  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402


def run(case: dict) -> dict:
    start = time.perf_counter()
    llm = LLM(model=case["folder"], dtype="float32", trust_remote_code=case["remote"], max_model_len=128,
              model_impl=case.get("model_impl", "auto"), enforce_eager=True, seed=0)
    loaded = time.perf_counter() - start
    greedy = SamplingParams(temperature=0.0, max_tokens=case["new_tokens"], ignore_eos=True)
    tokens = llm.generate([TokensPrompt(prompt_token_ids=case["prompt"])], greedy, use_tqdm=False)[0].outputs[0].token_ids
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=case["sequence"])], scoring, use_tqdm=False)[0]
    nll = [-step[token].logprob for token, step in zip(case["sequence"][1:], out.prompt_logprobs[1:], strict=True)]
    del llm
    gc.collect()
    return {"tokens": list(tokens), "nll": nll, "load_seconds": loaded}


if __name__ == "__main__":
    main(run)
