"""Closed-form low-rank factorizations under activation statistics.

All factorizations run in float64 (the inputs are upcast); the returned factors are cast back to the
dtype of ``W``. Notation: rows of an activation matrix ``x`` are tokens, a layer computes ``x Wᵀ`` with
``W`` of shape [out, in], and the Gram matrices are ``gram = x'ᵀx'`` and ``cross = xᵀx'`` of shape
[in, in] (any positive normalization, as long as both use the same one).

The whitening factor of a Gram matrix is ``R`` with ``gram = R Rᵀ``:

* full rank and well conditioned: ``R`` is the lower Cholesky factor and ``R⁻¹`` is only ever
  applied through triangular solves;
* singular, nearly singular, or indefinite from rounding: ``R = Q₊ Λ₊^{1/2}`` from an eigen
  decomposition restricted to the numerically positive eigenvalues, and ``R⁺ = Λ₊^{-1/2} Q₊ᵀ``.
  The answer then has its rows in the range of ``gram``: it is the minimum-norm optimum, because
  directions the calibration tokens never visit cannot change the objective.

Optional damping (``damping > 0``) adds ``damping · tr(gram)/d · I`` first (a regularized problem,
not the exact optimum; off by default).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import PrehabError

__all__ = [
    "WhiteningFactor",
    "whitening_factor",
    "check_rank",
    "whitened_lowrank",
    "anchored_lowrank",
    "truncated_svd",
    "balanced_factors",
    "objective",
    "optimal_objective",
]

# Relative eigenvalue cut-off for the pseudo-factor, like numpy.linalg.pinv's rcond, scaled by d.
_EIG_RTOL = 1e-13
# A Cholesky factor whose squared diagonal falls this far below the largest is treated as singular.
_CHOL_RCOND = 1e-12
# A negative eigenvalue beyond this fraction of the largest is an error, not rounding (an fp32 gram
# accumulated over many batches stays orders of magnitude inside it).
_NOT_PSD_RTOL = 1e-2


@dataclass
class WhiteningFactor:
    """``gram = R Rᵀ`` in float64, either triangular (Cholesky) or an eigen pseudo-factor."""

    kind: str  # "cholesky" or "eigen"
    R: torch.Tensor  # [d, d] lower triangular, or [d, k] = Q₊ Λ₊^{1/2}
    Q: torch.Tensor | None = None  # eigen: [d, k]
    sqrt_eig: torch.Tensor | None = None  # eigen: [k]

    @property
    def rank(self) -> int:
        return self.R.shape[1]

    def right_solve(self, B: torch.Tensor) -> torch.Tensor:
        """``B R⁻¹`` (``B R⁺`` for the pseudo-factor); B has d (or k) columns accordingly."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.R, B, upper=False, left=False)
        return (B / self.sqrt_eig) @ self.Q.T

    def right_solve_t(self, B: torch.Tensor) -> torch.Tensor:
        """``B R⁻ᵀ`` (``B R⁺ᵀ`` for the pseudo-factor)."""
        if self.kind == "cholesky":
            # B R⁻ᵀ = (R⁻¹ Bᵀ)ᵀ
            return torch.linalg.solve_triangular(self.R, B.T, upper=False, left=True).T
        return (B @ self.Q) / self.sqrt_eig


def _check_real(name: str, A) -> None:
    """A real floating-point tensor: integer factors would be silently rounded, complex ones truncated."""
    if not isinstance(A, torch.Tensor):
        raise PrehabError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if not A.dtype.is_floating_point:
        raise PrehabError(f"{name} has dtype {A.dtype}; pass a real floating-point tensor (float32 or float64)")


