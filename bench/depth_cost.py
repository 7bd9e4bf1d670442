"""What the depth methods cost (`make bench`): JSON + Markdown in results/bench/depth.*.

    python -m bench.depth_cost           # smollm2-135m (30 blocks), 32 C4-length windows of 128, 7 blocks (a few minutes)
    python -m bench.depth_cost --smoke   # tiny-llama (seconds; the test suite runs it)

Each method removes the same number of blocks (BlockPruner: the same number of sub-blocks); per
method: wall seconds and block forwards over the calibration set, in whole-model forwards
(`full_forwards` in the record). The greedy searches are the costly ones: the references re-run
the whole model for every candidate of every step, sum_i (L - i - 2) full forwards for SLEB's k
steps and sum_i (2L - i) for BlockPruner's; here each step runs the model once caching every
block's input and each candidate runs only the blocks from its own on. The ratio of the two
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
    for method in ("last", "random", "shortgpt", "angular", "sleb", "blockpruner"):
        pruned = named_model(name)
        start = time.perf_counter()
        report_ = depth.prune_depth(pruned, ids, depth.build(method), PruneSettings(sparsity_type="depth", blocks=blocks,
                                                                                   sparsity=0.2))
        rows.append({"method": method, "seconds": time.perf_counter() - start, "full_forwards": report_.full_forwards,
                     "removed": [f"{k}.{part}" for k, part in report_.sub_blocks] or report_.removed})
    # the references' candidates, whole model each, plus the dense pass
    reference = {"sleb": sum(layers - i - 2 for i in range(blocks)) + 1,
                 "blockpruner": sum(2 * layers - i for i in range(blocks)) + 1}
    result = {"model": name, "blocks": layers, "removed": blocks, "calibration": [n_samples, 128], "methods": rows,
              "reference_full_forwards": reference, "smoke": smoke, "torch_threads": torch.get_num_threads()}
    return report(out, "depth", result, markdown)


def markdown(r: dict) -> str:
    measured = {m["method"]: m["full_forwards"] for m in r["methods"]}
    return "\n".join([
        "# What the depth methods cost", "",
        f"{r['model']} ({r['blocks']} blocks), {r['removed']} blocks removed, calibration {r['calibration'][0]} x "
        f"{r['calibration'][1]} tokens, {r['torch_threads']} threads.", "",
        "| method | seconds | whole-model forwards | per removed block | blocks removed |",
        "| --- | ---: | ---: | ---: | --- |",
        *(f"| {m['method']} | {m['seconds']:.2f} | {m['full_forwards']:.1f} | {m['full_forwards'] / r['removed']:.1f} | "
          f"{m['removed']} |" for m in r["methods"]), "",
        *(f"{name} as the reference runs it would take {count} whole-model forwards; the cached search took "
          f"{measured[name]:.1f} ({measured[name] / count:.2f} of them)." for name, count in
          r["reference_full_forwards"].items()), ""])


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__, run, "depth.md")


if __name__ == "__main__":
    main()
