"""Closed-form low-rank factorizations under activation statistics.

All factorizations run in float64 (the inputs are upcast); the returned factors are cast back to the
dtype of ``W``. Notation: rows of an activation matrix ``x`` are tokens, a layer computes ``x Wᵀ`` with
``W`` of shape [out, in], and the Gram matrices are ``gram = x'ᵀx'`` and ``cross = xᵀx'`` of shape
[in, in] (any positive normalization, as long as both use the same one).

The whitening factor of a Gram matrix is ``R`` with ``gram = R Rᵀ``. Every decision about it is made on
the *equilibrated* Gram ``Ĝ = D^{-1/2} G D^{-1/2}`` (``D = diag(G)``, so ``Ĝ`` has a unit diagonal):
a rescaling of the input channels, which changes nothing in the problem, then changes nothing in the
answer either (LLM activations have channels 10⁴ times larger than others; a cut-off relative to the
largest eigenvalue of ``G`` itself would drop the small channels' directions as "noise").

* ``Ĝ`` positive definite above the noise floor ``τ``: ``R = D^{1/2} L̂`` with ``L̂`` the lower Cholesky
  factor of ``Ĝ``; ``R⁻¹`` is only ever applied through triangular solves. The answer is exact.
* otherwise ``R = D^{1/2} Q̂₊ Λ̂₊^{1/2}`` from the eigenvalues of ``Ĝ`` above ``τ``; the directions
  below it are treated as never visited by the calibration tokens, and
  :func:`closed_form_factors` decides the answer there (by default the limit of a vanishing
  per-channel jitter; ``unvisited="zero"``: the minimum-norm answer).
* channels whose diagonal entry is exactly 0 (never active) are unvisited too, and get zero weight.

**The noise floor** ``τ`` (on the eigenvalues of ``Ĝ``). A Gram accumulated in floating point carries a
rounding error ``E`` with ``|E_ij| ≤ γ_n u Σ_t |x_ti x_tj| ≤ γ_n u √(G_ii G_jj)`` (Cauchy–Schwarz), so in
equilibrated coordinates ``|Ê_ij| ≤ γ_n u`` for a sum over ``n`` tokens with unit roundoff ``u``;
rounding errors behave like independent zero-mean variables, which gives ``|Ê_ij| ≲ √n·u`` (Higham &
Mary's probabilistic bound), and a symmetric matrix of such entries has ``‖Ê‖₂ ≲ 2√d·√n·u``. By Weyl's
inequality an eigenvalue of ``Ĝ`` below ``‖Ê‖₂`` cannot be told from zero: it is rounding, not data.
:func:`rounding_floor` gives ``τ = 2·√(d·n)·u`` of the product that made the statistics (``n`` the most
tokens one product summed: the accumulator sums the per-batch products in float64, whose own rounding
is far below), plus ``d·1e-13`` for the float64 factorization itself. fp32 products of 2,048-token
batches at d = 576: ``τ ≈ 1.3e-4``; float64 statistics: ``τ ≈ 6e-11``.

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
    "equilibrate",
    "rounding_floor",
    "check_rank",
    "whitened_lowrank",
    "anchored_lowrank",
    "check_anchor",
    "truncated_svd",
    "balanced_factors",
    "closed_form_factors",
    "objective",
    "optimal_objective",
]

# The float64 factorization's own floor on the eigenvalues of the equilibrated Gram, per dimension
# (like numpy.linalg.pinv's rcond, scaled by d).
_EIG_RTOL = 1e-13
# A negative eigenvalue beyond this fraction of the largest is an error, not rounding (an fp32 gram
# accumulated over many batches stays orders of magnitude inside it).
_NOT_PSD_RTOL = 1e-2


@dataclass
class WhiteningFactor:
    """``gram = R Rᵀ`` in float64, ``R = D^{1/2} F̂`` with ``F̂`` a factor of the equilibrated Gram on its
    live (nonzero-diagonal) channels: triangular (``kind="cholesky"``) or an eigen pseudo-factor."""

    kind: str  # "cholesky" (every channel live, Ĝ positive definite) or "eigen"
    R: torch.Tensor  # [d, k]: lower triangular [d, d] for "cholesky"
    Q: torch.Tensor | None = None  # eigen: [d_live, k], eigenvectors of Ĝ
    sqrt_eig: torch.Tensor | None = None  # eigen: [k]
    scale: torch.Tensor | None = None  # [d_live]: √diag(gram) of the live channels
    live: torch.Tensor | None = None  # eigen: [d_live] indices of the live channels (None: all)
    L: torch.Tensor | None = None  # cholesky: L̂, the factor of Ĝ
    floor: float = 0.0  # the noise floor τ the decisions used (on the eigenvalues of Ĝ)

    @property
    def rank(self) -> int:
        return self.R.shape[1]

    @property
    def channel_scale(self) -> torch.Tensor:
        """``√diag(gram)`` for every channel ([d], 0 on dead channels)."""
        if self.live is None:
            return self.scale
        return self.R.new_zeros(self.R.shape[0]).index_copy_(0, self.live, self.scale)

    def right_solve(self, B: torch.Tensor) -> torch.Tensor:
        """``B R⁻¹`` (``B R⁺`` for the pseudo-factor); B has k columns, the result d."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.L, B, upper=False, left=False) / self.scale
        live = (B / self.sqrt_eig) @ self.Q.T / self.scale
        if self.live is None:
            return live
        out = B.new_zeros(B.shape[0], self.R.shape[0])
        out[:, self.live] = live
        return out

    def right_solve_t(self, B: torch.Tensor) -> torch.Tensor:
        """``B R⁻ᵀ`` (``B R⁺ᵀ`` for the pseudo-factor); B has d columns, the result k."""
        if self.kind == "cholesky":
            # B R⁻ᵀ = B D^{-1/2} L̂⁻ᵀ = (L̂⁻¹ (B D^{-1/2})ᵀ)ᵀ
            return torch.linalg.solve_triangular(self.L, (B / self.scale).T, upper=False, left=True).T
        Bl = B if self.live is None else B[:, self.live]
        return ((Bl / self.scale) @ self.Q) / self.sqrt_eig


