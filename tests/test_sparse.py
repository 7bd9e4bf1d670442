"""The unstructured / N:M track against independent references (METHOD.md sections 9-10)."""

import itertools

import pytest
import torch

from harness.settings import Pattern, parse_nm
from harness.sparse import masks
from harness.sparse.methods import (
    build,
    hessian,
    inverse,
    mrp_mask,
    solve_m,
    solve_s,
    sparsegpt,
)
from harness.sparse.methods import (
    names as sparse_names,
)

DTYPE = torch.float64


def layer(rows=6, cols=12, tokens=64, seed=0):
    """A weight and correlated inputs (so that H is far from diagonal)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=DTYPE)
    x = torch.randn(tokens, cols, generator=g, dtype=DTYPE) @ mix
    w = torch.randn(rows, cols, generator=g, dtype=DTYPE)
    return w, x


def loss(dw: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """1/2 dw H dw^T per row."""
    return 0.5 * ((dw @ h) * dw).sum(1)


def test_mrp_m_on_a_fixed_mask_is_the_least_squares_refit_of_the_kept_weights():
    w, x = layer()
    damp = 0.01
    h, _ = hessian(x.T @ x, x.shape[0], damp)
    mask = masks.per_row(torch.rand(w.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE), 5)
    refit = solve_m(w.clone(), inverse(h), mask)
    # Independent: min over w'_K of (2/N)||X w^T - X_K w'_K^T||^2 + lambda ||w'_K - w_K||^2 + lambda ||w_P||^2
    n = x.shape[0]
    lam = damp * torch.diagonal((2 / n) * x.T @ x).mean()
    for r in range(w.shape[0]):
        keep = ~mask[r]
        a = torch.cat([(2 / n) ** 0.5 * x[:, keep], lam.sqrt() * torch.eye(int(keep.sum()), dtype=DTYPE)])
        b = torch.cat([(2 / n) ** 0.5 * x @ w[r], lam.sqrt() * w[r, keep]])
        expected = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
        torch.testing.assert_close(refit[r, keep], expected, rtol=1e-9, atol=1e-9)
        assert (refit[r, ~keep] == 0).all()


@pytest.mark.parametrize("solve", [solve_m, solve_s])
def test_one_removed_weight_is_the_obs_update_and_its_predicted_loss_is_measured(solve):
    w, x = layer()
    h, _ = hessian(x.T @ x, x.shape[0], 0.01)
    h_inv = inverse(h)
    p = torch.tensor([3, 0, 11, 5, 5, 7])  # one column per row
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[torch.arange(6), p] = True
    out = solve(w.clone(), h_inv, mask)
    wp, hpp = w[torch.arange(6), p], h_inv[p, p]
    obs = w - (wp / hpp)[:, None] * h_inv[p]  # OBS: dw = -(w_p / [H^-1]_pp) [H^-1]_p,:
    torch.testing.assert_close(out, obs.masked_fill(mask, 0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss(out - w, h), wp**2 / (2 * hpp), rtol=1e-9, atol=1e-12)


def test_mrp_m_predicted_loss_equals_the_measured_loss_for_many_removed_weights():
    w, x = layer(cols=16)
    h, _ = hessian(x.T @ x, x.shape[0], 0.01)
    h_inv = inverse(h)
    mask = mrp_mask(w, h_inv, Pattern(0.5), exact=True)
    out = solve_m(w.clone(), h_inv, mask)
    for r in range(w.shape[0]):
        p = mask[r].nonzero()[:, 0]
        predicted = 0.5 * w[r, p] @ torch.linalg.solve(h_inv[p][:, p], w[r, p])
        torch.testing.assert_close(loss(out - w, h)[r], predicted, rtol=1e-9, atol=1e-12)
    # and it is the optimum for that mask: Solution S (same mask) never does better
    assert (loss(out - w, h) <= loss(solve_s(w.clone(), h_inv, mask) - w, h) + 1e-12).all()


def test_sparsegpt_equals_mrp_m_when_every_pruned_set_is_a_prefix_of_the_column_order():
    w, x = layer(rows=5, cols=12)
    h, _ = hessian(x.T @ x, x.shape[0], 0.01)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for r in range(5):
        mask[r, : 6] = True  # the same count in every row (MRP's batched solve)
    # blocksize 4: the prefix spans column blocks, so the lazy updates between blocks are exercised
    sgpt, _ = sparsegpt(w.clone(), h, Pattern(0.5), blocksize=4, mask=mask)
    torch.testing.assert_close(sgpt, solve_m(w.clone(), inverse(h), mask), rtol=1e-9, atol=1e-9)
    # not a prefix: SparseGPT freezes kept columns before later removals, so it is never better
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[:, 1::2] = True
    sgpt, _ = sparsegpt(w.clone(), h, Pattern(0.5), blocksize=4, mask=mask)
    exact = solve_m(w.clone(), inverse(h), mask)
    assert (loss(exact - w, h) <= loss(sgpt - w, h) + 1e-12).all()
    assert (loss(exact - w, h) < loss(sgpt - w, h) - 1e-9).any()


def _prune(name, w, x, pattern, **params):
    method = build(name, params)
    return method.prune(w.clone(), x.T @ x, x.shape[0], pattern)


@pytest.mark.parametrize("name", sparse_names())
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_have_exactly_n_zeros_in_every_group(name, nm):
    w, x = layer(rows=8, cols=16)
    n, m = nm
    out, mask = _prune(name, w, x, Pattern(n / m, n, m))
    assert (mask.view(8, -1, m).sum(-1) == n).all()
    assert ((out == 0) == mask).all()  # exactly the mask is zero (no other weight lands on 0)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "mrp_s", "mrp_m"])
def test_unstructured_removes_the_same_count_from_every_row(name):
    w, x = layer(rows=8, cols=16)
    out, mask = _prune(name, w, x, Pattern(0.3))
    assert (mask.sum(1) == int(16 * 0.3)).all() and ((out == 0) == mask).all()


def test_sparsegpt_unstructured_removes_the_fraction_of_each_column_block():
    w, x = layer(rows=8, cols=16)
    _, mask = _prune("sparsegpt", w, x, Pattern(0.3), blocksize=8)
    assert [int(mask[:, s : s + 8].sum()) for s in (0, 8)] == [int(64 * 0.3)] * 2


def test_mrp_m_two_of_four_choice_matches_brute_force_over_all_masks():
    """8 columns, 2:4: over all C(4,2)^2 = 36 masks of a row, the one with the smallest sum of
    its two group losses L_g = 1/2 w_S [(H^-1)_SS]^-1 w_S^T (METHOD.md section 10)."""
    w, x = layer(rows=10, cols=8, seed=3)
    h, _ = hessian(x.T @ x, x.shape[0], 0.01)
    h_inv = inverse(h)
    chosen = mrp_mask(w, h_inv, Pattern(0.5, 2, 4), exact=True)

    def group_loss(r, cols):
        cols = torch.tensor(cols)
        return 0.5 * w[r, cols] @ torch.linalg.inv(h_inv[cols][:, cols]) @ w[r, cols]

    for r in range(10):
        best = min(itertools.product(itertools.combinations(range(4), 2), itertools.combinations(range(4, 8), 2)),
                   key=lambda s: float(group_loss(r, s[0]) + group_loss(r, s[1])))
        expected = torch.zeros(8, dtype=torch.bool)
        expected[list(best[0] + best[1])] = True
        assert (chosen[r] == expected).all(), r


@pytest.mark.parametrize("name", sparse_names())
@pytest.mark.parametrize("pattern", [Pattern(0.5, 2, 4), Pattern(0.25)])
def test_with_white_inputs_every_method_is_magnitude_without_update(name, pattern):
    """X^T X proportional to I: the Hessian methods' saliency is |w| and their updates vanish."""
    w, _ = layer(rows=8, cols=16)
    x = torch.eye(16, dtype=DTYPE) * 3.0  # X^T X = 9 I
    params = {"blocksize": 16} if name == "sparsegpt" else {}
    out, mask = _prune(name, w, x, pattern, **params)
    if name == "sparsegpt" and not pattern.is_nm:  # its unstructured mask is per column block, not per row
        reference = torch.zeros(w.numel(), dtype=torch.bool)
        reference[torch.topk(w.abs().flatten(), int(w.numel() * 0.25), largest=False).indices] = True
        reference = reference.view_as(w)
    else:
        reference = masks.select(w.abs(), pattern)
    assert (mask == reference).all()
    torch.testing.assert_close(out, w.masked_fill(reference, 0), rtol=1e-12, atol=1e-12)


def test_wanda_scores_weights_by_the_input_column_norm():
    w, x = layer(rows=4, cols=8)
    _, mask = _prune("wanda", w, x, Pattern(0.5))
    norms = torch.stack([x[:, j].norm() for j in range(8)])
    for r in range(4):
        expected = sorted(range(8), key=lambda j: float(w[r, j].abs() * norms[j]))[:4]
        assert sorted(mask[r].nonzero()[:, 0].tolist()) == sorted(expected)


def test_dead_input_columns_are_removed_first_and_the_solve_stays_finite():
    w, x = layer(rows=4, cols=8)
    x[:, 2] = 0
    for name in ("sparsegpt", "mrp_s", "mrp_m"):
        out, _ = _prune(name, w, x, Pattern(0.25), **({"blocksize": 8} if name == "sparsegpt" else {}))
        assert torch.isfinite(out).all() and (out[:, 2] == 0).all(), name


def test_parse_nm_names_the_accepted_form():
    assert parse_nm("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "a:b", "0:4"):
        with pytest.raises(ValueError, match="accepted: N:M"):
            parse_nm(bad)
