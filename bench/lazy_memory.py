"""Peak host memory of lazy pruning (`make bench`): JSON + Markdown in results/bench/.

    python -m bench.lazy_memory            # a 6.2 GiB LLaMA-shaped random checkpoint (a few minutes)
    python -m bench.lazy_memory --smoke    # a tiny one (seconds; the test suite runs it)

The checkpoint is written block by block as safetensors shards (the whole model is never in
memory, here either), then pruned by `ours` through harness.models.lazy in a fresh process
whose resident set size is sampled every 2 ms. The bound it is held to:
    peak RSS <= baseline + max(weights outside the blocks, 2 blocks + calibration activations) + slack
with `baseline` the process before it reads any weight (interpreter, torch, transformers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.run import PeakMemory, cli, gib, report

FULL = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 30, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000}
SMOKE = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 3, "num_attention_heads": 2,
         "num_key_value_heads": 2, "vocab_size": 512}


def write_checkpoint(folder: Path, shape: dict) -> dict:
    """A random LLaMA-shaped float32 checkpoint, one shard per block; returns byte counts."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False)
    config.save_pretrained(folder)
    weight_map, sizes = {}, {"block": 0, "outside": 0, "head": 0}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> int:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
        return sum(t.numel() * t.element_size() for t in tensors.values())

    for k in range(config.num_hidden_layers):
        with torch.no_grad():
            block = LlamaDecoderLayer(config, k)
        sizes["block"] = shard(f"block-{k:03d}.safetensors", {f"model.layers.{k}.{n}": t for n, t in block.state_dict().items()})
        del block
    d, v = config.hidden_size, config.vocab_size
    sizes["outside"] = shard("outside.safetensors", {"model.embed_tokens.weight": torch.randn(v, d) * 0.02,
                                                      "model.norm.weight": torch.ones(d)})
    sizes["head"] = shard("head.safetensors", {"lm_head.weight": torch.randn(v, d) * 0.02})
    total = sizes["block"] * config.num_hidden_layers + sizes["outside"] + sizes["head"]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return {**sizes, "checkpoint": total}


def child(folder: str, out: str, n: str, seqlen: str) -> None:
    """In a fresh process (`run` starts it): prune the checkpoint lazily; print the RSS before
    any weight is read and the peak while pruning (bench.run.PeakMemory), as JSON."""
    from harness import metrics
    from harness.models.lazy import LazyCheckpoint
    from harness.prune import PruneSettings, prune

    with PeakMemory(torch.device("cpu")) as mem:
        store = LazyCheckpoint(folder)
        model = store.skeleton()
        ids = torch.randint(0, model.config.vocab_size, (int(n), int(seqlen)), generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        report = prune(model, ids, metrics.build("ours"), PruneSettings(sparsity=0.2, sparsity_mode="module"),
                       store=store, out=Path(out))
        seconds = time.perf_counter() - start
    print(json.dumps({"baseline_rss": mem.base, "peak_rss": mem.base + mem.peak, "seconds": seconds,
                      "params_before": report.params_before, "params_after": report.params_after}))


def run(smoke: bool, out: Path) -> dict:
    shape = SMOKE if smoke else FULL
    n, seqlen = (4, 32) if smoke else (16, 128)
    with tempfile.TemporaryDirectory() as tmp:
        folder, pruned = Path(tmp) / "dense", Path(tmp) / "pruned"
        folder.mkdir()
        t0 = time.perf_counter()
        sizes = write_checkpoint(folder, shape)
        written = time.perf_counter() - t0
        script = "import sys; from bench.lazy_memory import child; child(*sys.argv[1:])"
        done = subprocess.run([sys.executable, "-c", script, str(folder), str(pruned), str(n), str(seqlen)],
                              capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
    activations = n * seqlen * shape["hidden_size"] * 4  # the float32 stream entering a block
    # Inside a block: the stream in and out, the attention probabilities of one chunk (8
    # sequences), the replayed level-2 inputs/outputs and the MLP's widest activations.
    chunk = min(8, n) * seqlen
    in_block = (3 * activations + 2 * n * seqlen * shape["intermediate_size"] * 4
                + chunk * seqlen * shape["num_attention_heads"] * 4 * 2)
    bound = measured["baseline_rss"] + max(sizes["outside"], 2 * sizes["block"] + in_block) + 2**28
    result = {"shape": shape, "calibration": {"n_samples": n, "seqlen": seqlen}, "bytes": sizes,
              "checkpoint_write_seconds": written, **measured, "activations_bytes": activations,
              "in_block_bytes": in_block, "bound_rss": bound, "within_bound": measured["peak_rss"] <= bound,
              "issue_bound_rss": 2 * sizes["block"] + activations + 2**30}
    return report(out, "lazy_memory", result, markdown)


def markdown(r: dict) -> str:
    b = r["bytes"]
    return "\n".join([
        f"# Lazy pruning: peak host memory (`ours`, {r['calibration']['n_samples']} x {r['calibration']['seqlen']} calibration)", "",
        f"LLaMA-shaped random float32 checkpoint: {r['shape']['num_hidden_layers']} blocks, d {r['shape']['hidden_size']}, "
        f"f {r['shape']['intermediate_size']}, vocab {r['shape']['vocab_size']}; {gib(b['checkpoint'])} GiB on disk.", "",
        "| quantity | GiB |", "| --- | ---: |",
        f"| checkpoint on disk | {gib(b['checkpoint'])} |",
        f"| one block | {gib(b['block'])} |",
        f"| weights outside the blocks read for the capture (embeddings, norm) | {gib(b['outside'])} |",
        f"| calibration stream (float32) | {gib(r['activations_bytes'])} |",
        f"| process before reading weights (baseline RSS) | {gib(r['baseline_rss'])} |",
        f"| **peak RSS while pruning** | **{gib(r['peak_rss'])}** |",
        f"| bound: baseline + max(outside, 2 blocks + in-block activations) + 0.25 | {gib(r['bound_rss'])} |",
        f"| the issue's bound: 2 blocks + calibration activations + 1 | {gib(r['issue_bound_rss'])} |", "",
        f"Within the bound: {r['within_bound']}; within the issue's bound: {r['peak_rss'] <= r['issue_bound_rss']}. "
        f"Pruning took {r['seconds']:.0f} s ({r['params_before']:,} -> {r['params_after']:,} parameters); "
        f"writing the checkpoint {r['checkpoint_write_seconds']:.0f} s.", ""])


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__, run, "lazy_memory.md")


if __name__ == "__main__":
    main()
