"""ReplaceMe (mts-ai/ReplaceMe; METHOD.md section 11): a removed run of blocks [s, e) replaced by a
linear map T folded into block s-1's down projection.

Block s-1 ends with x_s = a + M (a: the residual after its attention, M: its MLP's output). T is
fitted so that a + M T ~ x_e on the calibration tokens: X = M, Y = x_e - a = x_e - x_s + M,
T = (X^T X + lambda I)^{-1} X^T Y, by the recovery remedy's ridge solve (float64 Gram; lambda =
remedy.damp x mean diag, the reference's alpha = 0 with remedy.damp=0). Folded: the down
projection W (torch layout [out, in], M = h W^T + b) becomes T^T W and its bias T^T b, so the
saved model is a stock model with e - s fewer blocks. Exact only where M enters the residual
directly: an architecture with a norm after its MLP (Gemma-3) is refused.
"""

from __future__ import annotations

import torch

from harness.blocks.hooks import hooks
from harness.blocks.stats import Gram
from harness.checks import ConfigError
from harness.models.base import set_weight, weight
from harness.remedy.recovery import ridge_solve

NORM_AFTER_MLP = ("gemma3_text",)


def contiguous(removed: list[int]) -> tuple[int, int]:
    run = sorted(removed)
    if run != list(range(run[0], run[-1] + 1)) or run[0] == 0:
        raise ConfigError(f"remedy=replaceme replaces one run of blocks after block 0; the method chose {run}; "
                          "accepted: metric=angular (or last)")
    return run[0], run[-1] + 1


@torch.no_grad()
def replace_run(adapter, cal, removed: list[int], damp: float) -> dict:
    """Fit T on the dense model's calibration stream and fold it into block s-1; what the record keeps."""
    model_type = cal.model.config.model_type
    if model_type in NORM_AFTER_MLP:
        raise ConfigError(f"remedy=replaceme folds its map into the MLP's down projection, exact only where the MLP "
                          f"output enters the residual directly; {model_type} normalises it first; accepted: "
                          "remedy=none for this model")
    s, e = contiguous(removed)
    hidden = cal.first
    for k in range(s - 1):
        hidden = cal.run_block(k, hidden)
    down = adapter.mlp(cal.blocks[s - 1]).level2
    outputs: list[torch.Tensor] = []
    with hooks([down.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))]):
        x_s = cal.run_block(s - 1, hidden)
    x_e = x_s
    for k in range(s, e):
        x_e = cal.run_block(k, x_e)
    width = x_s[0].shape[-1]
    gram, cross = Gram(width, torch.float64, x_s[0].device), torch.zeros(width, width, dtype=torch.float64)
    for m, xs, xe in zip(outputs, x_s, x_e, strict=True):
        m, y = m.reshape(-1, width).double(), (xe - xs + m).reshape(-1, width).double()
        gram.add(m)
        cross += m.T @ y
    t = ridge_solve(gram.matrix, cross, damp, f"replaceme run [{s}, {e})")
    if t is None:
        raise FloatingPointError(f"replaceme: M^T M of block {s - 1} is singular even with damping; no map fitted")
    w = weight(down).double()
    set_weight(down, t.T @ w)
    if down.bias is not None:
        down.bias.copy_((t.T @ down.bias.double()).to(down.bias.dtype))
    # How much of what the run did the map reproduces: ||a + M T - x_e||^2 over ||x_s - x_e||^2 (the
    # error of dropping the run with no map; 1 = no better than plain removal)
    residual = sum(float((xs.double() - m.double() + m.double() @ t.to(m.device) - xe.double()).pow(2).sum())
                   for m, xs, xe in zip(outputs, x_s, x_e, strict=True))
    dropped = sum(float((xe - xs).double().pow(2).sum()) for xs, xe in zip(x_s, x_e, strict=True))
    return {"run": [s, e], "tokens": gram.tokens, "damp": damp,
            "relative_error": residual / dropped if dropped > 0 else None}
