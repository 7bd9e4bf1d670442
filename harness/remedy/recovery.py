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
import math
import warnings

import torch

from harness.models.base import weight
from harness.prune.observe import module_input
from harness.prune.settings import SettingsError
from harness.remedy import Remedy, register

log = logging.getLogger(__name__)


class CrossMoments:
    """Running `gram` = X_hat^T X_hat and `cross` = X_hat^T X over tokens (X_hat: this module's
    input in the model pruned so far, X: the dense model's), optionally augmented by a 1 column."""

    def __init__(self, width: int, augment: bool, dtype: torch.dtype, device: torch.device):
        n = width + int(augment)
        self.augment = augment
        self.gram = torch.zeros(n, n, dtype=dtype, device=device)
        self.cross = torch.zeros(n, n, dtype=dtype, device=device)

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        x = x.float() if x.element_size() < 4 else x  # products of one chunk in float32 at least
        if self.augment:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        return x

    def update(self, current: torch.Tensor, dense: torch.Tensor) -> None:
        current, dense = self._augmented(current), self._augmented(dense)
        self.gram += (current.T @ current).to(self.gram.dtype)
        self.cross += (current.T @ dense).to(self.cross.dtype)


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
    width = moments.gram.shape[0] - int(moments.augment)
    for module in modules:
        w = weight(module).to(moments.gram.dtype)  # [out, in]
        has_bias = module.bias is not None and moments.augment
        if has_bias:
            w_aug = torch.cat([w, module.bias.detach().to(w.dtype)[:, None]], 1)  # [out, in+1]
            sol = ridge_solve(moments.gram, moments.cross @ w_aug.T, damp, where, prior=w_aug.T if toward == "weights" else None)
        else:
            sol = ridge_solve(moments.gram[:width, :width], moments.cross[:width, :width] @ w.T, damp, where,
                              prior=w.T if toward == "weights" else None)
        fitted.append(sol is not None)
        if sol is None:
            continue
        with torch.no_grad():
            weight(module).copy_(sol[:width].T.to(module.weight.dtype))
            if has_bias:
                module.bias.copy_(sol[width].to(module.bias.dtype))
    return fitted


@register("recovery")
class Recovery(Remedy):
    dense_reference = True
    params = ("damp", "toward")

    def __init__(self, settings):
        super().__init__(settings)
        self.fits, self.fell_back = 0, []

    @classmethod
    def check(cls, settings) -> None:
        damp = settings.damp
        if isinstance(damp, bool) or not isinstance(damp, int | float) or not math.isfinite(damp) or damp <= 0:
            raise SettingsError(f"remedy.damp={damp!r}; accepted: a finite number > 0 (lambda = damp * mean diag X^T X)")
        if settings.ridge_toward not in TOWARD:
            raise SettingsError(f"remedy.toward={settings.ridge_toward!r} is not accepted; accepted: {', '.join(TOWARD)}")

    def before_scoring(self, block, dense, view, dense_view, stream, dense_stream, where, dtype, device) -> None:
        """Each level, in forward order, re-fitted to what the dense block's level computes on the dense stream."""
        for level in (1, 2):
            modules = view.level1 if level == 1 else [view.level2]
            probe, dense_probe = (view.module_input, dense_view.module_input) if level == 1 else (view.level2, dense_view.level2)
            moments = None
            for chunk, dense_chunk in zip(stream, dense_stream, strict=True):
                x, x_dense = module_input(block, probe, chunk), module_input(dense, dense_probe, dense_chunk)
                if moments is None:
                    moments = CrossMoments(x.shape[-1], any(m.bias is not None for m in modules), dtype, device)
                moments.update(x, x_dense)
            at = f"{where} level {level}"
            fitted = refit(modules, moments, self.settings.damp, at, self.settings.ridge_toward)
            self.fits += sum(fitted)
            self.fell_back += [f"{at} module {i}" for i, ok in enumerate(fitted) if not ok]

    def finish(self) -> dict:
        if self.fell_back and not self.fits:
            raise RuntimeError(f"remedy=recovery: every one of the {len(self.fell_back)} fits fell back to the "
                               f"unchanged weights (X^T X singular at every level; remedy.damp={self.settings.damp}); "
                               "this would be a no-remedy run recorded as recovery")
        return {"fits": self.fits, "fell_back": self.fell_back}