def rounding_floor(d: int, product_dtype: torch.dtype = torch.float64, tokens_per_product: int = 1) -> float:
    """The noise floor ``τ`` on the eigenvalues of an equilibrated Gram of width ``d`` whose sums came
    from ``product_dtype`` products over at most ``tokens_per_product`` tokens each (see the module
    docstring for the derivation): ``2·√(d·n)·u + d·1e-13``."""
    u = torch.finfo(product_dtype).eps / 2
    n = max(int(tokens_per_product), 1)
    return 2.0 * math.sqrt(max(d, 1) * n) * u + max(d, 1) * _EIG_RTOL


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


def equilibrate(G: torch.Tensor):
    """``(Ĝ, s, live)``: the equilibrated Gram ``Ĝ = G_ll / (s sᵀ)`` on the live channels ``l`` (those
    with ``G_ii > 0``), ``s = √diag(G_ll)``, and ``live`` their indices (None when every channel is
    live). ``G``: symmetric float64 with a nonnegative diagonal."""
    diag = torch.diagonal(G)
    mask = diag > 0
    live = None if bool(mask.all()) else torch.nonzero(mask).flatten()
    Gl = G if live is None else G[live][:, live]
    s = torch.diagonal(Gl).sqrt()
    Gh = Gl / s[:, None] / s[None, :]
    return 0.5 * (Gh + Gh.T), s, live


def check_damping(damping) -> None:
    """``damping`` (relative diagonal damping of a Gram matrix) must be a finite number >= 0."""
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not (
            math.isfinite(damping) and damping >= 0):
        raise PrehabError(f"damping must be a finite number >= 0, got {damping!r}")


