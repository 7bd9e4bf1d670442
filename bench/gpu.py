"""The prepared GPU check (`make bench-gpu`; on the lent machine `python3 -m bench.gpu --out DIR`).

One call, sized for at most 8 minutes on one H100 or H200, with only what that machine's image
holds (torch, transformers, safetensors, tqdm; checked under its torch 2.11 and transformers
5.17): the pruning path imports neither Hydra, OmegaConf, lm-eval nor wandb, so no wheel has
to travel and no GGUF model either. In this order:

  1. CPU-vs-GPU parity on the zoo's tiny-llama in float32: the same removed units for ours,
     flap, wanda and taylor on both devices.
  2. A random LLaMA-7B-shaped model (32 blocks, d 4096, f 11008, 32 heads, bfloat16) pruned
     to 20% by ours, ours+recovery, flap, wanda and taylor on the paper's 128 x 128
     calibration, resident on the GPU: seconds per block and in total, peak GPU memory
     (taylor keeps one float32 gradient moment per prunable weight: about 40 GB in all).
  3. The same model kept on the CPU, each block visiting the GPU in turn (`ours`): the
     block-wise peak GPU memory (target: under 16 GB) and its time.
Both gpu.json and gpu.md are rewritten after every case (results/bench/ by default), so a call
cut off by its time limit still brings back what ran; a case that fails (out of memory, say)
is recorded with its error, the rest still run, and the exit status is then 1. `--smoke`
shrinks every size so that the test suite runs the whole script on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from harness import metrics
from harness.prune import PruneSettings, prune

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
SMOKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=256, max_position_embeddings=128)
METHODS = [("ours", "none"), ("ours", "recovery"), ("flap", "none"), ("wanda", "none"), ("taylor", "none")]
PARITY = ["ours", "flap", "wanda", "taylor"]
ZOO = Path(__file__).resolve().parent.parent / "harness" / "zoo_weights" / "tiny-llama"


def random_llama(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs, in its dtype (no float32 copy of 7B)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    return model.eval()


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_prune(model, ids: torch.Tensor, metric: str, remedy: str, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    report = prune(model, ids, metrics.build(metric), PruneSettings(sparsity=0.2, remedy=remedy), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    blocks = len(report.per_layer)
    return {"metric": metric, "remedy": remedy, "seconds": seconds, "seconds_per_block": seconds / blocks,
            "stage_seconds": report.stage_seconds, "peak_gpu_gb": _peak_gb(device),
            "sparsity_achieved": report.sparsity_achieved, "removed": report.removed}


def attempt(run, label: str, device: torch.device) -> dict:
    """One case; a failure (out of GPU memory, say) is recorded and the check goes on, so one
    call on a lent machine still reports every other case."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - every case's failure is data for the report
        print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def resident(shape: dict, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Iterator[dict]:
    for metric, remedy in METHODS:
        def case(metric=metric, remedy=remedy):
            model = random_llama(shape, device, dtype)
            row = timed_prune(model, ids, metric, remedy, device)
            print(f"resident  {metric:7s} {remedy:9s} {row['seconds']:7.1f} s  peak {row['peak_gpu_gb']} GB", flush=True)
            return {k: v for k, v in row.items() if k != "removed"}

        yield {"metric": metric, "remedy": remedy, "placement": "resident"} | attempt(case, f"resident {metric} {remedy}", device)


def blockwise(shape: dict, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict:
    """The model stays on the CPU; each block visits `device` (built on the device, then moved: faster)."""
    def case():
        model = random_llama(shape, device, dtype).to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = timed_prune(model, ids, "ours", "none", device)
        assert all(p.device.type == "cpu" for p in model.parameters())
        print(f"blockwise ours    none      {row['seconds']:7.1f} s  peak {row['peak_gpu_gb']} GB", flush=True)
        return {k: v for k, v in row.items() if k != "removed"}

    return {"metric": "ours", "remedy": "none", "placement": "blockwise"} | attempt(case, "blockwise ours", device)


def parity(device: torch.device, n: int = 32, seqlen: int = 128) -> Iterator[dict]:
    """The same removed units on the CPU and on `device`, float32, the zoo's tiny-llama."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 4096, (n, seqlen), generator=torch.Generator().manual_seed(0))
    for metric in PARITY:
        def case(metric=metric):
            removed = []
            for where in (torch.device("cpu"), device):
                model = AutoModelForCausalLM.from_pretrained(ZOO, dtype=torch.float32).to(where).eval()
                removed.append(timed_prune(model, ids, metric, "none", where)["removed"])
            cpu, gpu = removed
            differing = [f"{layer}/{kind}" for (layer, kind), units in cpu.items() if units != gpu.get((layer, kind))]
            print(f"parity    {metric:7s} same removed units: {cpu == gpu} {differing or ''}", flush=True)
            return {"same_removed_units": cpu == gpu, "differing_modules": differing}

        yield {"metric": metric} | attempt(case, f"parity {metric}", device)


def _cell(row: dict, key: str, fmt: str) -> str:
    return "-" if row.get(key) is None else format(row[key], fmt)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(result: dict) -> list[str]:
    """Issue 20's GPU targets, and the two time ratios it sets on the CPU (ours against flap,
    recovery against none) at 7B scale, read off the rows measured (absent rows: not measured)."""
    seconds = {(r["metric"], r["remedy"]): r["seconds"] for r in result.get("resident", []) if "seconds" in r}
    ours, block = seconds.get(("ours", "none")), result.get("blockwise", {})
    lines = []
    if ours is not None:
        lines.append(f"- ours, resident, whole model: {ours:.1f} s (target < 180 s: {_met(ours < 180)})")
    if block.get("peak_gpu_gb") is not None:
        lines.append(f"- ours, block-wise, peak GPU memory: {block['peak_gpu_gb']:.1f} GB (target < 16 GB: "
                     f"{_met(block['peak_gpu_gb'] < 16)})")
    for other, label, bound in ((("flap", "none"), "ours / flap", 1.2), (("ours", "recovery"), "ours+recovery / ours", 2)):
        if ours is not None and other in seconds:
            ratio = ours / seconds[other] if other[0] == "flap" else seconds[other] / ours
            lines.append(f"- {label}, resident: {ratio:.2f} (set on the CPU: <= {bound:g}, {_met(ratio <= bound)})")
    return lines


def markdown(result: dict) -> str:
    lines = [f"# GPU check ({result['device_name']}, {result['date']})", "",
             f"Model: random LLaMA-7B shape {result['shape']}, {result['dtype']}; calibration "
             f"{result['calibration']}; sparsity 0.2. torch {result['torch']}, transformers {result['transformers']}.",
             f"Stages finished: {', '.join(result['finished']) or 'none'} ({result['seconds']:.0f} s).",
             "", "| placement | metric | remedy | total s | s / block | peak GPU GB | error |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for row in [*result.get("resident", []), *([result["blockwise"]] if "blockwise" in result else [])]:
        lines.append(f"| {row['placement']} | {row['metric']} | {row['remedy']} | {_cell(row, 'seconds', '.1f')} | "
                     f"{_cell(row, 'seconds_per_block', '.2f')} | {_cell(row, 'peak_gpu_gb', '.1f')} | "
                     f"{row.get('error', '-')} |")
    lines += ["", "CPU vs GPU (zoo tiny-llama, float32): same removed units", "",
              "| metric | same | differing modules | error |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['metric']} | {r.get('same_removed_units', '-')} | {', '.join(r.get('differing_modules', [])) or '-'} "
              f"| {r.get('error', '-')} |" for r in result.get("parity", [])]
    return "\n".join([*lines, "", "Targets:", "", *(targets(result) or ["- none measured"])]) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (the test suite)")
    a = ap.parse_args(argv)
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.smoke:
        raise SystemExit("no CUDA device: the GPU check needs one (--smoke runs tiny sizes on the CPU)")
    shape, n, seqlen = (SMOKE, 8, 32) if a.smoke else (LLAMA_7B, 128, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = torch.randint(0, shape["vocab_size"], (n, seqlen), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d"), "smoke": a.smoke, "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "shape": shape,
              "dtype": str(dtype).removeprefix("torch."), "calibration": f"{n} x {seqlen} random tokens",
              "finished": [], "resident": [], "parity": []}
    a.out.mkdir(parents=True, exist_ok=True)

    def save(stage: str | None = None) -> None:
        """Both files after every case: a call cut off by its time limit still reports what ran."""
        result["finished"] += [stage] if stage else []
        result["seconds"] = time.perf_counter() - start
        (a.out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        (a.out / "gpu.md").write_text(markdown(result))

    # Cheapest and most telling first: parity (correctness), then the two targets' cases.
    # On a CPU (--smoke) parity compares the CPU with itself: the code path only.
    for row in parity(device, *((4, 32) if a.smoke else (32, 128))):
        result["parity"].append(row)
        save()
    save("parity")
    for row in resident(shape, ids, device, dtype):
        result["resident"].append(row)
        save()
    save("resident")
    result["blockwise"] = blockwise(shape, ids, device, dtype)
    save("blockwise")
    failed = [r for r in [*result["parity"], *result["resident"], result["blockwise"]] if "error" in r]
    print(f"wrote {a.out / 'gpu.json'} and {a.out / 'gpu.md'} in {result['seconds']:.0f} s; {len(failed)} case(s) failed")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
