"""Run in llama.cpp's environment (.venv-llamacpp; serving/requirements-llamacpp.txt): load each
GGUF file of a cases file with llama-cpp-python, generate greedily from its prompt and score its
reference sequence, and write what llama.cpp produced. Imports nothing of this project.

    .venv-llamacpp/bin/python serving/check_llamacpp.py CASES.json OUT.json

CASES.json: [{"name", "gguf", "prompt": [ids], "sequence": [ids], "new_tokens": n}]; OUT.json: per
case the greedy tokens and the per-token NLL of `sequence` (positions 1..), or the error.
"""

import time

import numpy as np
from cases import main  # serving/cases.py, beside this script
from llama_cpp import GGML_TYPE_F32, Llama


def nll_of(llm: Llama, sequence: list[int]) -> list[float]:
    llm.reset()
    llm.eval(sequence)
    logits = np.asarray(llm.scores[: len(sequence)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return [float(-logp[i - 1, t]) for i, t in enumerate(sequence) if i > 0]


def greedy(llm: Llama, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def run(case: dict) -> dict:
    start = time.perf_counter()
    # a float32 KV cache (llama.cpp's default is f16, which alone moves the NLL by about 2e-4 here)
    llm = Llama(model_path=case["gguf"], n_ctx=128, logits_all=True, verbose=False, seed=0, n_threads=2,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    loaded = time.perf_counter() - start
    return {"tokens": greedy(llm, case["prompt"], case["new_tokens"]), "nll": nll_of(llm, case["sequence"]),
            "load_seconds": loaded}


if __name__ == "__main__":
    main(run)
