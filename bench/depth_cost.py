"""What the depth methods cost (`make bench`): JSON + Markdown in results/bench/depth.*.

    python -m bench.depth_cost           # smollm2-135m (30 blocks), 32 C4-length windows of 128, 7 blocks (a few minutes)
    python -m bench.depth_cost --smoke   # tiny-llama (seconds; the test suite runs it)

Each method removes the same number of blocks; per method: wall seconds and block forwards over
the calibration set, in whole-model forwards (`full_forwards` in the record). SLEB's greedy
search is the costly one: the reference re-runs the whole model for every candidate of every
step, sum_i (L - i - 2) full forwards for k steps; here each step runs the model once caching
every block's input and each candidate runs only the blocks after it. The ratio of the two
counts is the saving, measured in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.run import cli, named_model, report
from harness import depth
from harness.settings import PruneSettings


def run(smoke: bool, out: Path) -> dict:
    name, n_samples, blocks = ("tiny-llama", 8, 2) if smoke else ("smollm2-135m", 32, 7)
    model = named_model(name)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (n_samples, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for method in ("last", "random", "shortgpt", "angular", "sleb"):
        pruned = named_model(name)
        start = time.perf_counter()
        report_ = depth.prune_depth(pruned, ids, depth.build(method), PruneSettings(sparsity_type="depth", blocks=blocks,
                                                                                   sparsity=0.2))
        rows.append({"method": method, "seconds": time.perf_counter() - start, "full_forwards": report_.full_forwards,
                     "removed": report_.removed})
    reference = sum(layers - i - 2 for i in range(blocks)) + 1  # SLEB's candidates, whole model each, plus the dense pass
    result = {"model": name, "blocks": layers, "removed": blocks, "calibration": [n_samples, 128], "methods": rows,
              "sleb_reference_full_forwards": reference, "smoke": smoke, "torch_threads": torch.get_num_threads()}
    return report(out, "depth", result, markdown)


def markdown(r: dict) -> str:
    sleb = next(m for m in r["methods"] if m["method"] == "sleb")
    return "\n".join([
        "# What the depth methods cost", "",
        f"{r['model']} ({r['blocks']} blocks), {r['removed']} blocks removed, calibration {r['calibration'][0]} x "
        f"{r['calibration'][1]} tokens, {r['torch_threads']} threads.", "",
        "| method | seconds | whole-model forwards | per removed block | blocks removed |",
        "| --- | ---: | ---: | ---: | --- |",
        *(f"| {m['method']} | {m['seconds']:.2f} | {m['full_forwards']:.1f} | {m['full_forwards'] / r['removed']:.1f} | "
          f"{m['removed']} |" for m in r["methods"]), "",
        f"SLEB as the reference runs it would take {r['sleb_reference_full_forwards']} whole-model forwards; the cached "
        f"search took {sleb['full_forwards']:.1f} ({sleb['full_forwards'] / r['sleb_reference_full_forwards']:.2f} of "
        "them).", ""])


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__, run, "depth.md")


if __name__ == "__main__":
    main()
