"""linalg.truncated_svd: the Gram + eigh route where the spectrum allows it, the SVD where not.

Every check is against float64 references from torch.linalg.svdvals: the truncation error
‖M − U diag(S) Vh‖_F² equals Σ_{i>r} σ_i² to 1e-10 of ‖M‖_F², S equals the top r singular values,
and U, Vh have orthonormal columns / rows.
"""

import math

import pytest
import torch

from prehab_svd import linalg

f64 = torch.float64


def with_spectrum(m, n, s, gen):
    """A random [m, n] matrix with singular values s (length min(m, n))."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=f64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=f64, generator=gen))
    return (U * s) @ V.T


def check_exact(M, rank, U, S, Vh, *, s_of_max=False, orth_tol=1e-9):
    """The factors are an exact truncated SVD: S to 1e-10 relative to each singular value (to σ₁ with
    ``s_of_max``: what an SVD guarantees for the tiny ones), U and Vh orthonormal to ``orth_tol``."""
    m, n = M.shape
    r = min(rank, m, n)
    assert U.shape == (m, r) and S.shape == (r,) and Vh.shape == (r, n)
    assert U.dtype == S.dtype == Vh.dtype == M.dtype
    sv = torch.linalg.svdvals(M)
    total = M.square().sum()
    err = (M - (U * S) @ Vh).square().sum()
    assert abs(float(err - sv[r:].square().sum())) <= 1e-10 * float(total)
    assert torch.all(S[:-1] >= S[1:]), "singular values not descending"
    ref = sv[0].expand(r) if s_of_max else sv[:r]
    assert float(((S - sv[:r]).abs() / ref).max()) <= 1e-10
    eye = torch.eye(r, dtype=f64)
    assert float((U.T @ U - eye).abs().max()) <= orth_tol
    assert float((Vh @ Vh.T - eye).abs().max()) <= orth_tol


SHAPES = [(37, 53), (53, 37), (1, 9), (9, 1), (40, 40), (200, 150), (150, 200), (160, 160)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", ["one", "half", "all", "more"])
def test_benign_spectrum(shape, which):
    """Spectrum logspace(0, -2): every rank passes the threshold, so the Gram route answers (called
    directly for the small shapes, which truncated_svd itself hands to the SVD)."""
    m, n = shape
    gen = torch.Generator().manual_seed(1000 * m + n + len(which))
    k = min(m, n)
    rank = {"one": 1, "half": max(1, k // 2), "all": k, "more": k + 3}[which]
    M = with_spectrum(m, n, torch.logspace(0, -2, k, dtype=f64), gen)
    out = linalg._truncated_eigh(M, rank)
    assert out is not None
    check_exact(M, rank, *out)
    check_exact(M, rank, *linalg.truncated_svd(M, rank))


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (150, 200), (200, 150)])
@pytest.mark.parametrize("which", ["one", "half", "all", "more"])
def test_gaussian_matrix(shape, which):
    """Plain Gaussian matrices (Marchenko–Pastur spectra, close singular values)."""
    m, n = shape
    gen = torch.Generator().manual_seed(2000 * m + n + len(which))
    k = min(m, n)
    rank = {"one": 1, "half": max(1, k // 2), "all": k, "more": k + 3}[which]
    M = torch.randn(m, n, dtype=f64, generator=gen)
    check_exact(M, rank, *linalg.truncated_svd(M, rank))
    out = linalg._truncated_eigh(M, rank)
    if out is not None:
        check_exact(M, rank, *out)


def _paths(monkeypatch):
    """Record what truncated_svd's calls of _truncated_eigh returned ("eigh" or "svd")."""
    taken = []
    inner = linalg._truncated_eigh

    def spy(M, rank):
        out = inner(M, rank)
        taken.append("svd" if out is None else "eigh")
        return out

    monkeypatch.setattr(linalg, "_truncated_eigh", spy)
    return taken


@pytest.mark.parametrize("shape", [(300, 140), (140, 300), (160, 160)])
def test_wide_spectrum_falls_back_and_stays_exact(shape, monkeypatch):
    """A spectrum spanning 1e-9: a rank whose σ_r² is below τ·σ₁² takes the SVD, and the answer is
    exact; a rank in the top of the same spectrum takes the Gram route and is exact as well."""
    gen = torch.Generator().manual_seed(7)
    m, n = shape
    k = min(m, n)
    s = torch.logspace(0, -9, k, dtype=f64)
    M = with_spectrum(m, n, s, gen)
    tau = linalg._eigh_tau(k)
    deep = k - 5  # σ_r² ≈ 1e-17·σ₁²
    shallow = int((s.square() >= 4 * tau).sum())  # σ_r² just above the threshold
    assert float(s[deep - 1] ** 2) < tau and shallow >= 10
    taken = _paths(monkeypatch)
    check_exact(M, deep, *linalg.truncated_svd(M, deep), s_of_max=True)  # tiny σ: to σ₁
    assert taken == ["svd"]
    check_exact(M, k, *linalg.truncated_svd(M, k), s_of_max=True)
    assert taken == ["svd", "svd"]
    check_exact(M, shallow, *linalg.truncated_svd(M, shallow))
    assert taken == ["svd", "svd", "eigh"]


