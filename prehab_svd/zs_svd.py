"""ZS-SVD's global selection of singular components by the zero-sum rule.

Each targeted matrix W [m, n] is whitened (A = W·L, L the factor of its input covariance) and
decomposed, A = Σᵢ σᵢ uᵢ vᵢᵀ. Dropping component i changes the task loss, to first order, by
``ΔLᵢ = −σᵢ · uᵢᵀ H vᵢ`` with ``H = G·L⁻ᵀ`` the task-loss gradient in whitened coordinates.

Selection (:func:`zero_sum_select`): every matrix offers one candidate, its smallest remaining σ. The
candidates sit in two min-heaps by |ΔL|, one for ΔL ≥ 0 and one for ΔL < 0. While the parameters kept
exceed the budget: if the running sum of the chosen ΔL is ≤ 0, take the smallest |ΔL| from the
positive heap, else from the negative one (the other when one is empty), add its ΔL to the running
sum, and let its matrix offer its next smallest σ. So the chosen changes keep summing to about zero.

Parameter accounting with the break-even rank ``r* = floor((m·n − 1)/(m + n))``: a matrix of rank above
r* is stored dense (m·n parameters; dropping a σ there saves nothing yet); reaching r* saves
``m·n − r*·(m + n)``, and each σ dropped below r* saves ``m + n``. A matrix that ends above r* keeps its
original dense weight. The loop stops at the first drop that brings the parameters kept to or below
the budget, so the budget is met exactly in the sense that one drop fewer would exceed it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .errors import PrehabError

__all__ = ["MatrixCandidates", "Selection", "break_even_rank", "zero_sum_select", "predicted_changes",
           "whitened_spectrum", "projected_correction", "corrected_lowrank"]


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense m×n matrix."""
    return (m * n - 1) // (m + n)


@dataclass
class MatrixCandidates:
    """One matrix's components, largest σ first: ``sigma`` [k] and predicted changes ``delta`` [k]."""

    name: str
    m: int
    n: int
    sigma: torch.Tensor
    delta: torch.Tensor
    min_rank: int = 1

    def dense_params(self) -> int:
        return self.m * self.n

    def params(self, rank: int) -> int:
        return self.m * self.n if rank > break_even_rank(self.m, self.n) else rank * (self.m + self.n)


@dataclass
class Selection:
    ranks: dict  # name -> rank (None: stays dense)
    params_kept: int
    params_dense: int
    budget: int
    drops: int  # components dropped (including those of matrices that revert to dense)
    running_sum: float  # Σ ΔL of the drops
    order: list  # the drops in the order taken: (matrix name, component index, largest σ = 0)


def zero_sum_select(matrices: list, keep_ratio: float) -> Selection:
    """Ranks under the budget ``floor(keep_ratio · Σ m·n)`` parameters by the zero-sum rule."""
    if not matrices:
        raise PrehabError("zero-sum selection needs at least one matrix")
    if not (0 < keep_ratio <= 1):
        raise PrehabError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    dense = sum(c.dense_params() for c in matrices)
    budget = math.floor(keep_ratio * dense)
    rank = []
    for c in matrices:
        k = int(c.sigma.numel())
        if c.delta.numel() != k or k != min(c.m, c.n):
            raise PrehabError(f"matrix '{c.name}': need min(m, n) = {min(c.m, c.n)} singular values and "
                              f"predicted changes, got {k} and {c.delta.numel()}")
        if not (1 <= c.min_rank <= k):
            raise PrehabError(f"matrix '{c.name}': min_rank {c.min_rank} must be in [1, {k}]")
        rank.append(k)
    deltas = [c.delta.detach().to(torch.float64).cpu().tolist() for c in matrices]
    kept = sum(c.params(r) for c, r in zip(matrices, rank))
    pos, neg = [], []  # (|ΔL|, matrix index) -- one entry per matrix at most

    def offer(j):
        if rank[j] > matrices[j].min_rank:
            d = deltas[j][rank[j] - 1]
            heapq.heappush(pos if d >= 0 else neg, (abs(d), j))

    for j in range(len(matrices)):
        offer(j)
    total, order = 0.0, []
    while kept > budget:
        first, second = (pos, neg) if total <= 0 else (neg, pos)
        heap = first if first else second
        if not heap:
            raise PrehabError(
                f"keep_ratio {keep_ratio} cannot be met: every matrix is at its minimum rank with "
                f"{kept:,} parameters kept for a budget of {budget:,}; lower the minimum rank or raise "
                "keep_ratio")
        _, j = heapq.heappop(heap)
        c = matrices[j]
        before = c.params(rank[j])
        total += deltas[j][rank[j] - 1]
        order.append((c.name, rank[j] - 1))
        rank[j] -= 1
        kept -= before - c.params(rank[j])
        offer(j)
    ranks = {c.name: (None if r > break_even_rank(c.m, c.n) else r) for c, r in zip(matrices, rank)}
    return Selection(ranks=ranks, params_kept=kept, params_dense=dense, budget=budget, drops=len(order),
                     running_sum=total, order=order)