def whitening_factor(gram: torch.Tensor, damping: float = 0.0, *, floor: float | None = None) -> WhiteningFactor:
    """Factor ``gram = R Rᵀ`` in float64, deciding on the equilibrated Gram (module docstring).

    ``floor``: the noise floor ``τ`` on the eigenvalues of the equilibrated Gram, from the precision
    of the statistics (:func:`rounding_floor`; what the accumulators report as ``noise_floor``).
    None: float64 statistics (``rounding_floor(d)``). A gram with an eigenvalue below
    ``-_NOT_PSD_RTOL`` times the largest (equilibrated) is no covariance (rounding makes far smaller
    ones): a PrehabError, instead of an "optimum" of an unbounded objective."""
    _check_square("gram", gram, None)
    check_damping(damping)
    d = gram.shape[0]
    if floor is None:
        floor = rounding_floor(d)
    if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or not (math.isfinite(floor) and floor >= 0):
        raise PrehabError(f"floor must be a finite number >= 0, got {floor!r}")
    tau = max(float(floor), max(d, 1) * _EIG_RTOL)
    G = gram.detach().to(torch.float64)
    G = 0.5 * (G + G.T)
    diag = torch.diagonal(G)
    trace = diag.sum()
    if damping > 0 and trace > 0:
        G = G + (damping * trace / d) * torch.eye(d, dtype=G.dtype, device=G.device)
        diag = torch.diagonal(G)
    if bool((diag < 0).any()):
        i = int(torch.argmin(diag))
        raise PrehabError(f"gram is not positive semi-definite (diagonal entry {float(diag[i]):.3g} at channel "
                          f"{i}); it must be a sum of xᵀx over tokens: check how it was accumulated")
    Gh, s, live = equilibrate(G)
    if s.numel() == 0:
        # All-zero statistics: no direction is ever visited; the optimum is W' = 0.
        return WhiteningFactor(kind="eigen", R=G.new_zeros(d, 0), Q=G.new_zeros(0, 0), sqrt_eig=s, scale=s,
                               live=live, floor=tau)
    all_live = live is None
    if all_live:
        L, info = torch.linalg.cholesky_ex(Gh)
        # The pivots only bound λ_min from above (a singular gram can pass with its smallest pivot well
        # above τ), so the smallest eigenvalue is estimated as well.
        if int(info) == 0 and float(torch.diagonal(L).square().min()) > tau and _smallest_eig_estimate(L) > tau:
            return WhiteningFactor(kind="cholesky", R=s[:, None] * L, scale=s, L=L, floor=tau)
    evals, evecs = torch.linalg.eigh(Gh)  # ascending
    top = evals.abs().max()
    bad = bool(evals[0] < -_NOT_PSD_RTOL * top)
    if not bad and evals[0] < -tau:  # beyond rounding: judge the unscaled gram as well
        raw = torch.linalg.eigvalsh(G)
        bad = bool(raw[0] < -_NOT_PSD_RTOL * raw.abs().max())
    if bad:
        raise PrehabError(
            f"gram is not positive semi-definite (eigenvalue {float(evals[0]):.3g} of the equilibrated gram, "
            f"largest {float(top):.3g}); it must be a sum of xᵀx over tokens: check how it was accumulated"
        )
    keep = evals > tau
    Q = evecs[:, keep]
    se = evals[keep].sqrt()
    R = s[:, None] * Q * se
    if not all_live:
        R = G.new_zeros(d, Q.shape[1]).index_copy_(0, live, R)
    return WhiteningFactor(kind="eigen", R=R, Q=Q, sqrt_eig=se, scale=s, live=live, floor=tau)


# The Gram route's cut-offs (see truncated_svd): the smallest kept eigenvalue of the Gram must be at
# least _EIGH_TAU times the largest (σ_r ≥ 10⁻³·σ₁), and the smaller side of M at least _EIGH_MIN_DIM
# (below that the SVD costs about a millisecond, and stays the reference).
_EIGH_TAU = 1e-6
_EIGH_MIN_DIM = 128


def _eigh_tau(n: int) -> float:
    """The Gram route's threshold on ``σ_r²/σ₁²`` for a Gram of order ``n``: ``max(τ, √n·u·10⁸)``, so
    that the typical error ``√n·u·σ₁²/σ_r²`` of the kept components stays at 1e-8 or below."""
    u = torch.finfo(torch.float64).eps / 2
    return max(_EIGH_TAU, math.sqrt(max(n, 1)) * u * 1e8)


