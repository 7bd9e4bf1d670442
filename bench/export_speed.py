"""Measured speed-up of exported pruned models (`make bench`): JSON + Markdown in results/bench/.

    python -m bench.export_speed            # smollm2-135m dense, 20% and 50% (a few minutes on 2 CPU cores)
    python -m bench.export_speed --smoke    # a tiny random LLaMA (seconds; the test suite runs it)

Each model is pruned with `ours` (uniform allocation, 16 random calibration sequences; the
speed does not depend on which units go), exported as a transformers folder and loaded by
plain transformers in a separate process (bench/plain_speed.py), next to the dense folder:
forward tokens/s at batch 1 and 8 and prompt-then-generate latency.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.run import calibration_ids, cli, llama_shaped, named_model, report
from harness import metrics
from harness.models.export import export
from harness.prune import PruneSettings, prune

SPARSITIES = (0.2, 0.5)


def run(smoke: bool, out: Path) -> dict:
    import copy

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    label = "llama-shaped h256 x4" if smoke else "smollm2-135m"
    dense = llama_shaped(256, 4) if smoke else named_model("smollm2-135m")
    seqlen, new_tokens = (32, 8) if smoke else (128, 64)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    ids = calibration_ids(dense.config.vocab_size, 4 if smoke else 16, seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {0.0: Path(tmp) / "dense"}
        dense.save_pretrained(folders[0.0])
        routes = {0.0: "dense"}
        for sparsity in SPARSITIES:
            model = copy.deepcopy(dense)
            prune(model, ids, metrics.build("ours"), PruneSettings(sparsity=sparsity))
            folders[sparsity] = export(model, tok, Path(tmp) / f"pruned-{sparsity:g}")
            routes[sparsity] = json.loads((folders[sparsity] / "config.json").read_text())["harness_pruning"]["route"]
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("plain_speed.py")),
                            *map(str, folders.values()), "--seqlen", str(seqlen),
                            "--new-tokens", str(new_tokens)], capture_output=True, text=True,
                           cwd=tmp, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"plain_speed.py failed (or imported harness):\n{r.stderr[-3000:]}")
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    for row, sparsity in zip(rows, folders, strict=True):
        row.update(model=label, sparsity=sparsity, route=routes[sparsity], folder=Path(row["folder"]).name)
        for key in ("forward_tokens_per_s_batch1", "forward_tokens_per_s_batch8"):
            row[key.replace("tokens_per_s", "speedup")] = row[key] / rows[0][key]
        row["generate_speedup"] = rows[0]["generate_seconds"] / row["generate_seconds"]
    result = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
              "seqlen": seqlen, "new_tokens": new_tokens, "rows": rows}
    return report(out, "export_speed", result, markdown)


def markdown(r: dict) -> str:
    lines = [f"# Exported models in plain transformers ({r['device']}, {r['torch_threads']} threads, seqlen {r['seqlen']})",
             "", "| model | sparsity | loads as | params | forward tokens/s (batch 1) | speed-up | forward tokens/s (batch 8) "
             f"| speed-up | 32 + {r['new_tokens']} generate s | speed-up |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["rows"]:
        lines.append(f"| {x['model']} | {x['sparsity']:g} | {x['route']} | {x['params']:,} | "
                     f"{x['forward_tokens_per_s_batch1']:.0f} | {x['forward_speedup_batch1']:.2f} | "
                     f"{x['forward_tokens_per_s_batch8']:.0f} | {x['forward_speedup_batch8']:.2f} | "
                     f"{x['generate_seconds']:.3f} | {x['generate_speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__, run, "export_speed.md")


if __name__ == "__main__":
    main()