def test_threshold_is_on_the_smallest_kept_value():
    """The Gram route declines exactly when σ_r² < τ·σ₁²."""
    gen = torch.Generator().manual_seed(11)
    k = 140
    tau = linalg._eigh_tau(k)
    for factor, want in [(0.5, None), (2.0, "eigh")]:
        s = torch.logspace(0, -1, k, dtype=f64)
        s[60:] = math.sqrt(factor * tau) * torch.logspace(0, -1, k - 60, dtype=f64)
        M = with_spectrum(200, k, s, gen)
        out = linalg._truncated_eigh(M, 61)  # σ_61 = √(factor·τ)
        assert (out is None) == (want is None)
        assert linalg._truncated_eigh(M, 60) is not None  # σ_60 = 0.1: fine
        check_exact(M, 61, *linalg.truncated_svd(M, 61))


@pytest.mark.parametrize("spectrum", ["logspace4", "power", "whitened"])
@pytest.mark.parametrize("tall", [True, False])
def test_orthogonality_on_realistic_spectra(spectrum, tall):
    """U_rᵀU_r ≈ I (and V) to 1e-9 with no re-orthogonalization, at a compression rank, on spectra
    like those of LLM weights and of their whitened targets (SmolLM2's MLP shape, scaled down)."""
    gen = torch.Generator().manual_seed(5)
    m, n = (768, 288) if tall else (288, 768)
    k = min(m, n)
    if spectrum == "logspace4":
        M = with_spectrum(m, n, torch.logspace(0, -4, k, dtype=f64), gen)
    elif spectrum == "power":
        M = with_spectrum(m, n, 1.0 / torch.arange(1, k + 1, dtype=f64), gen)
    else:  # W R with R a factor of a Gram with a decaying spectrum and spread channel scales
        d = n
        Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=f64, generator=gen))
        sc = torch.exp(torch.randn(d, dtype=f64, generator=gen))
        G = sc[:, None] * ((Q * torch.logspace(0, -5, d, dtype=f64)) @ Q.T) * sc[None, :]
        W = torch.randn(m, d, dtype=f64, generator=gen)
        M = W @ linalg.whitening_factor(G).R
    rank = int(0.58 * k)
    out = linalg._truncated_eigh(M, rank)
    assert out is not None, "the Gram route should take a compression rank of this spectrum"
    check_exact(M, rank, *out)


def test_zero_size_and_all_zero():
    for shape in [(0, 5), (5, 0), (0, 0)]:
        U, S, Vh = linalg.truncated_svd(torch.zeros(shape, dtype=f64), 3)
        assert U.shape == (shape[0], 0) and S.shape == (0,) and Vh.shape == (0, shape[1])
    for shape in [(3, 4), (200, 150)]:
        M = torch.zeros(shape, dtype=f64)
        assert linalg._truncated_eigh(M, 2) is None
        U, S, Vh = linalg.truncated_svd(M, 2)
        assert U.shape == (shape[0], 2) and Vh.shape == (2, shape[1])
        assert torch.all(S == 0) and torch.all((U * S) @ Vh == 0)


def test_non_float64_takes_the_svd():
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(200, 150, generator=gen)
    assert linalg._truncated_eigh(M, 10) is None
    U, S, Vh = linalg.truncated_svd(M, 10)
    assert U.dtype == torch.float32
    assert torch.allclose(S, torch.linalg.svdvals(M)[:10], rtol=1e-5)


def test_low_rank_matrix():
    """A matrix of exact rank 20 asked for rank 30: the SVD answers (σ₂₁…σ₃₀ are rounding), and the
    product is M itself."""
    gen = torch.Generator().manual_seed(9)
    M = torch.randn(200, 20, dtype=f64, generator=gen) @ torch.randn(20, 150, dtype=f64, generator=gen)
    assert linalg._truncated_eigh(M, 30) is None
    assert linalg._truncated_eigh(M, 20) is not None
    U, S, Vh = linalg.truncated_svd(M, 30)
    assert float((M - (U * S) @ Vh).norm() / M.norm()) < 1e-13
    check_exact(M, 20, *linalg.truncated_svd(M, 20))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(13)
    M = with_spectrum(600, 250, torch.logspace(0, -4, 250, dtype=f64), gen)
    for rank in (140, 250):
        U, S, Vh = linalg.truncated_svd(M.cuda(), rank)
        assert U.is_cuda and S.is_cuda and Vh.is_cuda
        check_exact(M, rank, U.cpu(), S.cpu(), Vh.cpu())
    assert linalg._truncated_eigh(M.cuda(), 140) is not None