def _truncated_eigh(M: torch.Tensor, rank: int):
    """``(U_r, S_r, Vh_r)`` of a float64 M from the eigendecomposition of the Gram of its smaller side,
    or None where that route declines: M not float64, an empty or all-zero M, a failed ``eigh``, or
    a kept ``σ_r² < τ·σ₁²`` (:func:`_eigh_tau`), whose components the Gram cannot resolve."""
    if M.dtype != torch.float64 or M.dim() != 2 or min(M.shape) == 0:
        return None
    m, n = M.shape
    tall = m >= n
    G = M.mT @ M if tall else M @ M.mT  # [k, k], k = min(m, n)
    k = G.shape[0]
    r = min(int(rank), k)
    try:
        lam, Q = torch.linalg.eigh(G)  # ascending
    except RuntimeError:  # torch.linalg.LinAlgError (no convergence, non-finite entries)
        return None
    lam_1, lam_r = float(lam[-1]), float(lam[k - r])
    if not (lam_1 > 0 and math.isfinite(lam_1) and lam_r >= _eigh_tau(k) * lam_1):
        return None
    Q = Q[:, k - r:].flip(1)  # the top r eigenvectors, descending
    B = M @ Q if tall else M.mT @ Q  # [m, r] = U Σ, or [n, r] = V Σ
    # σ from the norms of B rather than √λ: a Rayleigh quotient of MᵀM at the computed eigenvector,
    # computed from M itself, whose error is second order in the eigenvector's.
    S = torch.linalg.vector_norm(B, dim=0)
    S, order = torch.sort(S, descending=True, stable=True)
    Q, B = Q[:, order], B[:, order]
    X = B / S
    if tall:
        return X, S, Q.mT
    return Q, S, X.mT


