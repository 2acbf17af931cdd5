"""The closed forms reach the optimum of their objective, computed independently from raw data."""

import pytest
import torch

from prehab_svd import PrehabError
from prehab_svd.linalg import (
    anchored_lowrank, objective, optimal_objective, whitened_lowrank, whitening_factor,
)

f64 = torch.float64


def _range_basis(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of A's column space (SVD with a relative cut-off)."""
    U, S, _ = torch.linalg.svd(A, full_matrices=False)
    keep = S > S.max() * max(A.shape) * 1e-13
    return U[:, keep]


def oracle_min(X, Xp, W, rank):
    """min over rank-r W' of ‖X Wᵀ − X' W'ᵀ‖², straight from the data matrices: X'W'ᵀ ranges over
    every matrix Q·Z with Q a basis of range(X') and rank(Z) ≤ r, so the optimum keeps the top r
    singular values of Qᵀ X Wᵀ."""
    Y = X @ W.T
    Q = _range_basis(Xp)
    s = torch.linalg.svdvals(Q.T @ Y)
    return Y.square().sum() - s[:rank].square().sum()


def make_problem(T, d, out, gen, *, deficient=False, shift=0.3):
    X = torch.randn(T, d, generator=gen, dtype=f64)
    if deficient:  # inputs confined to a subspace smaller than d
        k = max(1, d // 3)
        X = torch.randn(T, k, generator=gen, dtype=f64) @ torch.randn(k, d, generator=gen, dtype=f64)
    # correlated, anisotropic channels like real activations
    X = X * torch.logspace(0, 1.5, d, dtype=f64)
    Xp = X + shift * torch.randn(X.shape, generator=gen, dtype=f64) @ torch.diag(
        torch.rand(d, generator=gen, dtype=f64)) if not deficient else X @ torch.diag(
        1 + shift * torch.rand(d, generator=gen, dtype=f64))
    W = torch.randn(out, d, generator=gen, dtype=f64)
    return X, Xp, W


def stats(X, Xp):
    T = X.shape[0]
    return X.T @ X / T, X.T @ Xp / T, Xp.T @ Xp / T


CASES = [
    # (T, d, out, rank, deficient)
    (400, 37, 23, 5, False),
    (1000, 64, 96, 17, False),
    (50, 80, 33, 7, False),   # fewer tokens than width: singular gram
    (300, 45, 45, 30, True),  # inputs in a 15-dim subspace, rank above it
    (300, 45, 20, 4, True),
]


@pytest.mark.parametrize("T,d,out,rank,deficient", CASES)
def test_anchored_reaches_optimum(T, d, out, rank, deficient):
    gen = torch.Generator().manual_seed(T * 7 + d)
    X, Xp, W = make_problem(T, d, out, gen, deficient=deficient)
    gx, c, gp = stats(X, Xp)
    U, V = anchored_lowrank(W, c, gp, rank)
    assert U.shape == (out, rank) and V.shape == (rank, d)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    Wn = U @ V
    got = (X @ W.T - Xp @ Wn.T).square().sum()
    best = oracle_min(X, Xp, W, rank)
    assert torch.linalg.matrix_rank(Wn) <= rank
    assert abs(got - best) <= 1e-8 * (X @ W.T).square().sum(), (got, best)
    # the statistics-only formulas agree with the data
    energy = float((X @ W.T).square().sum())
    assert torch.allclose(objective(W, Wn, gx, c, gp) * T, got, rtol=1e-9, atol=1e-9 * energy)
    assert torch.allclose(optimal_objective(W, gx, c, gp, rank) * T, best,
                          rtol=0, atol=1e-8 * energy)
    # no random rank-r perturbation does better
    for scale in (1e-1, 1e-3, 1e-5):
        A = torch.randn(U.shape, generator=gen, dtype=f64) * scale * U.norm() / U.numel() ** 0.5
        B = torch.randn(V.shape, generator=gen, dtype=f64) * scale * V.norm() / V.numel() ** 0.5
        Wp = (U + A) @ (V + B)
        worse = (X @ W.T - Xp @ Wp.T).square().sum()
        assert worse >= got * (1 - 1e-12)


@pytest.mark.parametrize("T,d,out,rank,deficient", CASES)
def test_whitened_reaches_optimum_and_equals_anchored(T, d, out, rank, deficient):
    gen = torch.Generator().manual_seed(T + d * 13)
    X, _, W = make_problem(T, d, out, gen, deficient=deficient)
    g = X.T @ X / T
    U, V = whitened_lowrank(W, g, rank)
    Wn = U @ V
    got = (X @ (W - Wn).T).square().sum()
    best = oracle_min(X, X, W, rank)
    assert abs(got - best) <= 1e-8 * (X @ W.T).square().sum()
    Ua, Va = anchored_lowrank(W, g, g, rank)
    assert torch.allclose(Ua @ Va, Wn, rtol=0, atol=1e-9 * Wn.abs().max())


def test_minimum_norm_when_singular():
    """Directions the tokens never visit carry no weight: the rows of W' lie in the span of the
    tokens the layer sees (range of gram), which makes W' the minimum-norm optimum."""
    gen = torch.Generator().manual_seed(3)
    X, Xp, W = make_problem(30, 70, 40, gen)  # T < d
    gx, c, gp = stats(X, Xp)
    for (U, V), seen in ((anchored_lowrank(W, c, gp, 10), Xp), (whitened_lowrank(W, gx, 10), X)):
        Wn = U @ V
        Q = _range_basis(seen.T)  # basis of the visited input directions
        leak = (Wn - Wn @ Q @ Q.T).norm() / Wn.norm()
        assert leak < 1e-10, leak


def test_indefinite_from_rounding_is_finite_and_optimal():
    gen = torch.Generator().manual_seed(11)
    d, out, rank = 40, 24, 6
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=f64))
    lam = torch.cat([torch.logspace(0, -6, 30, dtype=f64), torch.zeros(5, dtype=f64),
                     -1e-16 * torch.rand(5, generator=gen, dtype=f64)])
    gram = Q @ torch.diag(lam) @ Q.T
    W = torch.randn(out, d, generator=gen, dtype=f64)
    F = whitening_factor(gram)
    assert F.kind == "eigen" and F.rank <= 35
    U, V = whitened_lowrank(W, gram, rank)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    # Oracle: X = Λ^{1/2} Qᵀ rows for the positive part reproduces the PSD part of gram.
    pos = lam > 0
    X = (Q[:, pos] * lam[pos].sqrt()).T
    got = (X @ (W - U @ V).T).square().sum()
    best = oracle_min(X, X, W, rank)
    assert abs(got - best) <= 1e-8 * (X @ W.T).square().sum()