def predicted_changes(A_svd, H: torch.Tensor) -> torch.Tensor:
    """``ΔLᵢ = −σᵢ · uᵢᵀ H vᵢ`` for the SVD ``(U, S, Vh)`` of a whitened matrix and its whitened gradient."""
    U, S, Vh = A_svd
    g = ((U.mT @ H) * Vh).sum(dim=1)  # uᵢᵀ H vᵢ, with vᵢ the rows of Vh
    return -S * g


def whitened_spectrum(W: torch.Tensor, factor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and ΔL of every component of ``A = W·R`` (``factor``: a :class:`~prehab_svd.linalg.WhiteningFactor`),
    float64, largest σ first, zero-padded to min(m, n) when the covariance is singular."""
    W64 = W.detach().to(torch.float64)
    A = W64 @ factor.R
    H = factor.right_solve_t(grad.detach().to(torch.float64))  # G R⁻ᵀ
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    delta = predicted_changes((U, S, Vh), H)
    k = min(W.shape)
    if S.numel() < k:
        pad = S.new_zeros(k - S.numel())
        S, delta = torch.cat([S, pad]), torch.cat([delta, pad])
    return S, delta


def projected_correction(A: torch.Tensor, A_r: torch.Tensor, H: torch.Tensor, *, eps: float = 1e-6):
    """``A_r + Σⱼ αⱼ Hⱼ`` with ``α = (K + eps·tr(K)/k·I)⁻¹ b``, ``Kᵢⱼ = ⟨Hᵢ, Hⱼ⟩``, ``bⱼ = ⟨Hⱼ, A − A_r⟩``:
    the component of the truncation error ``A − A_r`` in the span of the gradients ``H`` [k, m, n] is
    put back, so to first order the k losses no longer see the truncation (``⟨Hⱼ, A_c − A⟩ ≈ 0``)."""
    Hf = H.reshape(H.shape[0], -1)
    K = Hf @ Hf.T
    k = K.shape[0]
    tr = torch.diagonal(K).sum()
    if not tr > 0:
        return A_r
    eye = torch.eye(k, dtype=K.dtype, device=K.device)
    alpha = torch.linalg.solve(K + (eps * tr / k) * eye, Hf @ (A - A_r).reshape(-1))
    return A_r + (alpha @ Hf).reshape(A.shape)


def corrected_lowrank(W: torch.Tensor, factor, rank: int, grads: torch.Tensor, *, eps: float = 1e-6):
    """Whitened truncation, one projected correction step, then re-truncation.

    With ``A = W R``, ``A_r`` its rank-``rank`` truncation, ``δ = A − A_r`` and the whitened gradients
    ``Hⱼ = Gⱼ R⁻ᵀ`` (``grads``: [k, m, n], e.g. the task gradients of k groups of calibration
    sequences): ``α = (K + eps·tr(K)/k·I)⁻¹ b`` with ``Kᵢⱼ = ⟨Hᵢ, Hⱼ⟩`` and ``bⱼ = ⟨Hⱼ, δ⟩``, i.e. the
    part of δ in the span of the gradients (the best step along them); ``A_c = A_r + Σⱼ αⱼ Hⱼ`` is
    truncated to ``rank`` again and mapped back: ``W' = (A_c)_r R⁻¹``. Returns balanced factors like
    :func:`prehab_svd.linalg.whitened_lowrank`.
    """
    from .linalg import closed_form_factors, truncated_svd

    W64 = W.detach().to(torch.float64)
    A = W64 @ factor.R
    U, S, Vh = truncated_svd(A, rank)
    A_r = (U * S) @ Vh
    H = torch.stack([factor.right_solve_t(g.to(torch.float64)) for g in grads.detach()])
    A_c = projected_correction(A, A_r, H, eps=eps)
    return closed_form_factors(W64, A_c, factor, rank, W.dtype, W.device)