def truncated_svd(M: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of M in float64: ``(U_r, S_r, Vh_r)``, ``r = min(rank, min(M.shape))``,
    S_r descending.

    **The Gram route.** With ``k = min(m, n)``, the Gram of the smaller side (``MᵀM`` when ``m ≥ n``,
    else ``MMᵀ``; [k, k]) is formed in float64 and decomposed by ``eigh``; its top ``r`` eigenvectors
    are ``V_r`` (resp. ``U_r``), and one product gives the other side: ``M V_r = U_r Σ_r`` (resp.
    ``Mᵀ U_r = V_r Σ_r``), whose column norms are ``σ``. At the SmolLM2 shapes this takes about half
    the time of ``torch.linalg.svd`` or less.

    *Why it is accurate, and where it is not.* Forming the Gram and ``eigh`` (backward stable) amount
    to decomposing exactly a ``MᵀM + E`` with ``‖E‖₂ ≲ c·k·u·σ₁²`` (``u = 2⁻⁵³``; the rounding errors
    are random in sign, so ``√k·u·σ₁²`` is the typical size). Then

    * ``λ_i`` is off by up to ``‖E‖₂`` (Weyl): a relative error ``k·u·(σ₁/σ_i)²`` in ``σ_i²``, the
      squared condition number that makes the Gram useless for the small singular values;
    * the recovered side loses orthogonality by as much: with ``V`` the exact eigenvectors of
      ``MᵀM + E``, ``U = M V Σ⁻¹`` has ``UᵀU = I − Σ⁻¹ (VᵀEV) Σ⁻¹``, entries at most
      ``‖E‖₂/(σ_iσ_j) ≤ ‖E‖₂/σ_r²``, whatever the gaps between the singular values;
    * the product ``U_r Σ_r V_rᵀ = M V_r V_rᵀ`` is M projected onto a subspace whose captured energy
      ``tr(V_rᵀ MᵀM V_r)`` is within ``2r·‖E‖₂`` of the optimum: the truncation error is right to
      ``~r·k·u`` of ``‖M‖²`` in every case.

    So the route is taken only when the smallest kept eigenvalue clears ``λ_r ≥ τ·λ₁``, i.e.
    ``σ_r ≥ √τ·σ₁``, with ``τ = max(1e-6, √k·u·1e8)`` (:func:`_eigh_tau`): the typical error
    ``√k·u/τ`` of ``σ_r²`` and of ``U_rᵀU_r`` is then at most 1e-8 (τ = 1e-6 up to k ≈ 8,000; the
    worst case ``k·u/τ`` is 6e-8 at k = 576). Measured on spectra logspace(0, -8) at k = 576 … 1024,
    the components with ``σ_i² ≥ 1e-6·σ₁²`` have ``U_rᵀU_r − I`` below 6e-11, and ``σ`` (column
    norms: a Rayleigh quotient computed from M, second order in the eigenvector's error) within 3e-14
    relative. A spectrum that falls faster (or an all-zero M, a non-float64 M, a smaller side below
    ``_EIGH_MIN_DIM`` = 128, where the SVD costs a millisecond) takes ``torch.linalg.svd``, so no
    component below the threshold is ever returned from the Gram. The singular vectors' signs are
    arbitrary on both routes (the products ``U_r S_r Vh_r`` agree to rounding).
    """
    if min(M.shape) == 0:
        return M.new_zeros(M.shape[0], 0), M.new_zeros(0), M.new_zeros(0, M.shape[1])
    if min(M.shape) >= _EIGH_MIN_DIM:
        out = _truncated_eigh(M, rank)
        if out is not None:
            return out
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


UNVISITED = ("keep", "zero")


def closed_form_factors(W64: torch.Tensor, M: torch.Tensor, F: WhiteningFactor, rank: int, out_dtype,
                        out_device, unvisited: str = "keep"):
    """Balanced rank-``rank`` factors of the closed-form answer ``W' = U_r U_rᵀ (M R⁻ + N₀)``, where
    ``U_r S Vh`` is the truncated SVD of the whitened target ``M`` [out, k] and ``N₀`` is W's action on
    the input directions the statistics never saw (below the noise floor, or dead channels).

    On the seen directions every choice gives the same optimum. On the unseen ones the objective is
    flat, and ``unvisited`` picks the answer:

    * ``"keep"`` (default): ``N₀ = W − (W R) R⁻``, the limit ε → 0 of the problem with a
      scale-invariant jitter ``ε·diag(G)`` added to the statistics (to ``cross`` as well): W keeps its
      own action there, projected onto the kept output directions. For svd-llm it is exactly
      ``W' = U_r U_rᵀ W`` on the live channels; a dead channel (``G_ii = 0``: never active) gets no
      jitter, and zero weight. When ``M`` has rank ``k < rank`` the remaining ``rank − k`` directions are
      the leading ones of what is left of ``N₀`` (the same limit). A Cholesky factor has ``N₀ = 0``.
    * ``"zero"``: ``N₀ = 0``, the minimum-norm answer in the equilibrated metric (zero weight on the
      unseen directions). It generalizes worse when the calibration tokens are few.
    """
    if unvisited not in UNVISITED:
        raise PrehabError(f"unvisited must be one of {', '.join(UNVISITED)}, got {unvisited!r}")
    U, S, Vh = truncated_svd(M, rank)
    if unvisited == "zero" or F.kind == "cholesky":
        return balanced_factors(U, S, F.right_solve(Vh), rank, out_dtype, out_device)
    N0 = W64 - F.right_solve(W64 @ F.R)
    scale = F.channel_scale  # √diag(G); 0: dead channel
    N0 = N0 * (scale > 0)  # a dead channel gets no jitter in the limit either: it keeps zero weight
    tol = (S.max() if S.numel() else W64.new_zeros(())) * max(M.shape) * 1e-15
    k = int((S > tol).sum())
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    root = S.sqrt()
    A = U * root
    B = (S[:, None] * F.right_solve(Vh) + U.T @ N0) / root[:, None]
    if k < rank:
        # The rest of the rank goes to the leading directions of N₀ outside U's span, measured in the
        # equilibrated metric (N₀ D^{1/2}), like everything else here.
        resid = N0 - U @ (U.T @ N0)
        Uc, Sc, _ = truncated_svd(resid * scale, rank - k)
        Uc = Uc[:, Sc > (Sc.max() if Sc.numel() else 0) * max(M.shape) * 1e-15]
        if Uc.shape[1]:
            Bc = Uc.T @ resid
            rc = torch.linalg.vector_norm(Bc, dim=1).sqrt().clamp_min(1e-300)
            A = torch.cat([A, Uc * rc], dim=1)
            B = torch.cat([B, Bc / rc[:, None]], dim=0)
    r = A.shape[1]
    if r < rank:
        A = torch.cat([A, A.new_zeros(A.shape[0], rank - r)], dim=1)
        B = torch.cat([B, B.new_zeros(rank - r, B.shape[1])], dim=0)
    A, B = _fit_range(A, B, out_dtype)
    return A.to(out_device, out_dtype), B.to(out_device, out_dtype)


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
    factor: WhiteningFactor | None = None, unvisited: str = "keep",
):
    """SVD-LLM: the rank-``rank`` ``W' = U V`` minimizing ``‖x Wᵀ − x W'ᵀ‖_F`` with ``gram = xᵀx``.

    Returns ``(U [out, rank], V [rank, in])`` in W's dtype. With ``gram = R Rᵀ``:
    ``W' = (W R)_r R⁻¹``; on directions a singular gram never saw, ``unvisited`` decides (see
    :func:`closed_form_factors`). ``factor`` reuses a :func:`whitening_factor` of ``gram`` already
    computed (layers that share an input).
    """
    rank = _validate(W, rank)
    _check_square("gram", gram, W.shape[1])
    F = factor if factor is not None else whitening_factor(gram, damping)
    W64 = W.detach().to(torch.float64)
    return closed_form_factors(W64, W64 @ F.R, F, rank, W.dtype, W.device, unvisited)


def anchored_lowrank(
    W: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, rank: int, *, damping: float = 0.0,
    factor: WhiteningFactor | None = None, unvisited: str = "keep", anchor: float = 1.0,
):
    """AA-SVD: the rank-``rank`` ``W'`` minimizing ``‖x Wᵀ − x' W'ᵀ‖_F``.

    ``x`` are the layer's inputs in the original model, ``x'`` its inputs in the partly compressed
    model on the same tokens; ``cross = xᵀx'`` and ``gram = x'ᵀx'``. With ``gram = R Rᵀ`` the
    objective equals ``‖M − W'R‖_F²`` plus a constant, ``M = W·cross·R⁻ᵀ``, hence
    ``W' = (M)_r R⁻¹``. With ``cross = gram`` this is exactly :func:`whitened_lowrank`.

    ``anchor`` = β in [0, 1] moves the target to ``(β·x + (1−β)·x') Wᵀ``: the factors undo the
    fraction β of the upstream error (1: the paper's objective above; 0: fit the partly compressed
    model's own output, whitening by x'). Only the cross term changes, ``β·cross + (1−β)·gram``,
    so the whitening factor is the same for every β. The full correction ``W·cross·gram⁻¹`` is a
    regression of the original outputs on the shifted inputs fit on the calibration tokens; β < 1
    shrinks it toward no correction, which is what generalizes to other tokens (measured:
    :class:`prehab_svd.methods.aa_svd.AnchoredOptions`).
    """
    rank = _validate(W, rank)
    d = W.shape[1]
    _check_square("gram", gram, d)
    _check_square("cross", cross, d)
    anchor = check_anchor(anchor)
    F = factor if factor is not None else whitening_factor(gram, damping)
    W64 = W.detach().to(torch.float64)
    C = cross.detach().to(torch.float64)
    if anchor != 1:
        C = anchor * C + (1 - anchor) * gram.detach().to(torch.float64)
    M = F.right_solve_t(W64 @ C)
    return closed_form_factors(W64, M, F, rank, W.dtype, W.device, unvisited)


def check_anchor(anchor) -> float:
    """``anchor`` of :func:`anchored_lowrank` as a float, or a PrehabError unless it is in [0, 1]."""
    if isinstance(anchor, bool) or not isinstance(anchor, (int, float)) or not 0 <= anchor <= 1:
        raise PrehabError(f"anchor must be a number in [0, 1] (1: the paper's full anchoring), got {anchor!r}")
    return float(anchor)


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
