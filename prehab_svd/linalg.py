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

from dataclasses import dataclass

import torch

from .errors import PrehabError

__all__ = [
    "WhiteningFactor",
    "whitening_factor",
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


def _check_square(name: str, A: torch.Tensor, d: int) -> None:
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] != d:
        raise PrehabError(
            f"{name} must be a square [{d}, {d}] matrix matching W's input width, got shape "
            f"{tuple(A.shape)}"
        )
    if not torch.isfinite(A).all():
        raise PrehabError(f"{name} contains NaN or Inf; check the calibration activations")


def whitening_factor(gram: torch.Tensor, damping: float = 0.0) -> WhiteningFactor:
    """Factor ``gram = R Rᵀ`` in float64 (see the module docstring for the singular case)."""
    G = gram.detach().to(torch.float64)
    G = 0.5 * (G + G.T)
    d = G.shape[0]
    trace = torch.diagonal(G).sum()
    if damping > 0:
        G = G + (damping * trace / d) * torch.eye(d, dtype=G.dtype, device=G.device)
    if trace <= 0:
        # All-zero statistics: no direction is ever visited; the optimum is W' = 0.
        return WhiteningFactor(
            kind="eigen",
            R=G.new_zeros(d, 0),
            Q=G.new_zeros(d, 0),
            sqrt_eig=G.new_zeros(0),
        )
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        diag2 = torch.diagonal(L).square()
        if diag2.min() > _CHOL_RCOND * diag2.max():
            return WhiteningFactor(kind="cholesky", R=L)
    evals, evecs = torch.linalg.eigh(G)
    cutoff = evals.abs().max() * max(d, 1) * _EIG_RTOL
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
    """Balanced factors ``U √S`` and ``√S Vh``, zero-padded to exactly ``rank`` columns/rows."""
    root = S.sqrt()
    A = U * root
    B = root[:, None] * Vh
    r = A.shape[1]
    if r < rank:  # the problem has lower rank than asked: pad with zeros (the product is unchanged)
        A = torch.cat([A, A.new_zeros(A.shape[0], rank - r)], dim=1)
        B = torch.cat([B, B.new_zeros(rank - r, B.shape[1])], dim=0)
    return A.to(out_device, out_dtype), B.to(out_device, out_dtype)


def _validate(W: torch.Tensor, rank: int) -> None:
    if W.dim() != 2:
        raise PrehabError(f"W must be a 2-D [out, in] weight, got shape {tuple(W.shape)}")
    if not isinstance(rank, int) or rank < 1:
        raise PrehabError(f"rank must be a positive integer, got {rank!r}")
    if not torch.isfinite(W).all():
        raise PrehabError("W contains NaN or Inf")


def whitened_lowrank(
    W: torch.Tensor, gram: torch.Tensor, rank: int, *, damping: float = 0.0,
    factor: WhiteningFactor | None = None,
):
    """SVD-LLM: the rank-``rank`` ``W' = U V`` minimizing ``‖x Wᵀ − x W'ᵀ‖_F`` with ``gram = xᵀx``.

    Returns ``(U [out, rank], V [rank, in])`` in W's dtype. With ``gram = R Rᵀ``:
    ``W' = (W R)_r R⁻¹``; singular grams give the minimum-norm optimum. ``factor`` reuses a
    :func:`whitening_factor` of ``gram`` already computed (layers that share an input).
    """
    _validate(W, rank)
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
    _validate(W, rank)
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