def check_rank(rank) -> int:
    """``rank`` as an int, or a PrehabError unless it is a positive integer (bool excluded)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise PrehabError(f"rank must be a positive integer, got {rank!r}")
    return int(rank)


def _check_square(name: str, A: torch.Tensor, d: int | None) -> None:
    """A real, finite, square [d, d] matrix (any d when None)."""
    _check_real(name, A)
    if d is None and A.dim() == 2:
        d = A.shape[0]
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] != d:
        want = "a square 2-D matrix" if d is None else f"a square [{d}, {d}] matrix matching W's input width"
        raise PrehabError(f"{name} must be {want}, got shape {tuple(A.shape)}")
    if not torch.isfinite(A).all():
        raise PrehabError(f"{name} contains NaN or Inf; check the calibration activations")


def _smallest_eig_estimate(L: torch.Tensor, iters: int = 4, block: int = 4) -> float:
    """λ_min(L Lᵀ), estimated from above by block power iteration on (L Lᵀ)⁻¹ with triangular
    solves: O(iters·block·d²) (at d = 4096 on 2 CPU cores about 0.4 s next to 1 s for the Cholesky
    factor, and far less than the SVD that follows). A (numerically) null direction is amplified by
    λ_next/λ_min per step, so it dominates after one or two."""
    d = L.shape[0]
    gen = torch.Generator(device=L.device).manual_seed(0x5EED)
    X = torch.randn(d, min(block, d), generator=gen, dtype=L.dtype, device=L.device)
    for _ in range(iters):
        X = X / torch.linalg.vector_norm(X, dim=0)
        X = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, X, upper=False), upper=True)
    X = X / torch.linalg.vector_norm(X, dim=0)
    q = torch.linalg.solve_triangular(L, X, upper=False).square().sum(0).max()  # xᵀ(LLᵀ)⁻¹x ≤ 1/λ_min
    return float(1.0 / q)


def whitening_factor(gram: torch.Tensor, damping: float = 0.0) -> WhiteningFactor:
    """Factor ``gram = R Rᵀ`` in float64 (see the module docstring for the singular case).

    A gram with an eigenvalue below ``-_NOT_PSD_RTOL`` times the largest is no covariance (rounding
    makes far smaller ones): a PrehabError, instead of an "optimum" of an unbounded objective."""
    _check_square("gram", gram, None)
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not (
            math.isfinite(damping) and damping >= 0):
        raise PrehabError(f"damping must be a finite number >= 0, got {damping!r}")
    G = gram.detach().to(torch.float64)
    G = 0.5 * (G + G.T)
    d = G.shape[0]
    trace = torch.diagonal(G).sum()
    if damping > 0 and trace > 0:
        G = G + (damping * trace / d) * torch.eye(d, dtype=G.dtype, device=G.device)
    if not bool(G.any()):
        # All-zero statistics: no direction is ever visited; the optimum is W' = 0.
        return WhiteningFactor(
            kind="eigen",
            R=G.new_zeros(d, 0),
            Q=G.new_zeros(d, 0),
            sqrt_eig=G.new_zeros(0),
        )
    if trace > 0:
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            diag2 = torch.diagonal(L).square()
            # The pivots only bound λ_min from above (a singular gram can pass with its smallest
            # pivot at 1e-11 of the largest), so the smallest eigenvalue is estimated as well.
            if diag2.min() > _CHOL_RCOND * diag2.max() and _smallest_eig_estimate(L) > _CHOL_RCOND * trace:
                return WhiteningFactor(kind="cholesky", R=L)
    evals, evecs = torch.linalg.eigh(G)  # ascending
    top = evals.abs().max()
    if evals[0] < -_NOT_PSD_RTOL * top:
        raise PrehabError(
            f"gram is not positive semi-definite (eigenvalue {float(evals[0]):.3g}, largest "
            f"{float(top):.3g}); it must be a sum of xᵀx over tokens: check how it was accumulated"
        )
    cutoff = top * max(d, 1) * _EIG_RTOL
    keep = evals > cutoff
    Q = evecs[:, keep]
    s = evals[keep].sqrt()
    return WhiteningFactor(kind="eigen", R=Q * s, Q=Q, sqrt_eig=s)


def truncated_svd(M: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of M in float64: ``(U_r, S_r, Vh_r)``."""
    if min(M.shape) == 0:
        return M.new_zeros(M.shape[0], 0), M.new_zeros(0), M.new_zeros(0, M.shape[1])
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = min(rank, S.shape[0])
    return U[:, :r], S[:r], Vh[:r]


def balanced_factors(U, S, Vh, rank: int, out_dtype, out_device):
    """Balanced factors ``U √S`` and ``√S Vh``, zero-padded to exactly ``rank`` columns/rows.

    For the closed forms ``Vh`` is ``V_hᵀ R⁻¹``: balanced in whitened coordinates, so ``x Bᵀ`` has the
    scale of the singular values. An ill-conditioned ``R`` can make ``B`` exceed the range of a
    float16 output although the product is representable; then each component is rescaled to equal
    max-norms in both factors (:func:`_fit_range`), which leaves the product unchanged.
    """
    root = S.sqrt()
    A = U * root
    B = root[:, None] * Vh
    r = A.shape[1]
    if r < rank:  # the problem has lower rank than asked: pad with zeros (the product is unchanged)
        A = torch.cat([A, A.new_zeros(A.shape[0], rank - r)], dim=1)
        B = torch.cat([B, B.new_zeros(rank - r, B.shape[1])], dim=0)
    A, B = _fit_range(A, B, out_dtype)
    return A.to(out_device, out_dtype), B.to(out_device, out_dtype)


