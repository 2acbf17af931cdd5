"""Triton kernels of the batched rank surrogates and their gradients (the Prehab regularizer).

The math is :func:`prehab_svd.ops.reference.stable_rank` (with its helpers ``top_singular_pair`` and
``polar_newton_schulz``); this module computes the same numbers with Triton kernels, every step batched
over the B matrices of the stack (the batch index is a grid axis, never a Python loop):

* ``M = W L`` (skipped when L is None: the kernels then read W in place, any dtype and strides): one
  generic batched GEMM kernel, ``C[b] = alpha·A[b] @ B[b] + beta·D[b]`` with every operand addressed by
  (batch, row, column) strides, so transposes and a shared [n, n] L (batch stride 0) cost nothing.
* ``"stable"``: ‖M‖_F² and the power iteration on MᵀM as two batched GEMV kernels, ``y = M v`` (which
  also normalizes its input v on the fly and, on its first call, reduces ‖M‖_F²) and ``w = Mᵀ y``. Vector
  norms never leave the GPU: each GEMV program writes a partial sum of squares to a small [B, programs]
  buffer and the consumer kernel sums it (deterministic, no atomics, no host synchronization). The
  value and gradient ``grad_M = 2M/σ₁² − 2‖M‖_F²/σ₁³ · u vᵀ`` come out of one elementwise kernel (the
  rank-1 update fused), which also writes the value.
* ``"nuclear"``: ‖M‖_F² by a reduction kernel, X₀ = M/‖M‖_F (transposed when m > n, so the iteration
  runs on the smaller side) by a scale-copy kernel, then the reference's Newton–Schulz schedule
  (quintic, then cubic steps). Per quintic step: ``A = X Xᵀ`` and ``P = c·A Aᵀ + b·A`` by the
  symmetric-product kernel (only the tiles on and above the diagonal are computed; each off-diagonal
  tile is also stored transposed into its mirror, so about half the MMA work), then
  ``X ← a·X + P X`` by the batched GEMM (``D = X`` in the epilogue). Per cubic step:
  ``A = X Xᵀ`` (symmetric), ``X ← 1.5·X − 0.5·A X``. Then ‖M‖_* = ⟨P, M⟩ by the reduction kernel and
  the gradient ``2‖M‖_*·P/‖M‖_F² − 2‖M‖_*²·M/‖M‖_F⁴`` by the same fused elementwise kernel.
* With L: ``grad_W = grad_M Lᵀ`` by the batched GEMM (Lᵀ through swapped strides).

Numerics (documented choice). Everything accumulates in fp32, and M and the Newton–Schulz iterate are
kept in fp32 (a bf16 iterate would not reach the 0.999 gradient cosine to the float64 gradient that
the issue asks for). 16-bit W and L (same dtype) multiply on the tensor cores in bf16/fp16 — exact
products, fp32 accumulation, so ``M = W L`` matches the reference's ``W.float() @ L.float()`` to
summation order. fp32 products use ``tl.dot`` with ``input_precision="tf32"`` on CUDA (tensor cores;
the setting ``PREHAB_SVD_TRITON_FP32_DOT=tf32x3|ieee`` trades speed for exact fp32) and ``"ieee"``
in the interpreter (CPU, exact fp32, so tests match the reference to ~1e-6). The GPU truncates fp32
operands to tf32 (it drops 13 mantissa bits, see ``tl.dot``'s docstring); in the Newton–Schulz
iteration that one-sided bias moves the converged singular values of the polar factor off 1 and the
nuclear value by ~1.6e-3 (measured by emulating truncated-tf32 products on CPU at 1024², B = 2;
gradient cosine 0.999997 either way). So on CUDA with tf32, every Newton–Schulz kernel rounds its fp32 *output* to the nearest tf32 value (``ROUND_TF32``; an
integer add-and-mask in registers in the epilogue, the loads and their pipelining untouched): the
next product's operands are then exactly tf32, the truncation is a no-op, and the error is unbiased
(emulated: value rel. error 2e-5, cosine 0.999997 at 1024²). ``M = W L`` and ``grad_M Lᵀ`` with fp32
operands keep plain tf32: their ~5e-4 bias is close to a uniform scale, which cancels in both
surrogates' values (they are scale invariant) and does not turn the gradient (not yet measured on a
GPU; ``tf32x3`` is the fallback if the GPU test disagrees). The power iteration (GEMVs) and all
reductions are exact fp32 FMAs.

fp64 W runs the reference (no fp64 Triton path). On CPU the kernels run only in the interpreter
(``TRITON_INTERPRET=1``), fp32 and fp16.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from prehab_svd.ops import reference as _ref
from prehab_svd.ops._triton import interpreting as _interpreting

__all__ = ["stable_rank", "aot_specs", "batched_gemm", "symmetric_product", "polar_newton_schulz",
           "top_singular_pair"]

FP32_DOT_ENV = "PREHAB_SVD_TRITON_FP32_DOT"
_TF32_MASK = -8192  # 0xFFFFE000 as int32: clears the 13 mantissa bits that tf32 drops


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_tf32(x):
    """Round fp32 to the nearest tf32 value (ties away from zero), kept in fp32. NaN and ±inf pass
    unchanged: the add would carry out of a high NaN mantissa (e.g. 0x7FFFFFFF + 0x1000 wraps to
    0x80000FFF, which the mask makes −0.0), so values whose exponent is all ones keep their bits.
    A finite value that rounds past the largest tf32 becomes inf, as rounding should."""
    xi = x.to(tl.int32, bitcast=True)
    r = (xi + 0x1000) & -8192
    special = (xi & 0x7F800000) == 0x7F800000
    return tl.where(special, xi, r).to(tl.float32, bitcast=True)


@triton.jit
def _sum_partials(part_ptr, n_part, NP: tl.constexpr):
    """Sum of part_ptr[0:n_part] (NP: a power of two ≥ n_part), fp32."""
    offs = tl.arange(0, NP)
    return tl.sum(tl.load(part_ptr + offs, mask=offs < n_part, other=0.0), axis=0)


@triton.jit
def _safe_inv(s):
    """1/s where s > 0, else 0 (the reference's _safe_inverse)."""
    return tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# GEMM: C[b] = alpha · A[b] @ B[b] (+ beta · D[b])
# ---------------------------------------------------------------------------------------------


@triton.jit
def bmm_kernel(
    a_ptr, b_ptr, c_ptr, d_ptr,
    M, N, K, alpha, beta,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn, s_db, s_dm, s_dn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_D: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """Batched C = alpha·A@B + beta·D, fp32 accumulate and fp32 output. grid = (tiles, 1, batch).

    A, B any float dtype (CAST_F32: upcast both after the load, for mixed or fp32 operands); D fp32
    (may be C itself: each C tile is read and written by its one owner). Tiles are ordered in groups
    of GROUP_M tile rows so neighbouring programs share B tiles in L2.
    """
    pid = tl.program_id(0)
    bat = tl.program_id(2).to(tl.int64)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # wrap out-of-range rows/columns onto valid ones (their results are masked at the store), so the
    # loads need a mask on K only
    rm = offs_m % M
    rn = offs_n % N
    a_ptrs = a_ptr + bat * s_ab + rm[:, None] * s_am + offs_k[None, :] * s_ak
    b_ptrs = b_ptr + bat * s_bb + offs_k[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk

    out = acc * alpha
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_D:
        d = tl.load(d_ptr + bat * s_db + offs_m[:, None] * s_dm + offs_n[None, :] * s_dn, mask=mask, other=0.0)
        out += beta * d
    if ROUND_TF32:
        out = _round_tf32(out)
    tl.store(c_ptr + bat * s_cb + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn, out, mask=mask)


# ---------------------------------------------------------------------------------------------
# symmetric product: C[b] = alpha · X[b] X[b]ᵀ (+ beta · D[b]), D symmetric
# ---------------------------------------------------------------------------------------------


@triton.jit
def syrk_kernel(
    x_ptr, c_ptr, d_ptr,
    S, K, alpha, beta,
    s_xb, s_xm, s_xk, s_cb, s_cm, s_cn, s_db, s_dm, s_dn,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_D: tl.constexpr, PREC: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """C = alpha·X Xᵀ + beta·D for X [S, K] per batch, computing only tiles (i, j) with i ≤ j.

    grid = (T(T+1)/2, 1, batch) with T = ceil(S / BLOCK): one program per upper tile, no idle
    programs. Each off-diagonal tile is stored twice, at (i, j) and transposed at (j, i), so C is the
    full (exactly mirrored) symmetric matrix. D must be symmetric: the mirror takes D(i, j)ᵀ for D(j, i).
    """
    # pid = tj(tj+1)/2 + ti, 0 ≤ ti ≤ tj (upper tiles column by column); the float square root is
    # corrected by exact integer checks (inlined: nested jit calls are slow in the interpreter)
    pid = tl.program_id(0)
    tj = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)
    ti = pid - tj * (tj + 1) // 2
    bat = tl.program_id(2).to(tl.int64)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    ri = offs_i % S
    rj = offs_j % S
    x_base = x_ptr + bat * s_xb
    a_ptrs = x_base + ri[:, None] * s_xm + offs_k[None, :] * s_xk  # X[i-block, k]   [BLOCK, BLOCK_K]
    b_ptrs = x_base + offs_k[:, None] * s_xk + rj[None, :] * s_xm  # X[j-block, k]ᵀ  [BLOCK_K, BLOCK]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * s_xk
        b_ptrs += BLOCK_K * s_xk

    out = acc * alpha
    mask = (offs_i[:, None] < S) & (offs_j[None, :] < S)
    if HAS_D:
        d = tl.load(d_ptr + bat * s_db + offs_i[:, None] * s_dm + offs_j[None, :] * s_dn, mask=mask, other=0.0)
        out += beta * d
    if ROUND_TF32:
        out = _round_tf32(out)
    c_base = c_ptr + bat * s_cb
    tl.store(c_base + offs_i[:, None] * s_cm + offs_j[None, :] * s_cn, out, mask=mask)
    # the mirror tile (j, i) = tileᵀ; diagonal tiles are written once
    off_diag = (tl.zeros((BLOCK, BLOCK), dtype=tl.int32) + ti) != tj
    tl.store(c_base + offs_i[:, None] * s_cn + offs_j[None, :] * s_cm, out, mask=mask & off_diag)


# ---------------------------------------------------------------------------------------------
# power iteration: y = M (w/‖w‖) and w = Mᵀ y, with partial norms
# ---------------------------------------------------------------------------------------------


@triton.jit
def mv_kernel(
    m_ptr, x_ptr, xpart_ptr, y_ptr, ypart_ptr, v_ptr, fpart_ptr,
    M, N, n_xpart,
    s_mb, s_mm, s_mn, s_xb, s_xpb, s_yb, s_ypb, s_vb, s_fb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, XP: tl.constexpr,
    WRITE_V: tl.constexpr, FRO: tl.constexpr,
):
    """y[b] = M[b] @ (x[b]/‖x[b]‖) for a row block; grid = (ceil(M/BLOCK_M), batch).

    ‖x‖² is the sum of x's n_xpart partials. Writes ypart[b, pid] = Σ y² over the block; with FRO
    also fpart[b, pid] = Σ M² over the block (‖M‖_F² fused into the first pass); with WRITE_V
    program 0 stores the normalized x (the power iteration's v) to v_ptr.
    """
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    # ‖x‖² from its partials, then 1/‖x‖ (0 for a zero vector); inlined (nested jit calls are slow
    # in the interpreter)
    offs_p = tl.arange(0, XP)
    nrm = tl.sqrt(tl.sum(tl.load(xpart_ptr + bat * s_xpb + offs_p, mask=offs_p < n_xpart, other=0.0), axis=0))
    inv = tl.where(nrm > 0, 1.0 / tl.where(nrm > 0, nrm, 1.0), 0.0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    m_rows = m_ptr + bat * s_mb + offs_m[:, None] * s_mm
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    facc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        x = tl.load(x_ptr + bat * s_xb + offs_n, mask=n_ok, other=0.0) * inv
        if WRITE_V:
            tl.store(v_ptr + bat * s_vb + offs_n, x, mask=n_ok & ((offs_n * 0 + pid) == 0))
        a = tl.load(m_rows + offs_n[None, :] * s_mn, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
        if FRO:
            facc += tl.sum(a * a, axis=1)
    tl.store(y_ptr + bat * s_yb + offs_m, acc, mask=m_ok)
    tl.store(ypart_ptr + bat * s_ypb + pid, tl.sum(acc * acc, axis=0))
    if FRO:
        tl.store(fpart_ptr + bat * s_fb + pid, tl.sum(facc, axis=0))


@triton.jit
def mtv_kernel(
    m_ptr, y_ptr, w_ptr, wpart_ptr,
    M, N,
    s_mb, s_mm, s_mn, s_yb, s_wb, s_wpb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """w[b] = M[b]ᵀ @ y[b] for a column block; grid = (ceil(N/BLOCK_N), batch). Writes
    wpart[b, pid] = Σ w² over the block."""
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    m_cols = m_ptr + bat * s_mb + offs_n[None, :] * s_mn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        y = tl.load(y_ptr + bat * s_yb + offs_m, mask=m_ok, other=0.0)
        a = tl.load(m_cols + offs_m[:, None] * s_mm, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * y[:, None], axis=0)
    tl.store(w_ptr + bat * s_wb + offs_n, acc, mask=n_ok)
    tl.store(wpart_ptr + bat * s_wpb + pid, tl.sum(acc * acc, axis=0))


# ---------------------------------------------------------------------------------------------
# reductions, scale-copy, fused epilogue
# ---------------------------------------------------------------------------------------------


@triton.jit
def rowdot_kernel(
    a_ptr, b_ptr, part_ptr,
    M, N,
    s_ab, s_am, s_an, s_bb, s_bm, s_bn, s_pb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SAME: tl.constexpr,
):
    """part[b, pid] = Σ A[b]∘B[b] over a row block (SAME: Σ A², B unused); grid = (ceil(M/BLOCK_M), batch)."""
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = m_ok[:, None] & (offs_n[None, :] < N)
        a = tl.load(a_ptr + bat * s_ab + offs_m[:, None] * s_am + offs_n[None, :] * s_an, mask=mask, other=0.0)
        a = a.to(tl.float32)
        if SAME:
            acc += a * a
        else:
            b = tl.load(b_ptr + bat * s_bb + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn, mask=mask, other=0.0)
            acc += a * b.to(tl.float32)
    tl.store(part_ptr + bat * s_pb + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def scale_kernel(
    a_ptr, o_ptr, fpart_ptr,
    M, N, n_fpart,
    s_ab, s_am, s_an, s_ob, s_om, s_on, s_fb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """O[b] = A[b] / ‖A[b]‖_F (0 for a zero matrix), ‖A‖_F² from fpart; O's strides may transpose.
    grid = (ceil(M/BLOCK_M), ceil(N/BLOCK_N), batch)."""
    bat = tl.program_id(2).to(tl.int64)
    inv = _safe_inv(tl.sqrt(_sum_partials(fpart_ptr + bat * s_fb, n_fpart, FP)))
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    a = tl.load(a_ptr + bat * s_ab + offs_m[:, None] * s_am + offs_n[None, :] * s_an, mask=mask, other=0.0)
    out = a.to(tl.float32) * inv
    if ROUND_TF32:
        out = _round_tf32(out)
    tl.store(o_ptr + bat * s_ob + offs_m[:, None] * s_om + offs_n[None, :] * s_on, out, mask=mask)


@triton.jit
def epilogue_kernel(
    m_ptr, p_ptr, u_ptr, v_ptr, fpart_ptr, spart_ptr, value_ptr, g_ptr,
    M, N, n_fpart, n_spart,
    s_mb, s_mm, s_mn, s_pb, s_pm, s_pn, s_ub, s_vb, s_fb, s_sb, s_gb, s_gm, s_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr, SP: tl.constexpr,
    NUCLEAR: tl.constexpr,
):
    """Value and gradient w.r.t. M, one elementwise pass; grid = (ceil(M/BM), ceil(N/BN), batch).

    fro2 = Σ fpart[b]. "stable" (NUCLEAR False): σ₁² = Σ spart[b] (= ‖M v‖²), u = u_ptr/σ₁,
    value = fro2/σ₁², G = 2M/σ₁² − 2·value/σ₁ · u vᵀ (the rank-1 update fused).
    "nuclear": nuc = Σ spart[b] (= ⟨P, M⟩), value = nuc²/fro2, G = 2·nuc/fro2 · P − 2·value/fro2 · M.
    Program (0, 0) of each batch entry writes value[b].
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bat = tl.program_id(2).to(tl.int64)
    fro2 = _sum_partials(fpart_ptr + bat * s_fb, n_fpart, FP)
    s = _sum_partials(spart_ptr + bat * s_sb, n_spart, SP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    a = tl.load(m_ptr + bat * s_mb + offs_m[:, None] * s_mm + offs_n[None, :] * s_mn, mask=mask, other=0.0)
    a = a.to(tl.float32)
    if NUCLEAR:
        inv_f2 = _safe_inv(fro2)
        value = s * s * inv_f2
        p = tl.load(p_ptr + bat * s_pb + offs_m[:, None] * s_pm + offs_n[None, :] * s_pn, mask=mask, other=0.0)
        g = (2.0 * s * inv_f2) * p - (2.0 * value * inv_f2) * a
    else:
        inv_s = _safe_inv(tl.sqrt(s))
        value = fro2 * (inv_s * inv_s)
        u = tl.load(u_ptr + bat * s_ub + offs_m, mask=m_ok, other=0.0) * inv_s
        v = tl.load(v_ptr + bat * s_vb + offs_n, mask=n_ok, other=0.0)
        g = (2.0 * (inv_s * inv_s)) * a - (2.0 * value * inv_s) * (u[:, None] * v[None, :])
    tl.store(g_ptr + bat * s_gb + offs_m[:, None] * s_gm + offs_n[None, :] * s_gn, g, mask=mask)
    tl.store(value_ptr + bat, value, mask=(pid_m == 0) & (pid_n == 0))


# ---------------------------------------------------------------------------------------------
# configuration (a small deterministic heuristic; no autotune: it fails in the interpreter)
# ---------------------------------------------------------------------------------------------




def _fp32_dot(device: torch.device) -> tuple[str, bool]:
    """(input_precision for fp32 tl.dot, round NS outputs to tf32)."""
    if device.type != "cuda" or _interpreting():
        return "ieee", False
    prec = os.environ.get(FP32_DOT_ENV, "tf32").lower()
    if prec not in ("tf32", "tf32x3", "ieee"):
        raise ValueError(f"{FP32_DOT_ENV} must be tf32, tf32x3 or ieee, got {prec!r}")
    return prec, prec == "tf32"


_SMS = 132  # H100 SXM; only used to size the GEMV grids
_CUDA = None  # the config rules' "CUDA, not interpreted" case, for aot_specs (see _gemm_config)

# name -> (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
GEMM_CONFIGS = {
    "tc16": (128, 128, 64, 8, 8, 4),   # bf16/fp16 operands (M = W L)
    "tf32": (128, 128, 32, 8, 8, 3),   # fp32 operands (NS update, grad_M Lᵀ, mixed W L)
    "small": (64, 64, 32, 8, 4, 3),    # either, when an output side is ≤ 64
    "interp": (32, 32, 32, 4, 4, 1),
}
# name -> (BLOCK, BLOCK_K, num_warps, num_stages)
SYRK_CONFIGS = {
    "tf32": (128, 32, 8, 3),
    "small": (64, 32, 4, 3),
    "interp": (32, 32, 4, 1),
}
ELEM_CONFIG = {"cuda": (64, 128, 4), "interp": (32, 32, 4)}  # (BLOCK_M, BLOCK_N, num_warps)
ROWDOT_CONFIG = {"cuda": (16, 256, 4), "interp": (32, 64, 4)}
STREAM_STAGES = 3  # software-pipelined loads in the streaming loops (GEMVs, reductions)


def _gemm_config(M: int, N: int, tensor16: bool, device: Optional[torch.device]) -> str:
    """GEMM_CONFIGS key; device None: the CUDA rule whatever the process (for aot_specs)."""
    if device is not None and (device.type != "cuda" or _interpreting()):
        return "interp"
    if min(M, N) <= 64:
        return "small"
    return "tc16" if tensor16 else "tf32"


def _syrk_config(S: int, device: Optional[torch.device]) -> str:
    """SYRK_CONFIGS key; device None: the CUDA rule whatever the process (for aot_specs)."""
    if device is not None and (device.type != "cuda" or _interpreting()):
        return "interp"
    return "small" if S <= 128 else "tf32"


GEMV_TILE = {True: 8192, False: 4096}  # fp32 elements of the register tile: aligned / unaligned rows


def _aligned(n: int) -> bool:
    """Whether rows of length n (contiguous [.., m, n] operands) start 16-byte aligned and the JIT
    marks the row stride divisible by 16: then loads vectorize."""
    return n % 16 == 0


def _gemv_config(rows: int, batch: int, cuda: bool, aligned: bool = True) -> tuple[int, int]:
    """(rows per Mv program (or columns per Mᵀy program), length of the streamed chunk).

    On CUDA: the largest block of 128..16 that still gives about two waves of programs on the 132
    SMs, and a chunk that keeps the register tile at GEMV_TILE fp32 elements: 8K (64 per thread at 4
    warps) when the rows are aligned (16-byte loads, one address per 4-8 elements), 4K when not
    (row length not a multiple of 16, e.g. an odd n): unvectorized loads need an address per
    element, and the 8K tile then spilled (255 registers, 1,100 B on Triton 3.6; 4K: 165 registers,
    none; 2K oddly spilled 4 B on 3.6 at 72 registers).
    In the interpreter: 32 and 64 (several programs and chunks on small test shapes).
    """
    if not cuda:
        return 32, 64
    blk = 16
    for b in (128, 64, 32):
        if triton.cdiv(rows, b) * batch >= 2 * _SMS:
            blk = b
            break
    tile = GEMV_TILE[aligned]
    return blk, max(16, min(512, tile // blk))


def _p2(n: int) -> int:
    return max(triton.next_power_of_2(n), 2)


# ---------------------------------------------------------------------------------------------
# launchers of the building blocks (all batched; all outputs fp32)
# ---------------------------------------------------------------------------------------------


def _empty(*shape: int, device) -> torch.Tensor:
    """fp32 buffer for a kernel output (one place, so tests can pre-fill every output with NaN)."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def _empty_rows16(Bt: int, r: int, c: int, *, device) -> torch.Tensor:
    """[Bt, r, c] fp32 view of a [Bt, r, pad16(c)] buffer: rows (and matrices) start 16-element
    aligned whatever c is, so the kernels reading these internal operands (M = W L, the Newton–Schulz
    iterates) get the JIT's aligned variant (16-byte vectorized loads, and no spills; the unaligned
    variant of the b·A + c·A² product spilled on Triton 3.6) even for an odd n. The padding columns
    are never read or written (every kernel masks by the logical size)."""
    return _empty(Bt, r, _pad16(c), device=device)[:, :, :c]


def batched_gemm(A: torch.Tensor, B: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                 alpha: float = 1.0, beta: float = 0.0, D: Optional[torch.Tensor] = None,
                 prec: Optional[str] = None, round_tf32: bool = False) -> torch.Tensor:
    """out[b] = alpha·A[b] @ B[b] + beta·D[b] in fp32 (A [Ba, M, K], B [Bb, K, N], batch 1 broadcasts
    by stride 0). ``out`` must not overlap A or B (it may be D)."""
    Bt = max(A.shape[0], B.shape[0])
    Mr, K = A.shape[1], A.shape[2]
    N = B.shape[2]
    if out is None:
        out = _empty(Bt, Mr, N, device=A.device)
    if prec is None:
        prec, _ = _fp32_dot(A.device)
    tensor16 = A.dtype == B.dtype and A.dtype in (torch.float16, torch.bfloat16)
    bm, bn, bk, gm, nw, ns = GEMM_CONFIGS[_gemm_config(Mr, N, tensor16, A.device)]
    sab = A.stride(0) if A.shape[0] > 1 else 0
    sbb = B.stride(0) if B.shape[0] > 1 else 0
    Dt = out if D is None else D
    grid = (triton.cdiv(Mr, bm) * triton.cdiv(N, bn), 1, Bt)
    bmm_kernel[grid](
        A, B, out, Dt, Mr, N, K, float(alpha), float(beta),
        sab, A.stride(1), A.stride(2), sbb, B.stride(1), B.stride(2),
        out.stride(0), out.stride(1), out.stride(2), Dt.stride(0), Dt.stride(1), Dt.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, HAS_D=D is not None, CAST_F32=not tensor16,
        PREC=prec, ROUND_TF32=round_tf32, num_warps=nw, num_stages=ns,
    )
    return out


def symmetric_product(X: torch.Tensor, *, out: Optional[torch.Tensor] = None, alpha: float = 1.0,
                      beta: float = 0.0, D: Optional[torch.Tensor] = None, prec: Optional[str] = None,
                      round_tf32: bool = False) -> torch.Tensor:
    """out[b] = alpha·X[b] X[b]ᵀ + beta·D[b] (D symmetric) in fp32, upper tiles only, mirrored."""
    Bt, S, K = X.shape
    if out is None:
        out = _empty(Bt, S, S, device=X.device)
    if prec is None:
        prec, _ = _fp32_dot(X.device)
    blk, bk, nw, ns = SYRK_CONFIGS[_syrk_config(S, X.device)]
    T = triton.cdiv(S, blk)
    Dt = out if D is None else D
    syrk_kernel[(T * (T + 1) // 2, 1, Bt)](
        X, out, Dt, S, K, float(alpha), float(beta),
        X.stride(0), X.stride(1), X.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Dt.stride(0), Dt.stride(1), Dt.stride(2),
        BLOCK=blk, BLOCK_K=bk, HAS_D=D is not None, PREC=prec, ROUND_TF32=round_tf32,
        num_warps=nw, num_stages=ns,
    )
    return out


def _elem_cfg(device):
    return ELEM_CONFIG["cuda" if device.type == "cuda" and not _interpreting() else "interp"]


def _sumsq_partials(A: torch.Tensor, Bm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, P] partial sums of Σ A² (or Σ A∘B) over row blocks."""
    Bt, Mr, N = A.shape
    bm, bn, nw = ROWDOT_CONFIG["cuda" if A.device.type == "cuda" and not _interpreting() else "interp"]
    P = triton.cdiv(Mr, bm)
    part = _empty(Bt, P, device=A.device)
    Bx = A if Bm is None else Bm
    rowdot_kernel[(P, Bt)](
        A, Bx, part, Mr, N, A.stride(0), A.stride(1), A.stride(2), Bx.stride(0), Bx.stride(1), Bx.stride(2),
        part.stride(0), BLOCK_M=bm, BLOCK_N=bn, SAME=Bm is None, num_warps=nw, num_stages=STREAM_STAGES,
    )
    return part


def polar_newton_schulz(M: torch.Tensor, iters: int, fro_part: Optional[torch.Tensor] = None, *,
                        prec: Optional[str] = None, round_tf32: Optional[bool] = None):
    """Polar factor of each M [B, m, n] by the reference's Newton–Schulz schedule, fp32.

    Returns (P [B, m, n] (a transposed view when m > n), fro_part [B, p]: partials of ‖M‖_F²).
    """
    Bt, m, n = M.shape
    dev = M.device
    p0, r0 = _fp32_dot(dev)
    prec = p0 if prec is None else prec
    round_tf32 = r0 if round_tf32 is None else round_tf32
    if fro_part is None:
        fro_part = _sumsq_partials(M)
    s, l = min(m, n), max(m, n)
    X = _empty_rows16(Bt, s, l, device=dev)
    Xt = X.mT if m > n else X  # [B, m, n] view to write M/‖M‖_F into
    bm, bn, nw = _elem_cfg(dev)
    scale_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), Bt)](
        M, Xt, fro_part, m, n, fro_part.shape[1],
        M.stride(0), M.stride(1), M.stride(2), Xt.stride(0), Xt.stride(1), Xt.stride(2), fro_part.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, FP=_p2(fro_part.shape[1]), ROUND_TF32=round_tf32, num_warps=nw, num_stages=1,
    )
    Xn = _empty_rows16(Bt, s, l, device=dev)
    A = _empty_rows16(Bt, s, s, device=dev)
    Pm = _empty_rows16(Bt, s, s, device=dev)
    n_cubic = min(6, iters // 2)
    a, b, c = _ref.NS_QUINTIC
    kw = dict(prec=prec, round_tf32=round_tf32)
    for _ in range(iters - n_cubic):
        symmetric_product(X, out=A, **kw)                                   # A = X Xᵀ
        symmetric_product(A, out=Pm, alpha=c, beta=b, D=A, **kw)            # b·A + c·A²
        batched_gemm(Pm, X, out=Xn, alpha=1.0, beta=a, D=X, **kw)           # a·X + (b·A + c·A²)·X
        X, Xn = Xn, X
    for _ in range(n_cubic):
        symmetric_product(X, out=A, **kw)
        batched_gemm(A, X, out=Xn, alpha=-0.5, beta=1.5, D=X, **kw)        # 1.5·X − 0.5·A X
        X, Xn = Xn, X
    return (X.mT if m > n else X), fro_part


def top_singular_pair(M: torch.Tensor, v0: torch.Tensor, iters: int):
    """Power iteration on MᵀM from v0 [B, n] (need not be normalized), iters steps.

    Returns (y [B, m] = M v unnormalized, ypart (‖y‖² partials), v [B, n] unit, fro_part (‖M‖_F²
    partials, reduced in the first pass over M)).
    """
    Bt, m, n = M.shape
    dev = M.device
    cuda = dev.type == "cuda" and not _interpreting()
    # rows of M aligned: unit column stride, row and batch strides divisible by 16 (what the JIT
    # specializes on; the pointer itself is assumed aligned, as fresh allocations are)
    aligned = M.stride(2) == 1 and M.stride(1) % 16 == 0 and (Bt == 1 or M.stride(0) % 16 == 0)
    bm, chunk_n = _gemv_config(m, Bt, cuda, aligned)    # Mv: bm rows per program, chunk_n columns per step
    bn_t, chunk_m = _gemv_config(n, Bt, cuda, aligned)  # Mᵀy: bn_t columns per program, chunk_m rows per step
    pm, pn = triton.cdiv(m, bm), triton.cdiv(n, bn_t)
    w = v0.to(device=dev, dtype=torch.float32).contiguous()
    wpart = w.square().sum(dim=1, keepdim=True)  # [B, 1]: the start vector's norm², tiny
    w2 = _empty(Bt, n, device=dev)
    w2part = _empty(Bt, pn, device=dev)
    y = _empty(Bt, m, device=dev)
    ypart = _empty(Bt, pm, device=dev)
    fpart = _empty(Bt, pm, device=dev)
    v = _empty(Bt, n, device=dev)
    sm = (M.stride(0), M.stride(1), M.stride(2))
    nw = 4

    def mv(x, xpart, write_v, fro):
        mv_kernel[(pm, Bt)](
            M, x, xpart, y, ypart, v, fpart, m, n, xpart.shape[1],
            *sm, x.stride(0), xpart.stride(0), y.stride(0), ypart.stride(0), v.stride(0), fpart.stride(0),
            BLOCK_M=bm, BLOCK_N=chunk_n, XP=_p2(xpart.shape[1]), WRITE_V=write_v, FRO=fro, num_warps=nw,
            num_stages=STREAM_STAGES,
        )

    first = True
    for _ in range(iters):
        mv(w, wpart, False, first)
        first = False
        mtv_kernel[(pn, Bt)](
            M, y, w2, w2part, m, n, *sm, y.stride(0), w2.stride(0), w2part.stride(0),
            BLOCK_M=chunk_m, BLOCK_N=bn_t, num_warps=nw, num_stages=STREAM_STAGES,
        )
        w, wpart = w2, w2part
    # v = w/‖w‖, y = M v (u unnormalized), σ₁² = Σ ypart; ‖M‖_F² here if no pass did it yet
    mv(w, wpart, True, first)
    return y, ypart, v, fpart


# ---------------------------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------------------------


_INT32_MAX = 2 ** 31 - 1


def _matrix_span(t: torch.Tensor) -> int:
    """Largest element offset inside one matrix of t [..., r, c] (the batch dimension excluded)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[-2:], t.stride()[-2:]))


def offsets_fit_int32(W: torch.Tensor, L: Optional[torch.Tensor]) -> bool:
    """Whether every offset inside one matrix, of the inputs and of the internal buffers (M = W L and
    the Newton–Schulz iterates, rows padded to 16), stays below 2³¹: the kernels form index·stride
    products in 32 bits within a matrix and in 64 bits across the batch."""
    m, n = W.shape[-2], W.shape[-1]
    s, l = min(m, n), max(m, n)
    spans = [_matrix_span(W), m * _pad16(n), s * _pad16(l)]
    if L is not None:
        spans.append(_matrix_span(L))
    return max(spans) <= _INT32_MAX


def stable_rank(
    W: torch.Tensor,
    L: Optional[torch.Tensor],
    kind: str,
    state: Optional[torch.Tensor],
    iters: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`prehab_svd.ops.reference.stable_rank`: W [B, m, n]; L None, [n, n] or
    [B, n, n]; state None or [B, n] ("stable" only). Returns (value [B], grad [B, m, n], new state
    [B, n] or [B, 0]) in fp32 (contiguous)."""
    if kind not in ("stable", "nuclear"):
        raise ValueError(f"unknown kind {kind!r}")
    if W.dtype == torch.float64:
        # no fp64 Triton path: fp64 W computes in fp64, which is the reference itself
        return _ref.stable_rank(W, L, kind, state, iters)
    if W.dim() != 3:
        raise ValueError(f"W must be [B, m, n], got {tuple(W.shape)}")
    Bt, m, n = W.shape
    dev = W.device
    interp = dev.type != "cuda" or _interpreting()
    if not offsets_fit_int32(W, L):
        # one matrix spans 2³¹ elements or more: the kernels' in-matrix offsets are 32-bit (the batch
        # offset is 64-bit), so the reference (torch, same device) computes it
        return _ref.stable_rank(W, L, kind, state, iters)

    # M = W L (fp32), or M = W read in place
    if L is not None:
        Lc = L
        if Lc.dtype == torch.float64 or (interp and Lc.dtype == torch.bfloat16):
            Lc = Lc.to(torch.float32)  # the reference casts L to fp32 too; bf16 -> fp32 is exact
        L3 = Lc.unsqueeze(0) if Lc.dim() == 2 else Lc
        Wx = W
        if interp and Wx.dtype == torch.bfloat16:
            Wx = Wx.to(torch.float32)
        M = batched_gemm(Wx, L3, out=_empty_rows16(Bt, m, n, device=dev))
    else:
        L3 = None
        M = W
        if interp and M.dtype == torch.bfloat16:
            M = M.to(torch.float32)

    value = _empty(Bt, device=dev)
    g_m = _empty(Bt, m, n, device=dev)
    bm, bn, nw = _elem_cfg(dev)
    egrid = (triton.cdiv(m, bm), triton.cdiv(n, bn), Bt)

    if kind == "stable":
        v0, iters = _ref.power_start(state, Bt, n, dev, torch.float32, iters)
        y, ypart, v, fpart = top_singular_pair(M, v0, iters)
        epilogue_kernel[egrid](
            M, M, y, v, fpart, ypart, value, g_m, m, n, fpart.shape[1], ypart.shape[1],
            M.stride(0), M.stride(1), M.stride(2), 0, 0, 0, y.stride(0), v.stride(0), fpart.stride(0),
            ypart.stride(0), g_m.stride(0), g_m.stride(1), g_m.stride(2),
            BLOCK_M=bm, BLOCK_N=bn, FP=_p2(fpart.shape[1]), SP=_p2(ypart.shape[1]), NUCLEAR=False,
            num_warps=nw, num_stages=1,
        )
        new_state = v
    else:
        P, fpart = polar_newton_schulz(M, _ref.NUCLEAR_ITERS if iters is None else iters)
        npart = _sumsq_partials(P, M)  # ⟨P, M⟩ = ‖M‖_*
        epilogue_kernel[egrid](
            M, P, g_m, g_m, fpart, npart, value, g_m, m, n, fpart.shape[1], npart.shape[1],
            M.stride(0), M.stride(1), M.stride(2), P.stride(0), P.stride(1), P.stride(2), 0, 0,
            fpart.stride(0), npart.stride(0), g_m.stride(0), g_m.stride(1), g_m.stride(2),
            BLOCK_M=bm, BLOCK_N=bn, FP=_p2(fpart.shape[1]), SP=_p2(npart.shape[1]), NUCLEAR=True,
            num_warps=nw, num_stages=1,
        )
        new_state = _empty(Bt, 0, device=dev)

    grad = g_m if L3 is None else batched_gemm(g_m, L3.mT)
    return value, grad, new_state


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (what the launcher runs on H100)
# ---------------------------------------------------------------------------------------------


# The calls the AOT table compiles: the batch (32 matrices of 4096², every size a multiple of
# 16, so the JIT marks the strides divisible by 16 and vectorizes), the same with an odd n (4093: no
# row stride divisible by 16, the unaligned variant the JIT compiles for such shapes), and a stack
# with a short side (64: the "small" GEMM and symmetric-product configurations).
AOT_SHAPES = ((32, 4096, 4096), (32, 4096, 4093), (8, 64, 1536))


def _call_specs(Bt: int, m: int, n: int) -> list[tuple]:
    """(name, kernel, argument values, constexprs, num_warps, num_stages, tensor cores, label) of
    every launch ``stable_rank`` makes on CUDA for a contiguous W [Bt, m, n] (bf16 W with a bf16 L;
    fp32 W without L; fp32 M and Newton–Schulz iterates), with the strides and sizes its launchers
    pass (see batched_gemm, symmetric_product, top_singular_pair, polar_newton_schulz, stable_rank;
    internal buffers from _empty_rows16 have row strides padded to 16). Pointers are dtype strings
    (fresh allocations: 16-byte aligned)."""
    out = []
    f32 = "*fp32"
    tag = f"{Bt}x{m}x{n}"
    s_, l_ = min(m, n), max(m, n)
    np_, sp_, lp_ = _pad16(n), _pad16(s_), _pad16(l_)
    w_str = (m * n, n, 1)            # W, grad (contiguous)
    m_str = (m * np_, np_, 1)        # M = W L (padded rows)
    x_str = (s_ * lp_, lp_, 1)       # X, Xn [s, l]
    a_str = (s_ * sp_, sp_, 1)       # A, Pm [s, s]

    def gemm(label, cfg, dt, M, N, K, a, b, c, has_d, ns_round, b_dt=None):
        bm, bn, bk, gm, nw, ns = GEMM_CONFIGS[cfg]
        vals = dict(a_ptr=f"*{dt}", b_ptr=f"*{b_dt or dt}", c_ptr=f32, d_ptr=f32, M=M, N=N, K=K, alpha=1.0, beta=0.5,
                    s_ab=a[0], s_am=a[1], s_ak=a[2], s_bb=b[0], s_bk=b[1], s_bn=b[2], s_cb=c[0], s_cm=c[1],
                    s_cn=c[2], s_db=c[0], s_dm=c[1], s_dn=c[2])
        ce = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "HAS_D": has_d,
              "CAST_F32": dt == "fp32", "PREC": "tf32" if dt == "fp32" else "ieee", "ROUND_TF32": ns_round}
        dts = dt if b_dt is None else f"{dt}x{b_dt}"
        out.append(("bmm_kernel", bmm_kernel, vals, ce, nw, ns, True, f"{dts} {label} {bm}x{bn}x{bk} w{nw} s{ns} {tag}"))

    # M = W L (bf16 tensor cores), L [n, n] shared (batch stride 0); grad_W = grad_M Lᵀ (Lᵀ by strides)
    gemm("M = W L", _gemm_config(m, n, True, _CUDA), "bf16", m, n, n, w_str, (0, n, 1), m_str, False, False)
    gemm("grad_M Lᵀ", _gemm_config(m, n, False, _CUDA), "fp32", m, n, n, w_str, (0, 1, n), w_str, False, False)
    # the same with a bf16 L (Prehab passes L in bf16 for bf16 weights): fp32 grad_M, bf16 Lᵀ, upcast
    gemm("grad_M Lᵀ", _gemm_config(m, n, False, _CUDA), "fp32", m, n, n, w_str, (0, 1, n), w_str, False, False,
         b_dt="bf16")
    # Newton–Schulz on X [s, l]: X <- a·X + P X (P [s, s]); cubic steps are the same call
    gemm("NS X <- aX + P X", _gemm_config(s_, l_, False, _CUDA), "fp32", s_, l_, s_, a_str, x_str, x_str, True,
         True)
    for label, K, xs, has_d in (("X Xᵀ", l_, x_str, False), ("b·A + c·A²", s_, a_str, True)):
        blk, bk, nw, ns = SYRK_CONFIGS[_syrk_config(s_, _CUDA)]
        vals = dict(x_ptr=f32, c_ptr=f32, d_ptr=f32, S=s_, K=K, alpha=1.0, beta=0.5, s_xb=xs[0], s_xm=xs[1],
                    s_xk=xs[2], s_cb=a_str[0], s_cm=a_str[1], s_cn=a_str[2], s_db=a_str[0], s_dm=a_str[1],
                    s_dn=a_str[2])
        ce = {"BLOCK": blk, "BLOCK_K": bk, "HAS_D": has_d, "PREC": "tf32", "ROUND_TF32": True}
        out.append(("syrk_kernel", syrk_kernel, vals, ce, nw, ns, True,
                    f"fp32/tf32 {label} {blk}x{blk}x{bk} w{nw} s{ns} {tag}"))
    # power iteration ("stable"): on W read in place (L None: bf16 or fp32, W's strides) and on fp32
    # M = W L (padded rows)
    for dt, mm, what in (("bf16", w_str, "W"), ("fp32", w_str, "W"), ("fp32", m_str, "WL")):
        if what == "WL" and np_ == n:
            continue  # the same strides as fp32 W
        aligned = mm[1] % 16 == 0
        bm, chunk_n = _gemv_config(m, Bt, True, aligned)
        bn_t, chunk_m = _gemv_config(n, Bt, True, aligned)
        pm, pn = triton.cdiv(m, bm), triton.cdiv(n, bn_t)
        # first call: x = v0 with its one norm partial, ‖M‖_F² fused; then x = w (pn partials); the
        # last call writes v
        for label, n_xpart, write_v, fro in (("first", 1, False, True), ("", pn, False, False),
                                              ("last", pn, True, False)):
            vals = dict(m_ptr=f"*{dt}", x_ptr=f32, xpart_ptr=f32, y_ptr=f32, ypart_ptr=f32, v_ptr=f32,
                        fpart_ptr=f32, M=m, N=n, n_xpart=n_xpart, s_mb=mm[0], s_mm=mm[1], s_mn=mm[2], s_xb=n,
                        s_xpb=n_xpart, s_yb=m, s_ypb=pm, s_vb=n, s_fb=pm)
            ce = {"BLOCK_M": bm, "BLOCK_N": chunk_n, "XP": _p2(n_xpart), "WRITE_V": write_v, "FRO": fro}
            out.append(("mv_kernel", mv_kernel, vals, ce, 4, STREAM_STAGES, False,
                        f"{dt} {what} y = M v{' ' + label if label else ''}, {bm} rows x {chunk_n} {tag}"))
        vals = dict(m_ptr=f"*{dt}", y_ptr=f32, w_ptr=f32, wpart_ptr=f32, M=m, N=n, s_mb=mm[0], s_mm=mm[1],
                    s_mn=mm[2], s_yb=m, s_wb=n, s_wpb=pn)
        out.append(("mtv_kernel", mtv_kernel, vals, {"BLOCK_M": chunk_m, "BLOCK_N": bn_t}, 4, STREAM_STAGES, False,
                    f"{dt} {what} w = Mᵀ y, {bn_t} cols x {chunk_m} {tag}"))
    # ("nuclear") reductions, X0 = M/‖M‖_F, and the fused value + gradient epilogues, on fp32 M = W L
    rbm, rbn, rnw = ROWDOT_CONFIG["cuda"]
    n_rowdot = triton.cdiv(m, rbm)
    p_str = x_str if m <= n else (x_str[0], x_str[2], x_str[1])  # P = X, or X.mT when m > n
    for same in (True, False):
        vals = dict(a_ptr=f32, b_ptr=f32, part_ptr=f32, M=m, N=n, s_ab=(m_str if same else p_str)[0],
                    s_am=(m_str if same else p_str)[1], s_an=(m_str if same else p_str)[2], s_bb=m_str[0],
                    s_bm=m_str[1], s_bn=m_str[2], s_pb=n_rowdot)
        out.append(("rowdot_kernel", rowdot_kernel, vals, {"BLOCK_M": rbm, "BLOCK_N": rbn, "SAME": same}, rnw,
                    STREAM_STAGES, False, f"fp32 {'|M|_F²' if same else '<P, M>'} {rbm}x{rbn} {tag}"))
    ebm, ebn, enw = ELEM_CONFIG["cuda"]
    vals = dict(a_ptr=f32, o_ptr=f32, fpart_ptr=f32, M=m, N=n, n_fpart=n_rowdot, s_ab=m_str[0], s_am=m_str[1],
                s_an=m_str[2], s_ob=p_str[0], s_om=p_str[1], s_on=p_str[2], s_fb=n_rowdot)
    out.append(("scale_kernel", scale_kernel, vals, {"BLOCK_M": ebm, "BLOCK_N": ebn, "FP": _p2(n_rowdot),
                                                     "ROUND_TF32": True}, enw, 1, False,
                f"fp32 X0 = M/|M|_F {ebm}x{ebn} {tag}"))
    bm, _ = _gemv_config(m, Bt, True, m_str[1] % 16 == 0)
    pm = triton.cdiv(m, bm)
    stable = dict(m_ptr=f32, p_ptr=f32, u_ptr=f32, v_ptr=f32, fpart_ptr=f32, spart_ptr=f32, value_ptr=f32,
                  g_ptr=f32, M=m, N=n, n_fpart=pm, n_spart=pm, s_mb=m_str[0], s_mm=m_str[1], s_mn=m_str[2],
                  s_pb=0, s_pm=0, s_pn=0, s_ub=m, s_vb=n, s_fb=pm, s_sb=pm, s_gb=w_str[0], s_gm=w_str[1],
                  s_gn=w_str[2])
    nuclear = dict(stable, n_fpart=n_rowdot, n_spart=n_rowdot, s_pb=p_str[0], s_pm=p_str[1], s_pn=p_str[2],
                   s_ub=0, s_vb=0, s_fb=n_rowdot, s_sb=n_rowdot)
    for nuc, vals in ((False, stable), (True, nuclear)):
        ce = {"BLOCK_M": ebm, "BLOCK_N": ebn, "FP": _p2(vals["n_fpart"]), "SP": _p2(vals["n_spart"]),
              "NUCLEAR": nuc}
        out.append(("epilogue_kernel", epilogue_kernel, vals, ce, enw, 1, False,
                    f"fp32 {'nuclear' if nuc else 'stable (rank-1 fused)'} {ebm}x{ebn} {tag}"))
    return out


def _all_aligned(sig: dict, attrs: dict, fn) -> bool:
    """Every non-constexpr int argument of the specialization divisible by 16: the loads must then be
    16 bytes wide (an unaligned variant may legitimately load narrower)."""
    names = list(fn.arg_names)
    return all(t not in ("i32", "i64") or (names.index(n),) in attrs for n, t in sig.items())


def aot_specs() -> list[dict]:
    """Every kernel launch ``stable_rank`` makes on H100 for the shapes of :data:`AOT_SHAPES`,
    specialized as Triton's JIT specializes those calls (:func:`prehab_svd.aot.jit_specialization`:
    ints equal to 1 constant, ints divisible by 16 and the pointers marked 16-divisible), so the
    table shows the variants real calls run, the unaligned (odd n) ones included. Aligned variants
    must load 16 bytes per global access (``vector_loads``)."""
    from prehab_svd.aot import jit_specialization

    specs, seen = [], set()
    for Bt, m, n in AOT_SHAPES:
        for name, fn, vals, ce, nw, ns, tc, label in _call_specs(Bt, m, n):
            sig, constexprs, attrs = jit_specialization(fn, vals, ce)
            key = (name, repr(sorted(sig.items())), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   nw, ns)
            if key in seen:  # the same compiled variant (e.g. a shape-independent reduction)
                continue
            seen.add(key)
            specs.append({"name": name, "fn": fn, "signature": sig, "constexprs": constexprs, "attrs": attrs,
                          "num_warps": nw, "num_stages": ns, "tensor_cores": tc,
                          "vector_loads": _all_aligned(sig, attrs, fn), "config": label})
    return specs