def test_cholesky_and_eigen_paths_agree():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(500, 30, generator=gen, dtype=f64)
    g = X.T @ X / 500
    W = torch.randn(12, 30, generator=gen, dtype=f64)
    F = whitening_factor(g)
    assert F.kind == "cholesky"
    U1, V1 = whitened_lowrank(W, g, 5)
    # force the eigen factor: append a zero channel (gram becomes singular), then drop it again
    g2 = torch.zeros(31, 31, dtype=f64)
    g2[:30, :30] = g
    W2 = torch.cat([W, torch.randn(12, 1, generator=gen, dtype=f64)], 1)
    assert whitening_factor(g2).kind == "eigen"
    U2, V2 = whitened_lowrank(W2, g2, 5)
    assert torch.allclose((U2 @ V2)[:, :30], U1 @ V1, atol=1e-10)
    assert (U2 @ V2)[:, 30].abs().max() < 1e-10  # the unvisited channel gets zero weight


def test_output_dtype_and_zero_padding():
    W = torch.randn(8, 6, dtype=torch.float32)
    g = torch.eye(6, dtype=torch.float32)
    U, V = whitened_lowrank(W, g, 4)
    assert U.dtype == torch.float32 and V.dtype == torch.float32
    # rank above the problem's rank: padded with zeros, product still optimal (= W here)
    gz = torch.zeros(6, 6)
    gz[0, 0] = 1.0
    U, V = whitened_lowrank(W, gz, 3)
    assert U.shape == (8, 3) and torch.isfinite(U).all()
    assert torch.allclose((U @ V)[:, 0], W[:, 0], atol=1e-6)
    assert (U @ V)[:, 1:].abs().max() < 1e-6


def test_bad_inputs():
    W = torch.randn(4, 5)
    with pytest.raises(PrehabError, match="square"):
        whitened_lowrank(W, torch.eye(4), 2)
    with pytest.raises(PrehabError, match="rank"):
        whitened_lowrank(W, torch.eye(5), 0)
    g = torch.eye(5)
    g[0, 0] = float("nan")
    with pytest.raises(PrehabError, match="NaN"):
        anchored_lowrank(W, torch.eye(5), g, 2)


# --------------------------------------------------------------------------------------------------
# Shrinkage of the statistics toward their diagonals (compress(..., shrinkage=α))


def _stats(x, xp=None):
    from prehab_svd.methods import LayerStats

    if xp is None:
        g = x.T @ x / x.shape[0]
        return LayerStats(g, g, g, None, x.shape[0])
    return LayerStats(x.T @ x / x.shape[0], x.T @ xp / x.shape[0], xp.T @ xp / x.shape[0], None, x.shape[0])


def test_shrunk_stats_keep_the_diagonal_and_the_identity_of_single_streams():
    torch.manual_seed(0)
    x = torch.randn(300, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    st = _stats(x)
    s = st.shrunk(0.25)
    assert s.cross is s.gram_x and s.gram_xp is s.gram_x  # one stream stays one stream
    torch.testing.assert_close(torch.diagonal(s.gram_x), torch.diagonal(st.gram_x), rtol=0, atol=0)
    off = ~torch.eye(12, dtype=torch.bool)
    torch.testing.assert_close(s.gram_x[off], 0.75 * st.gram_x[off])
    assert st.shrunk(0) is st
    with pytest.raises(PrehabError, match="shrinkage"):
        st.shrunk(1.5)
    raw = _stats(x, x + 0.1 * torch.randn_like(x))
    two = raw.shrunk(0.5)  # two streams: every term is shrunk the same way, diagonals kept
    for got, was in ((two.gram_x, raw.gram_x), (two.cross, raw.cross), (two.gram_xp, raw.gram_xp)):
        torch.testing.assert_close(torch.diagonal(got), torch.diagonal(was), rtol=0, atol=0)
        torch.testing.assert_close(got[off], 0.5 * was[off])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_shrinkage_is_invariant_to_per_channel_scaling(alpha):
    """Scaling input channel j by D_j (and W's column j by 1/D_j) is the same problem: W' must be the
    same up to that scaling, for every shrinkage (damping toward I would not be)."""
    torch.manual_seed(1)
    x = torch.randn(400, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    W = torch.randn(10, 16, dtype=torch.float64)
    D = torch.logspace(-1, 1, 16, dtype=torch.float64)
    a = _stats(x).shrunk(alpha)
    b = _stats(x * D).shrunk(alpha)
    U, V = whitened_lowrank(W, a.gram_x, 5)
    U2, V2 = whitened_lowrank(W / D, b.gram_x, 5)
    torch.testing.assert_close(U @ V, (U2 @ V2) * D, rtol=1e-9, atol=1e-11)
