"""Plain-torch reference implementations of the three ops.

This is the ``"torch"`` backend (the CPU path) and the mathematical definition every Triton/CUDA
kernel is tested against: the math lives here and only here. Functions take already-validated
tensors (the public wrappers in :mod:`prehab_svd.ops` check shapes and dtypes) and do not dispatch.

Shapes, as the custom ops receive them:

- ``covariance_update(G, x, C, y)``: x, y [T, d]; G, C [d, d] fp32/fp64, updated in place.
- ``stable_rank(W, L, kind, state, iters)``: W [B, m, n]; L None, [n, n] or [B, n, n];
  state None or [B, n]; returns (value [B], grad [B, m, n], state [B, n] or [B, 0]).
- ``lowrank_linear(x, U, V, bias)``: x [..., in], V [r, in], U [out, r], bias [out] or None.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "compute_dtype",
    "covariance_update",
    "symmetric_update",
    "top_singular_pair",
    "polar_newton_schulz",
    "stable_rank",
    "lowrank_linear",
    "lowrank_linear_backward",
    "STABLE_ITERS_COLD",
    "STABLE_ITERS_WARM",
    "NUCLEAR_ITERS",
    "NS_QUINTIC",
]

# ---------------------------------------------------------------------------------------------
# covariance update
# ---------------------------------------------------------------------------------------------


def covariance_update(
    G: torch.Tensor, x: torch.Tensor, C: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None
) -> None:
    """``G += xᵀx`` and, if C is given, ``C += xᵀy``, in place, in the accumulators' dtype.

    x and y are upcast to the accumulator dtype before the product (a bf16/fp16 product is exact in
    fp32, so this loses nothing against a tensor-core kernel that accumulates in fp32). G is
    symmetric: only its upper block triangle is multiplied out (:func:`symmetric_update`).
    """
    xa = x.to(G.dtype)
    symmetric_update(G, xa)
    if C is not None:
        C.addmm_(xa.mT, y.to(C.dtype))


# Panels of the symmetric product: at most this many block rows, each at least this wide.
SYM_MAX_PANELS = 4
SYM_MIN_PANEL = 128


def symmetric_update(G: torch.Tensor, x: torch.Tensor) -> None:
    """``G += xᵀx`` from the upper block triangle only, mirrored: ``p`` panels of columns give
    ``p(p+1)/2`` of ``p²`` blocks, i.e. 62.5 % of a full product's multiply-adds at ``p = 4`` (a
    BLAS ``syrk``, which torch does not expose). Each panel row is one GEMM ``x_iᵀ x[:, i:]``, wide
    enough to run at the full GEMM's rate (2 CPU cores, 2,048 tokens: d = 1536 in 34–37 ms against
    59 ms, d = 576 in 5.4 ms against 7.6 ms). The mirrored entries are the same dot products (up to
    the GEMM's summation order), so G is as symmetric as the full product made it."""
    d = x.shape[1]
    panels = min(SYM_MAX_PANELS, d // SYM_MIN_PANEL)
    if panels <= 1:
        G.addmm_(x.mT, x)
        return
    b = -(-d // panels)
    for i in range(0, d, b):
        P = x[:, i:i + b].mT @ x[:, i:]  # [b, d - i]: the diagonal block and everything right of it
        G[i:i + b, i:] += P
        if i + b < d:
            G[i + b:, i:i + b] += P[:, b:].mT


# ---------------------------------------------------------------------------------------------
# stable rank (value and gradient)
# ---------------------------------------------------------------------------------------------

# Power-iteration steps on MᵀM: from a random start, and warm-started from the previous call's vector.
STABLE_ITERS_COLD = 32
STABLE_ITERS_WARM = 4
# Newton–Schulz steps for the polar factor: the last min(6, iters // 2) are cubic, the rest quintic.
NUCLEAR_ITERS = 16
# Aggressive quintic x -> a·x + b·x³ + c·x⁵: pushes small singular values up by ~3.4x per step and maps
# [0, 1] into about [0.68, 1.2] (inside the cubic's basin (0, √3)), but does not converge to 1.
NS_QUINTIC = (3.4445, -4.7750, 2.0315)
_INIT_SEED = 0x5EED


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Stable-rank math runs in fp64 for fp64 input, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_inverse(s: torch.Tensor) -> torch.Tensor:
    """1/s where s > 0, else 0 (a zero matrix has value 0 and gradient 0, never NaN)."""
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))


def power_start(state: Optional[torch.Tensor], B: int, n: int, device, dtype,
                iters: Optional[int]) -> tuple[torch.Tensor, int]:
    """The power iteration's start vectors [B, n] and step count, shared by every backend: ``state``
    when warm, else a fixed-seed normal draw (deterministic); ``iters`` defaults to 32 cold, 4 warm."""
    if iters is None:
        iters = STABLE_ITERS_COLD if state is None else STABLE_ITERS_WARM
    if state is not None:
        return state.to(dtype), iters
    gen = torch.Generator(device=device).manual_seed(_INIT_SEED)
    return torch.randn(B, n, generator=gen, device=device, dtype=dtype), iters


def top_singular_pair(
    M: torch.Tensor, v0: Optional[torch.Tensor], iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triple of each M [B, m, n] by power iteration on MᵀM started from v0 [B, n].

    Returns (sigma1 [B], u1 [B, m], v1 [B, n]) with unit u1, v1 (zero vectors for a zero matrix).
    v0=None starts from a fixed-seed normal vector, so the result is deterministic. The angle to the
    top right vector shrinks by (σ₂/σ₁)² per step; σ₁ = ‖M v‖ is accurate to second order in it.
    """
    B, _, n = M.shape
    v, _ = power_start(v0, B, n, M.device, M.dtype, 0)
    v = v * _safe_inverse(torch.linalg.vector_norm(v, dim=-1, keepdim=True))
    for _ in range(iters):
        w = torch.bmm(M.mT, torch.bmm(M, v.unsqueeze(-1))).squeeze(-1)
        v = w * _safe_inverse(torch.linalg.vector_norm(w, dim=-1, keepdim=True))
    u = torch.bmm(M, v.unsqueeze(-1)).squeeze(-1)
    sigma = torch.linalg.vector_norm(u, dim=-1)
    u = u * _safe_inverse(sigma).unsqueeze(-1)
    return sigma, u, v


def polar_newton_schulz(M: torch.Tensor, iters: int = NUCLEAR_ITERS) -> torch.Tensor:
    """Polar factor U Vᵀ of each M [B, m, n] (in M's dtype) by Newton–Schulz iteration.

    X₀ = M/‖M‖_F has singular values in [0, 1]. ``iters - min(6, iters // 2)`` quintic steps lift the
    small ones fast, then ``min(6, iters // 2)`` classic cubic steps X ← 1.5X − 0.5·XXᵀX converge
    quadratically to exactly 1 (from [0.68, 1.2], 6 steps reach fp64 round-off). The iteration runs on
    the smaller side (transposed when m > n), so XXᵀ is min(m, n)². Singular values below about
    ‖M‖_F·3.4^-(quintic steps) are not lifted: their directions are missing from the result (for a
    rank-deficient M this is the minimum-norm choice U_r V_rᵀ).
    """
    _, m, n = M.shape
    fro = torch.linalg.matrix_norm(M, ord="fro")
    X = M * _safe_inverse(fro)[:, None, None]
    if m > n:
        X = X.mT
    n_cubic = min(6, iters // 2)
    a, b, c = NS_QUINTIC
    for _ in range(iters - n_cubic):
        A = torch.bmm(X, X.mT)
        poly = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        X = torch.baddbmm(X, poly, X, beta=a)  # a·X + (b·A + c·A²)·X
    for _ in range(n_cubic):
        A = torch.bmm(X, X.mT)
        X = torch.baddbmm(X, A, X, beta=1.5, alpha=-0.5)
    return X.mT if m > n else X


def _stable_value_grad(
    M: torch.Tensor, state: Optional[torch.Tensor], iters: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sr = ‖M‖_F²/σ₁², d sr/dM = 2M/σ₁² − 2‖M‖_F²/σ₁³ · u₁v₁ᵀ."""
    _, iters = power_start(state, 0, 0, M.device, M.dtype, iters)
    sigma, u, v = top_singular_pair(M, state, iters)
    fro2 = M.square().sum(dim=(1, 2))
    inv_s = _safe_inverse(sigma)
    value = fro2 * inv_s.square()
    grad = 2.0 * inv_s.square()[:, None, None] * M
    grad = grad - (2.0 * value * inv_s)[:, None, None] * (u.unsqueeze(-1) * v.unsqueeze(-2))
    return value, grad, v


def _nuclear_value_grad(M: torch.Tensor, iters: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """nr = ‖M‖_*²/‖M‖_F², d nr/dM = 2‖M‖_*·P/‖M‖_F² − 2‖M‖_*²·M/‖M‖_F⁴ with P = U Vᵀ."""
    P = polar_newton_schulz(M, NUCLEAR_ITERS if iters is None else iters)
    nuc = (P * M).sum(dim=(1, 2))  # ⟨UVᵀ, UΣVᵀ⟩ = Σσᵢ
    inv_f2 = _safe_inverse(M.square().sum(dim=(1, 2)))
    value = nuc.square() * inv_f2
    grad = (2.0 * nuc * inv_f2)[:, None, None] * P - (2.0 * value * inv_f2)[:, None, None] * M
    return value, grad


def pow2_normalized(A: torch.Tensor, keep_within: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A·2^-e, 2^-e)`` per matrix of A [..., m, n], with 2^e the power of two just above max |A|
    (exact scaling; the scale is in fp32, or fp64 for fp64 A, so 16-bit A never overflows it).
    ``e = 0`` (A itself) when ``|e| <= keep_within`` or A is zero or not finite."""
    wd = torch.promote_types(A.dtype, torch.float32)
    amax = A.detach().abs().amax(dim=(-2, -1), keepdim=True).to(wd)
    _, e = torch.frexp(amax)
    e = torch.where(torch.isfinite(amax) & (amax > 0) & (e.abs() > keep_within), e, torch.zeros_like(e))
    scale = torch.ldexp(torch.ones_like(amax), -e)
    return (A.to(wd) * scale).to(A.dtype), scale  # no host sync to test whether e is 0


def stable_rank(
    W: torch.Tensor,
    L: Optional[torch.Tensor],
    kind: str,
    state: Optional[torch.Tensor],
    iters: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank surrogate of M = W L (or M = W) per batch entry, and its gradient with respect to W.

    kind "stable": ‖M‖_F²/σ₁(M)², top pair by power iteration warm-started from ``state``.
    kind "nuclear": ‖M‖_*²/‖M‖_F², polar factor by Newton–Schulz (``state`` unused).
    All outputs are in the compute dtype (fp32, or fp64 for fp64 W): value [B], grad [B, m, n]
    (= grad_M Lᵀ), new state [B, n] (the top right singular vectors of M) or [B, 0] for "nuclear".
    """
    cd = compute_dtype(W.dtype)
    M = W.to(cd)
    Lc = None if L is None else L.to(cd)
    if Lc is not None:
        M = torch.matmul(M, Lc)
    # Both surrogates are scale-invariant and their gradients homogeneous of degree -1, so they run
    # on M·2^-e with 2^e ≈ max|M| (exact: a power of two). Unscaled, fp32 ‖MᵀMv‖² and ‖M‖_F² over- or
    # underflow for |M| beyond about 1e±9 and the value silently came out 0.
    M, inv = pow2_normalized(M)
    if kind == "stable":
        value, grad_M, new_state = _stable_value_grad(M, state, iters)
    elif kind == "nuclear":
        value, grad_M = _nuclear_value_grad(M, iters)
        new_state = M.new_empty(M.shape[0], 0)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    grad_M = grad_M * inv
    grad = grad_M if Lc is None else torch.matmul(grad_M, Lc.mT)
    return value, grad, new_state


# ---------------------------------------------------------------------------------------------
# low-rank linear
# ---------------------------------------------------------------------------------------------


def lowrank_linear(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y = (x Vᵀ) Uᵀ + bias, two GEMMs through the rank-r bottleneck (``F.linear``: the same BLAS
    calls as ``mm``/``addmm`` on the flattened tokens, with the least host work per call)."""
    return F.linear(F.linear(x, V), U, bias)


def lowrank_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    needs_input_grad: tuple[bool, bool, bool, bool],
) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients (dx, dU, dV, dbias) of y = (x Vᵀ) Uᵀ + b; None where not needed.

    dx = (g U) V, dU = gᵀ (x Vᵀ), dV = (g U)ᵀ x, db = Σ_tokens g. The bottleneck activation x Vᵀ is
    recomputed (only when dU is needed) rather than saved, trading one T·in·r GEMM for T·r memory.
    """
    need_x, need_U, need_V, need_b = needs_input_grad
    g = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = dU = dV = db = None
    if need_x or need_V:
        gU = torch.mm(g, U)  # [T, r]
        if need_x:
            dx = torch.mm(gU, V).reshape(x.shape)
        if need_V:
            dV = torch.mm(gU.mT, x2)
    if need_U:
        dU = torch.mm(g.mT, torch.mm(x2, V.mT))
    if need_b:
        db = g.sum(dim=0)
    return dx, dU, dV, db