def _fit_range(A: torch.Tensor, B: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A D, D⁻¹ B)`` with D a diagonal of powers of two (exact in floating point) chosen so that
    both factors fit ``dtype``'s range, when they would not as given; a PrehabError when no such D
    exists. Rounding is relative, so the rescaling costs no precision."""
    if not dtype.is_floating_point or A.numel() == 0 or B.numel() == 0:
        return A, B
    limit = torch.finfo(dtype).max / 4  # headroom for the sums of the matmuls
    a = A.abs().amax(dim=0)
    b = B.abs().amax(dim=1)
    if max(float(a.max()), float(b.max())) <= limit:
        return A, B
    live = (a > 0) & (b > 0)
    ratio = torch.where(live, b / torch.where(live, a, torch.ones_like(a)), torch.ones_like(a))
    c = torch.exp2(torch.round(0.5 * torch.log2(ratio)))  # a·c ≈ b/c ≈ √(a·b)
    A, B = A * c, B / c[:, None]
    if max(float(A.abs().max()), float(B.abs().max())) > limit:
        raise PrehabError(
            f"the low-rank factors exceed the range of {dtype} (largest entry "
            f"{max(float(A.abs().max()), float(B.abs().max())):.3g}); compress the layer in float32, "
            f"or pass damping > 0 to regularize an ill-conditioned covariance"
        )
    return A, B


def _validate(W: torch.Tensor, rank) -> int:
    """Check W [out, in] (real, finite) and rank; returns rank as an int."""
    _check_real("W", W)
    if W.dim() != 2:
        raise PrehabError(f"W must be a 2-D [out, in] weight, got shape {tuple(W.shape)}")
    rank = check_rank(rank)
    if not torch.isfinite(W).all():
        raise PrehabError("W contains NaN or Inf; check the model's weights")
    return rank


def whitened_lowrank(
    W: torch.Tensor, gram: torch.Tensor, rank: int, *, damping: float = 0.0,
    factor: WhiteningFactor | None = None,
):
    """SVD-LLM: the rank-``rank`` ``W' = U V`` minimizing ``‖x Wᵀ − x W'ᵀ‖_F`` with ``gram = xᵀx``.

    Returns ``(U [out, rank], V [rank, in])`` in W's dtype. With ``gram = R Rᵀ``:
    ``W' = (W R)_r R⁻¹``; singular grams give the minimum-norm optimum. ``factor`` reuses a
    :func:`whitening_factor` of ``gram`` already computed (layers that share an input).
    """
    rank = _validate(W, rank)
    _check_square("gram", gram, W.shape[1])
    F = factor if factor is not None else whitening_factor(gram, damping)
    W64 = W.detach().to(torch.float64)
    M = W64 @ F.R
    U, S, Vh = truncated_svd(M, rank)
    return balanced_factors(U, S, F.right_solve(Vh), rank, W.dtype, W.device)


def anchored_lowrank(
    W: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, rank: int, *, damping: float = 0.0,
    factor: WhiteningFactor | None = None,
):
    """AA-SVD: the rank-``rank`` ``W'`` minimizing ``‖x Wᵀ − x' W'ᵀ‖_F``.

    ``x`` are the layer's inputs in the original model, ``x'`` its inputs in the partly compressed
    model on the same tokens; ``cross = xᵀx'`` and ``gram = x'ᵀx'``. With ``gram = R Rᵀ`` the
    objective equals ``‖M − W'R‖_F²`` plus a constant, ``M = W·cross·R⁻ᵀ``, hence
    ``W' = (M)_r R⁻¹``. With ``cross = gram`` this is exactly :func:`whitened_lowrank`.
    """
    rank = _validate(W, rank)
    d = W.shape[1]
    _check_square("gram", gram, d)
    _check_square("cross", cross, d)
    F = factor if factor is not None else whitening_factor(gram, damping)
    W64 = W.detach().to(torch.float64)
    M = F.right_solve_t(W64 @ cross.detach().to(torch.float64))
    U, S, Vh = truncated_svd(M, rank)
    return balanced_factors(U, S, F.right_solve(Vh), rank, W.dtype, W.device)


def objective(W, W_new, gram_x, cross, gram_xp) -> torch.Tensor:
    """``‖x Wᵀ − x' W_newᵀ‖_F²`` from statistics (float64):
    ``tr(W G_x Wᵀ) − 2 tr(W C W_newᵀ) + tr(W_new G_x' W_newᵀ)``."""
    W = W.to(torch.float64)
    Wn = W_new.to(torch.float64)
    t1 = ((W @ gram_x.to(torch.float64)) * W).sum()
    t2 = ((W @ cross.to(torch.float64)) * Wn).sum()
    t3 = ((Wn @ gram_xp.to(torch.float64)) * Wn).sum()
    return t1 - 2 * t2 + t3


def optimal_objective(W, gram_x, cross, gram_xp, rank: int) -> torch.Tensor:
    """The minimum of :func:`objective` over rank-``rank`` W' (AA-SVD's theorem):
    ``tr(W G_x Wᵀ) − Σ_{i≤r} σ_i(M)²`` with ``M = W·cross·R⁻ᵀ``."""
    F = whitening_factor(gram_xp)
    W = W.to(torch.float64)
    M = F.right_solve_t(W @ cross.to(torch.float64))
    S = torch.linalg.svdvals(M)
    t1 = ((W @ gram_x.to(torch.float64)) * W).sum()
    return t1 - S[:rank].square().sum()
