"""Does recovery overfit its calibration set? In-sample against held-out fidelity to the dense model.

    python scripts/recovery_holdout.py --model smollm2-135m --n-samples 64 256 --sparsity 0.2

Prunes the model with `ours`, with and without recovery, on `n` calibration windows (C4,
seed 0) and measures, on those same windows and on held-out C4 and PTB windows,
the mean KL divergence of the pruned model's next-token distribution from the dense
model's. A remedy that lowers the in-sample KL but raises the held-out one is fitting the
calibration set rather than the model. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from harness import metrics
from harness.data import calibration
from harness.models import loading
from harness.prune import PruneSettings, prune


@torch.no_grad()
def mean_kl(dense, pruned, ids: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    for chunk in ids.split(batch):
        p = F.log_softmax(dense(input_ids=chunk).logits.float(), -1)
        q = F.log_softmax(pruned(input_ids=chunk).logits.float(), -1)
        total += F.kl_div(q, p, log_target=True, reduction="sum").item()
        count += chunk.numel()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-samples", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--held-out", type=int, default=32, help="held-out windows per dataset")
    a = ap.parse_args()
    conf = os.path.join(os.path.dirname(loading.__file__), "..", "conf", "model", f"{a.model}.yaml")
    cfg = OmegaConf.load(conf)
    dense, tok = loading.load(cfg, torch.device("cpu"), torch.float32)
    data_dir = os.environ.get("HARNESS_DATA_DIR")
    held = {"c4 held-out": calibration.batches(tok, "c4", a.held_out, cfg.seqlen, seed=1, data_dir=data_dir),
            "ptb held-out": calibration.batches(tok, "ptb", a.held_out, cfg.seqlen, seed=1, data_dir=data_dir)}
    print(f"| n_samples | remedy | in-sample KL | {' | '.join(f'{k} KL' for k in held)} |")
    print("| ---: | --- | ---: |" + " ---: |" * len(held))
    for n in a.n_samples:
        ids = calibration.batches(tok, "c4", n, cfg.seqlen, seed=0, data_dir=data_dir)
        for remedy in ("none", "recovery"):
            pruned = copy.deepcopy(dense)
            prune(pruned, ids, metrics.build("ours"), PruneSettings(sparsity=a.sparsity, remedy=remedy))
            cells = [mean_kl(dense, pruned, ids[: a.held_out])] + [mean_kl(dense, pruned, h) for h in held.values()]
            print(f"| {n} | {remedy} | " + " | ".join(f"{c:.4f}" for c in cells) + " |", flush=True)
            del pruned


if __name__ == "__main__":
    main()
