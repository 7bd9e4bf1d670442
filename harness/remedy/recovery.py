"""Pre-pruning recovery (paper Algorithms 2-4; METHOD.md section 5).

Before module m is scored and cut, its input X_hat differs from the dense model's input X
because earlier modules were pruned. Each level is re-fitted to the dense outputs by ridge
regression, keeping only X_hat^T X_hat and X_hat^T X (the dense targets are X W, so
X_hat^T Y = (X_hat^T X) W):

    W_bar = (X_hat^T X_hat + lambda I)^{-1} (X_hat^T X) W,    lambda = damp * mean(diag(X_hat^T X_hat))

(ridge toward zero, METHOD.md; the default). `toward="weights"` pulls toward the current
weights instead, argmin ||X_hat W' - X W||^2 + lambda ||W' - W||^2, which is exactly the
identity when X_hat = X. Neither made recovery help on smollm2-135m (README).
With a bias the inputs are augmented by a constant 1 (the intercept is solved with W).
"""

from __future__ import annotations

import logging
import warnings

import torch

from harness.models.base import weight

log = logging.getLogger(__name__)


class CrossMoments:
    """Running X_hat^T X_hat and X_hat^T X over tokens, optionally augmented by a 1 column."""

    def __init__(self, width: int, augment: bool, dtype: torch.dtype, device: torch.device):
        n = width + int(augment)
        self.augment = augment
        self.hh = torch.zeros(n, n, dtype=dtype, device=device)
        self.hd = torch.zeros(n, n, dtype=dtype, device=device)

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        x = x.float() if x.element_size() < 4 else x  # products of one chunk in float32 at least
        if self.augment:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        return x

    def update(self, current: torch.Tensor, dense: torch.Tensor) -> None:
        h, d = self._aug(current), self._aug(dense)
        self.hh += (h.T @ h).to(self.hh.dtype)
        self.hd += (h.T @ d).to(self.hd.dtype)


def ridge_solve(xtx: torch.Tensor, rhs: torch.Tensor, damp: float, where: str,
                prior: torch.Tensor | None = None) -> torch.Tensor | None:
    """(X^T X + lambda I)^{-1} (rhs + lambda prior) by Cholesky; lambda grows x10 on failure (3 tries).
    Returns None (the caller keeps the original weights) if every try fails."""
    scale = xtx.diagonal().mean()
    if not torch.isfinite(xtx).all() or scale <= 0:
        warnings.warn(f"recovery at {where}: X^T X is singular (zero or non-finite); weights left unchanged", stacklevel=2)
        return None
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    lam = damp
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(xtx + lam * scale * eye)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs if prior is None else rhs + lam * scale * prior, chol)
            if torch.isfinite(sol).all():
                if attempt:
                    warnings.warn(f"recovery at {where}: X^T X ill-conditioned, solved with damping {lam:g}", stacklevel=2)
                return sol
        lam *= 10
    warnings.warn(f"recovery at {where}: X^T X is singular even with damping {lam / 10:g}; weights left unchanged", stacklevel=2)
    return None


TOWARD = ("zero", "weights")


def refit(modules: list[torch.nn.Module], moments: CrossMoments, damp: float, where: str, toward: str = "zero") -> list[bool]:
    """Re-fit every module reading the same input to reproduce its dense outputs; per module,
    whether it was re-fitted (False: the solve fell back and its weights are unchanged)."""
    fitted = []
    width = moments.hh.shape[0] - int(moments.augment)
    for module in modules:
        w = weight(module).to(moments.hh.dtype)  # [out, in]
        has_bias = module.bias is not None and moments.augment
        if has_bias:
            w_aug = torch.cat([w, module.bias.detach().to(w.dtype)[:, None]], 1)  # [out, in+1]
            sol = ridge_solve(moments.hh, moments.hd @ w_aug.T, damp, where, prior=w_aug.T if toward == "weights" else None)
        else:
            sol = ridge_solve(moments.hh[:width, :width], moments.hd[:width, :width] @ w.T, damp, where,
                              prior=w.T if toward == "weights" else None)
        fitted.append(sol is not None)
        if sol is None:
            continue
        with torch.no_grad():
            weight(module).copy_(sol[:width].T.to(module.weight.dtype))
            if has_bias:
                module.bias.copy_(sol[width].to(module.bias.dtype))
    return fitted
