"""Fingerprints of a fixed set of runs (tiny zoo models, both tracks, resident and lazy): each
run's perplexities at full precision, the sha256 of what pruning removed or masked, and of the
per-window NLL sums. Two commits that print the same fingerprints compute bit-identical numbers
(the check behind a refactor: `python scripts/fingerprint.py > before.json`, change, compare).

    HF_HUB_OFFLINE=1 python scripts/fingerprint.py --out fingerprints.json [--only NAME ...]
    python scripts/fingerprint.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from harness.config import compose
from harness.run import run

BASE = ("logger=none", "calibration.n_samples=16", "eval.ppl.max_tokens=8192", "eval.efficiency=null", "resume=false")
RUNS = {
    "llama_ours": ("model=tiny-llama", "metric=ours"),
    "llama_flap": ("model=tiny-llama", "metric=flap", "allocation=adaptive", "remedy=bias"),
    "llama_wanda_recovery": ("model=tiny-llama", "metric=wanda", "remedy=recovery"),
    "llama_taylor": ("model=tiny-llama", "metric=taylor"),
    "gpt2_ours_recovery": ("model=tiny-gpt2", "metric=ours", "remedy=recovery", "prune.attention_unit=query_head"),
    "llama_ours_lazy": ("model=tiny-llama", "metric=ours", "model.lazy=true"),
    "llama_sparsegpt": ("model=tiny-llama", "sparsity_type=unstructured", "sparsity=0.5", "metric=sparsegpt"),
    "llama_wanda_24": ("model=tiny-llama", "sparsity_type=nm", "sparsity=0.5", "metric=wanda"),
    "gpt2_mrp_s": ("model=tiny-gpt2", "sparsity_type=unstructured", "sparsity=0.5", "metric=mrp_s"),
    "llama_magnitude": ("model=tiny-llama", "sparsity_type=unstructured", "sparsity=0.6", "metric=magnitude"),
}


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(overrides: tuple[str, ...], out_dir: str) -> dict:
    record = run(compose(*BASE, *overrides, f"out_dir={out_dir}"))
    pruning = record["pruning"]
    what = [{k: row[k] for k in ("attention_units_removed", "mlp_channels_removed", "sparsity") if k in row}
            for row in pruning["per_layer"]]
    return {"ppl": {d: v["value"] for d, v in record["eval"]["ppl"].items()},
            "windows": {d: digest(v["nll_windows"]) for d, v in record["eval"]["ppl"].items()},
            "pruned": digest(what), "params_after": record["model"]["params_after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these runs only")
    parser.add_argument("--out", type=Path, help="write the fingerprints here (the runs print their summaries)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="compare two fingerprint files: exit 1 naming every run that differs")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        differ = sorted(name for name in before.keys() & after.keys() if before[name] != after[name])
        for name in differ:
            print(f"{name}: {before[name]} -> {after[name]}")
        print(f"{len(before.keys() & after.keys()) - len(differ)} identical, {len(differ)} differ")
        raise SystemExit(1 if differ else 0)
    with tempfile.TemporaryDirectory() as out_dir:
        prints = {name: fingerprint(RUNS[name], out_dir) for name in args.only or RUNS}
    text = json.dumps(prints, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
