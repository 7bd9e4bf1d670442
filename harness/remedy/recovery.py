"""Pre-pruning recovery (paper Algorithms 2-4; METHOD.md section 5).

Before module m is scored and cut, its input X_hat differs from the dense model's input X
because earlier modules were pruned. Each level is re-fitted to the dense outputs by ridge
regression, keeping only X_hat^T X_hat and X_hat^T Y, Y = X W the dense outputs:

    W_bar = (X_hat^T X_hat + lambda I)^{-1} X_hat^T Y,    lambda = damp * mean(diag(X_hat^T X_hat))

Level 1 (q/k/v, gate/up: narrow input, wide outputs) keeps X_hat^T X and forms
X_hat^T Y = (X_hat^T X) W; level 2 (o_proj, down_proj: wide input) accumulates X_hat^T Y
from the dense outputs directly. The modules of a level share one factorisation.

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

from harness.blocks.hooks import module_input
from harness.blocks.stats import Gram, damping
from harness.checks import ConfigError
from harness.models.base import weight
from harness.remedy import FitContext, Remedy, register

log = logging.getLogger(__name__)


class CrossMoments:
    """Running `gram` = X_hat^T X_hat and `cross` = X_hat^T X over tokens (X_hat: this module's
    input in the model pruned so far, X: the dense model's), optionally augmented by a 1 column.
    With `targets` (the level-2 map's output width), the dense side is the dense module's
    *output* Y instead and `cross` is X_hat^T Y, the right-hand side itself: for an MLP's
    down_proj (input f, output d) that is f x d products instead of f x f, and no (f x f) W^T."""

    def __init__(self, width: int, augment: bool, dtype: torch.dtype, device: torch.device, targets: int | None = None):
        n = width + int(augment)
        self.augment, self.targets = augment, targets is not None
        self._gram = Gram(n, dtype, device, exact=False)  # X_hat^T X_hat
        self.cross = torch.zeros(n, targets if self.targets else n, dtype=dtype, device=device)

    @property
    def gram(self) -> torch.Tensor:
        return self._gram.matrix

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        x = x.float() if x.element_size() < 4 else x  # products of one chunk in float32 at least
        if self.augment:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        return x

    def update(self, current: torch.Tensor, dense: torch.Tensor) -> None:
        current = self._augmented(current)
        dense = dense.reshape(-1, dense.shape[-1]).to(current.dtype) if self.targets else self._augmented(dense)
        self._gram.add(current)
        self.cross += (current.T @ dense).to(self.cross.dtype)


def ridge_solve(xtx: torch.Tensor, rhs: torch.Tensor, damp: float, where: str,
                prior: torch.Tensor | None = None) -> torch.Tensor | None:
    """(X^T X + lambda I)^{-1} (rhs + lambda prior) by Cholesky; lambda grows x10 on failure (3 tries).
    Returns None (the caller keeps the original weights) if every try fails."""
    scale = xtx.diagonal().mean()
    if not torch.isfinite(xtx).all() or scale <= 0:
        warnings.warn(f"recovery at {where}: X^T X is singular (zero or non-finite); weights left unchanged", stacklevel=2)
        return None
    lam = damp
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(xtx + damping(xtx, lam))
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
    whether it was re-fitted (False: the solve fell back and its weights are unchanged).
    Modules alike in having a bias share one factorisation: their targets are solved together."""
    fitted = dict.fromkeys(modules, False)
    width = moments.gram.shape[0] - int(moments.augment)
    for has_bias in (True, False):
        group = [m for m in modules if (m.bias is not None and moments.augment) == has_bias]
        if not group:
            continue
        ws = [weight(m).to(moments.gram.dtype) for m in group]  # [out, in] each
        if has_bias:
            ws = [torch.cat([w, m.bias.detach().to(w.dtype)[:, None]], 1) for w, m in zip(ws, group, strict=True)]
        n = width + int(has_bias)  # the inputs, with the constant 1 when the bias is fitted
        w_all = torch.cat(ws, 0)  # [sum of outs, n]
        gram, to_weights = moments.gram[:n, :n], toward == "weights"
        if moments.targets:  # X_hat^T Y itself
            sol = ridge_solve(gram, moments.cross[:n], damp, where, prior=w_all.T if to_weights else None)
        elif w_all.shape[0] > n:  # X_hat^T Y = (X_hat^T X) W^T: solve against the narrower X_hat^T X
            eye = torch.eye(n, dtype=gram.dtype, device=gram.device) if to_weights else None
            sol = ridge_solve(gram, moments.cross[:n, :n], damp, where, prior=eye)
            sol = None if sol is None else sol @ w_all.T
        else:
            sol = ridge_solve(gram, moments.cross[:n, :n] @ w_all.T, damp, where, prior=w_all.T if to_weights else None)
        if sol is None:
            continue
        for module, part in zip(group, sol.split([w.shape[0] for w in ws], dim=1), strict=True):
            with torch.no_grad():
                weight(module).copy_(part[:width].T.to(module.weight.dtype))
                if has_bias:
                    module.bias.copy_(part[width].to(module.bias.dtype))
            fitted[module] = True
    return [fitted[m] for m in modules]


@register("recovery")
class Recovery(Remedy):
    fits_on_data = True
    params = ("damp", "toward")

    def __init__(self, settings):
        super().__init__(settings)
        self.fits, self.fell_back = 0, []

    @classmethod
    def check(cls, settings) -> None:
        damp = settings.damp
        if isinstance(damp, bool) or not isinstance(damp, int | float) or not math.isfinite(damp) or damp <= 0:
            raise ConfigError(f"remedy.damp={damp!r}; accepted: a finite number > 0 (lambda = damp * mean diag X^T X)")
        if settings.ridge_toward not in TOWARD:
            raise ConfigError(f"remedy.toward={settings.ridge_toward!r} is not accepted; accepted: {', '.join(TOWARD)}")

    def before_observing(self, fit: FitContext) -> None:
        inputs = (module_input(fit.block, fit.view.module_input, chunk) for chunk in fit.stream)
        self._refit(fit, 1, inputs)

    def before_scoring(self, fit: FitContext, level2_inputs: list[torch.Tensor] | None) -> None:
        # The statistics pass saw level 2's inputs after level 1 was re-fitted: they are
        # what a probe would compute, so one pass serves both when it ran on the fit stream.
        inputs = level2_inputs if level2_inputs is not None else (
            module_input(fit.block, fit.view.level2, chunk) for chunk in fit.stream)
        self._refit(fit, 2, inputs)

    def _refit(self, fit: FitContext, level: int, inputs) -> None:
        """Re-fit one level to what the dense block's level computes on the dense stream: its
        level-1 inputs (level 1) or its level-2 outputs (level 2), chunk by chunk."""
        modules = fit.view.level1 if level == 1 else [fit.view.level2]
        moments = None
        for x, dense_seen in zip(inputs, fit.dense[level - 1], strict=True):
            if moments is None:
                moments = CrossMoments(x.shape[-1], any(m.bias is not None for m in modules), fit.dtype, fit.device,
                                       targets=dense_seen.shape[-1] if level == 2 else None)
            moments.update(x, dense_seen)
        at = f"{fit.where} level {level}"
        fitted = refit(modules, moments, self.settings.damp, at, self.settings.ridge_toward)
        self.fits += sum(fitted)
        self.fell_back += [f"{at} module {i}" for i, ok in enumerate(fitted) if not ok]

    def finish(self) -> dict:
        if self.fell_back and not self.fits:
            raise RuntimeError(f"remedy=recovery: every one of the {len(self.fell_back)} fits fell back to the "
                               f"unchanged weights (X^T X singular at every level; remedy.damp={self.settings.damp}); "
                               "this would be a no-remedy run recorded as recovery")
        return {"fits": self.fits, "fell_back": self.fell_back}
