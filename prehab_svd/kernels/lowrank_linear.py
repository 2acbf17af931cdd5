"""Triton kernels of the low-rank linear ``y = (x Vᵀ) Uᵀ + b`` (forward only).

x [..., in] is flattened to [T, in]; V [r, in], U [out, r], bias [out] or None, all in one dtype
(fp32 / fp16 / bf16); products accumulate in fp32, y comes back in x's dtype. The backward is plain
torch (``prehab_svd.ops.reference.lowrank_linear_backward``, registered in ``prehab_svd/ops/library.py``).
The math is :func:`prehab_svd.ops.reference.lowrank_linear`; these kernels are faster ways to it.

Two paths, picked by the token count T (:func:`choose_path`; ``path=`` forces one):

(a) ``"decode"`` (T ≤ ``DECODE_MAX_T``): a memory-bound regime. The bytes that matter are the two
    factors, r·(in + out) elements, versus T·(in + out) for the activations, so the goal is to stream
    each factor from HBM exactly once with every SM busy. Two tiny launches share an fp32 workspace
    z [T, r]:

    1. ``_lowrank_down_kernel``, grid (r-blocks × in-splits × token-blocks): z = x Vᵀ. Each program
       reads one [BLOCK_R, in/split] slab of V; when ``in`` is split (needed to fill 132 SMs when r is
       only a few hundred rows) the partial sums are either stored, one [T, r] slice per split, and
       summed by the up kernel as it loads z (``split_reduce="load"``: the default for the GEMV
       programs, T = 1, up to ``_LOAD_MAX_SPLIT`` splits: two launches in all, deterministic), or added
       into one zeroed z with fp32 atomics (``"atomic"``: a memset launch more; the default for token
       tiles, whose up to 16 splits of T·r partials would be re-read by every out-block).
    2. ``_lowrank_up_kernel``, grid (out-blocks × token-blocks): y = z Uᵀ + b, bias in the epilogue.
       Each program reads one [BLOCK_O, r] slab of U and all of z.

    Why two launches and not one fused kernel: V and U are each read exactly once from HBM (the
    bandwidth optimum); the only extra traffic is z, T·r fp32 words (T=16, r=819: 52 KB, L2-resident),
    written once and re-read from L2 by each out-block. A single fused split-r kernel (each program
    owns an r-block, computes z_blk on chip, then atomically adds z_blk U_blkᵀ into y) saves z's
    round trip but needs an fp32 y accumulator with T·out·(r/BLOCK_R) atomics, a memset of it and a
    final cast launch: more launches and more atomic traffic, not fewer bytes of factors. Here the
    only atomics are the in-split partial sums of z (T·r·split of them), and there are none at all
    when the r-blocks alone fill the GPU or the partials are summed on load (then the result is
    bitwise deterministic; with atomics the order of the fp32 additions varies from run to run, so
    results may differ in the last bits between runs). The price of summing on load: each up program
    reads split·r fp32 words of z from L2 instead of r (T = 1, r = 819, 4 splits: 13 KB next to its
    8·819·2 = 13 KB slab of U from HBM); whether that beats the memset launch is for bench/ on the GPU
    (``split_reduce=`` forces either).

    T == 1 uses GEMV programs (``BLOCK_T == 1``: broadcast-multiply and ``tl.sum`` in fp32, no
    tensor cores: a GEMV has nothing for them to do, and z stays fp32 end to end). T > 1 uses
    ``tl.dot`` on token tiles of 16-64 rows (tensor cores: mma.sync for 16-32-row tiles, wgmma for
    64; tokens beyond T are masked padding); there z is rounded to x's dtype at the input of the second product, exactly as torch's
    two-matmul baseline rounds its bf16 intermediate.

(b) ``"gemm"`` (many tokens): two tensor-core GEMM launches of one kernel, ``_lowrank_gemm_kernel``
    (tiled, grouped program order for L2 reuse, fp32 accumulators, wgmma on Hopper):
    z = x Vᵀ stored in x's dtype (bf16 for bf16 inputs: the same rounding and the same bytes as torch's
    baseline, half the traffic of an fp32 z), then y = z Uᵀ + b with the bias added in the epilogue
    before the single rounding to x's dtype.

fp32 inputs use ``input_precision="ieee"`` (exact fp32 products like torch's default), or tf32 when
``torch.backends.cuda.matmul.allow_tf32`` is set, as torch.mm would.

Alignment: the kernels take any shape and stride; their speed needs 16-aligned row strides. Triton
marks an integer argument as aligned only when it is divisible by 16, and only then issues 16-byte
vector loads and cp.async pipelines. Real ranks are ragged (LLaMA-7B at keep 0.4/0.6/0.8: 819, 1228,
1638, 1791), so (1) LowRankLinear stores U [out, r] as a view of an [out, r16] buffer (and V of
[r, in16]): U's row stride is aligned whatever r is; (2) the launchers allocate z in a [T, r16]
buffer and pass that padded stride (and R_STORE / N_STORE = r16 for its stores); (3) the loops over r
mask at 16·⌊r/16⌋ (a bound the compiler sees as a multiple of 16), then take one 16-wide masked step
for the last r mod 16 columns, never reading past column r (so the padding's content is irrelevant,
and an unpadded U is still read correctly, with scalar loads). Measured on the sm_90a compile of
y = z Uᵀ at 128×128×64, r = 819: before, scalar ld.b16, no cp.async pipeline (32 KB of shared
memory), 255 registers; after, 16-byte cp.async into 4 stages (128 KB), 113 registers, as at r = 1024.
Every (tile index × runtime stride) product is int64 (x may be column-major with T·in ≥ 2³¹).

Block sizes come from a small deterministic shape heuristic (no autotuning: it fails under the
interpreter and costs seconds per new shape); under ``TRITON_INTERPRET=1`` one small config is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from prehab_svd.ops._triton import interpreting as _interpreting

__all__ = ["lowrank_linear", "choose_path", "aot_specs", "DECODE_MAX_T"]

# Decode path, in-split partial sums: up to this many splits of a GEMV (T = 1) down kernel are summed
# by the up kernel when it loads z (2 launches, deterministic); more splits, and the token-tile
# kernels (split up to 16, T·r per split), add into a zeroed z with fp32 atomics (3 launches).
_LOAD_MAX_SPLIT = 8

# Token count up to which the decode path (a) runs; above it the two tensor-core GEMMs (b).
# At T ≈ 64 the decode path re-reads z (T·r fp32) from L2 once per out-block, which begins to cost as
# much as streaming U, while the GEMM path's tiles fill the GPU from a few hundred tokens on; the
# crossover is a GPU measurement still to be made (bench/), this is the design's starting point.
DECODE_MAX_T = 64




def choose_path(T: int) -> str:
    """``"decode"`` for few tokens (T ≤ DECODE_MAX_T), else ``"gemm"``."""
    return "decode" if T <= DECODE_MAX_T else "gemm"


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
#
# Index math: every (tile index × runtime stride) product is formed in int64 (``.to(tl.int64)`` on the
# index vector, ``tl.cast(stride, tl.int64)`` for the pointer steps): a column-major x has
# stride_xk = T, and k·T passes 2³¹ once T·in does (T = 524 288 tokens of a 4096-wide layer). A
# constexpr unit stride keeps the product a constant, so the cast costs nothing on row-major inputs.
#
# Ragged reduction lengths: the rank r (819, 1228, 1791 ...) is the reduction length of y = z Uᵀ. The
# main loop runs over R_EVEN = 16·⌊r/16⌋ with the mask `offs < R_EVEN`; R_EVEN is a multiple of 16
# the compiler can see, so the mask is constant over every 16-element group and the loads stay 16-byte
# vectors (cp.async into the pipelined shared-memory stages). The last r − R_EVEN < 16 columns take
# one extra 16-wide masked step after the loop. Loads never touch memory past column r, so any U
# (padded or not) is read correctly; the speed needs only 16-aligned row strides (LowRankLinear's
# padded storage, and z's padded rows allocated here).


@triton.jit
def _load_z(ptrs, mask, N_PARTS, stride_zs):
    """z at ``ptrs``: the sum of the N_PARTS split partials stored stride_zs apart (in fp32, in a
    fixed order: deterministic), or z itself for N_PARTS = 1 (a constexpr then: no loop)."""
    z = tl.load(ptrs, mask=mask, other=0.0)
    for p in range(1, N_PARTS):
        z += tl.load(ptrs + tl.cast(stride_zs, tl.int64) * p, mask=mask, other=0.0)
    return z


@triton.jit
def _lowrank_down_kernel(
    x_ptr, v_ptr, z_ptr,
    T, R, R_STORE, K, K_PER_SPLIT,
    stride_xt, stride_xk, stride_vr, stride_vk, stride_zs, stride_zt, stride_zr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """z[s, t, j] (+)= Σ_{k in in-split s} x[t, k] V[j, k], in fp32: with stride_zs = 0 every split
    adds into one z (ATOMIC, z zeroed first); with stride_zs = T·r16 each split stores its own partial
    (summed by the up kernel on load: no memset launch, no atomics).

    Columns R ≤ j < R_STORE (z's row padding, R_STORE its 16-aligned row length) are stored as 0
    (their V rows are masked out): the store mask is then 16-aligned too, so stores are vectors."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    st_mask = offs_r < R_STORE
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    offs_kb = tl.arange(0, BLOCK_K)
    v_rows = v_ptr + offs_r.to(tl.int64)[:, None] * stride_vr
    z_cols = offs_r.to(tl.int64) * stride_zr + pid_k.to(tl.int64) * stride_zs
    if BLOCK_T == 1:
        # GEMV: one token per program; V tile [BLOCK_R, BLOCK_K] times the broadcast x chunk.
        x_row = x_ptr + pid_t.to(tl.int64) * stride_xt
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + offs_kb
            k_mask = offs_k < k_hi
            ck = offs_k.to(tl.int64)
            xv = tl.load(x_row + ck * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
            v = tl.load(v_rows + ck[None, :] * stride_vk, mask=r_mask[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(v * xv[None, :], axis=1)
        z_ptrs = z_ptr + pid_t.to(tl.int64) * stride_zt + z_cols
        if ATOMIC:
            tl.atomic_add(z_ptrs, acc, mask=r_mask)
        else:
            tl.store(z_ptrs, acc, mask=st_mask)
    else:
        # a token tile [BLOCK_T, BLOCK_K] against a V slab [BLOCK_R, BLOCK_K] on the tensor cores
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
        acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + offs_kb
            k_mask = offs_k < k_hi
            ck = offs_k.to(tl.int64)
            xt = tl.load(x_rows + ck[None, :] * stride_xk, mask=t_mask[:, None] & k_mask[None, :],
                         other=0.0)
            v = tl.load(v_rows + ck[None, :] * stride_vk, mask=r_mask[:, None] & k_mask[None, :],
                        other=0.0)
            acc = tl.dot(xt, tl.trans(v), acc, input_precision=DOT_PREC)
        z_ptrs = z_ptr + offs_t.to(tl.int64)[:, None] * stride_zt + z_cols[None, :]
        if ATOMIC:
            tl.atomic_add(z_ptrs, acc, mask=t_mask[:, None] & r_mask[None, :])
        else:
            tl.store(z_ptrs, acc, mask=t_mask[:, None] & st_mask[None, :])


@triton.jit
def _lowrank_up_kernel(
    z_ptr, u_ptr, b_ptr, y_ptr,
    T, N, R, N_PARTS,
    stride_zs, stride_zt, stride_zr, stride_un, stride_ur, stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """y[t, o] = Σ_j z[t, j] U[o, j] + b[o]; z is the fp32 workspace of the down kernel (the sum of
    its N_PARTS split partials, stride_zs apart, when the down kernel stored partials).

    The r loop covers R_EVEN = 16·⌊R/16⌋ with 16-aligned masks (vector loads), then one 16-wide
    masked step for the last R − R_EVEN columns (see the note above the kernels)."""
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < N
    offs_rb = tl.arange(0, BLOCK_R)
    offs_rt = tl.arange(0, 16)
    R_EVEN = (R // 16) * 16
    u_rows = u_ptr + offs_o.to(tl.int64)[:, None] * stride_un
    if BLOCK_T == 1:
        z_row = z_ptr + pid_t.to(tl.int64) * stride_zt
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for r0 in range(0, R_EVEN, BLOCK_R):
            offs_r = r0 + offs_rb
            r_mask = offs_r < R_EVEN
            cr = offs_r.to(tl.int64)
            zv = _load_z(z_row + cr * stride_zr, r_mask, N_PARTS, stride_zs)
            u = tl.load(u_rows + cr[None, :] * stride_ur, mask=o_mask[:, None] & r_mask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(u * zv[None, :], axis=1)
        if R_EVEN < R:
            offs_r = R_EVEN + offs_rt
            r_mask = offs_r < R
            cr = offs_r.to(tl.int64)
            zv = _load_z(z_row + cr * stride_zr, r_mask, N_PARTS, stride_zs)
            u = tl.load(u_rows + cr[None, :] * stride_ur, mask=o_mask[:, None] & r_mask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(u * zv[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)
        y_ptrs = y_ptr + pid_t.to(tl.int64) * stride_yt + offs_o.to(tl.int64) * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=o_mask)
    else:
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        z_rows = z_ptr + offs_t.to(tl.int64)[:, None] * stride_zt
        acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
        for r0 in range(0, R_EVEN, BLOCK_R):
            offs_r = r0 + offs_rb
            r_mask = offs_r < R_EVEN
            cr = offs_r.to(tl.int64)
            # z is rounded to the factors' dtype here (a no-op for fp32), like torch's baseline
            zt = _load_z(z_rows + cr[None, :] * stride_zr, t_mask[:, None] & r_mask[None, :], N_PARTS,
                         stride_zs).to(u_ptr.dtype.element_ty)
            u = tl.load(u_rows + cr[None, :] * stride_ur, mask=o_mask[:, None] & r_mask[None, :],
                        other=0.0)
            acc = tl.dot(zt, tl.trans(u), acc, input_precision=DOT_PREC)
        if R_EVEN < R:
            offs_r = R_EVEN + offs_rt
            r_mask = offs_r < R
            cr = offs_r.to(tl.int64)
            zt = _load_z(z_rows + cr[None, :] * stride_zr, t_mask[:, None] & r_mask[None, :], N_PARTS,
                         stride_zs).to(u_ptr.dtype.element_ty)
            u = tl.load(u_rows + cr[None, :] * stride_ur, mask=o_mask[:, None] & r_mask[None, :],
                        other=0.0)
            acc = tl.dot(zt, tl.trans(u), acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_o.to(tl.int64)[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & o_mask[None, :])


@triton.jit
def _lowrank_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K, N_STORE,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """C = A B (+ bias[N] broadcast over rows), fp32 accumulation, one rounding to C's dtype.

    Used twice: A = x, B = Vᵀ (B[k, n] = V[n, k]: pass V's strides swapped), C = z; then A = z,
    B = Uᵀ, C = y with the bias. Columns N ≤ n < N_STORE of C are stored as 0 (B's columns there are
    masked out): z's row padding, so that the store mask is 16-aligned. The K loop runs over
    K_EVEN = 16·⌊K/16⌋ (16-aligned masks: vector cp.async, pipelined), then one 16-deep masked step.
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    # Walk the output tiles in bands of GROUP_M tile-rows, column by column inside a band, so that
    # the programs running at the same time share A rows and B columns in L2.
    per_band = GROUP_M * n_n
    band = pid // per_band
    first_m = band * GROUP_M
    band_rows = tl.minimum(n_m - first_m, GROUP_M)
    local = pid - band * per_band
    pid_m = first_m + local % band_rows
    pid_n = local // band_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = offs_n.to(tl.int64)[None, :] * stride_bn
    a_ptrs = a_ptr + a_rows + offs_k.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + b_cols
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K
    K_EVEN = (K // 16) * 16
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(tl.cdiv(K_EVEN, BLOCK_K)):
        k_left = K_EVEN - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += a_step
        b_ptrs += b_step
    if K_EVEN < K:
        offs_kt = K_EVEN + tl.arange(0, 16)
        kt_mask = offs_kt < K
        ckt = offs_kt.to(tl.int64)
        a = tl.load(a_ptr + a_rows + ckt[None, :] * stride_ak, mask=m_mask[:, None] & kt_mask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + ckt[:, None] * stride_bk + b_cols, mask=kt_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n[None, :] < N_STORE))


# ---------------------------------------------------------------------------------------------
# configurations (a small deterministic heuristic; see aot_specs for the H100 set)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DecodeConfig:
    block_t: int
    down_r: int
    down_k: int
    down_warps: int
    up_o: int
    up_r: int
    up_warps: int
    stages: int


@dataclass(frozen=True)
class _GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    warps: int
    stages: int


# H100 (bf16/fp16). GEMV rows: 8 rows × 512 bf16 = 8 KB of V in flight per program per step.
_DECODE_GEMV = _DecodeConfig(1, down_r=8, down_k=512, down_warps=4, up_o=8, up_r=256, up_warps=4, stages=3)


def _decode_dot_config(block_t: int) -> _DecodeConfig:
    # larger token tiles take larger out-blocks so z (re-read from L2 once per out-block) costs less
    up_o = 32 if block_t <= 32 else 64
    return _DecodeConfig(block_t, down_r=32, down_k=128, down_warps=4, up_o=up_o, up_r=64, up_warps=4,
                         stages=3)


_GEMM_BIG = _GemmConfig(128, 128, 64, 8, warps=8, stages=4)   # 128 KB of smem in the pipeline
_GEMM_SMALL = _GemmConfig(64, 128, 64, 8, warps=4, stages=4)  # when 128×128 tiles underfill the SMs
_GEMM_FP32 = _GemmConfig(64, 64, 32, 8, warps=4, stages=3)    # ieee fp32: CUDA-core FMA, no tensor cores

# the interpreter: one small config (tl.dot needs every dimension ≥ 16)
_INTERP_DECODE_DOT = _DecodeConfig(16, down_r=16, down_k=16, down_warps=4, up_o=16, up_r=16, up_warps=4,
                                   stages=1)
_INTERP_DECODE_GEMV = _DecodeConfig(1, down_r=16, down_k=32, down_warps=4, up_o=16, up_r=32, up_warps=4,
                                    stages=1)
_INTERP_GEMM = _GemmConfig(32, 32, 16, 4, warps=4, stages=1)

_SM_COUNT: dict = {}
_H100_SMS = 132  # the AOT specs' target (H100 / H200 SXM)
_ALIGN = 16  # elements: Triton marks an integer as aligned only when divisible by 16


def _pad16(n: int) -> int:
    """``n`` rounded up to a multiple of 16 (the row length of z's padded buffer)."""
    return -(-max(int(n), 1) // _ALIGN) * _ALIGN


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a pretend GPU, so that the split heuristic is exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _decode_config(T: int, cuda: bool, block_t: Optional[int]) -> _DecodeConfig:
    if block_t is None:
        block_t = 1 if T == 1 else max(16, min(64, triton.next_power_of_2(T)))
    if block_t != 1 and (block_t < 16 or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be 1 (GEMV) or a power of two ≥ 16, got {block_t}")
    if not cuda:
        base = _INTERP_DECODE_GEMV if block_t == 1 else _INTERP_DECODE_DOT
        return _DecodeConfig(block_t, base.down_r, base.down_k, base.down_warps, base.up_o, base.up_r,
                             base.up_warps, base.stages)
    return _DECODE_GEMV if block_t == 1 else _decode_dot_config(block_t)


def _split_k(K: int, n_blocks: int, block_k: int, n_sm: int) -> int:
    """How many in-splits for the down kernel: none when the r-blocks (× token blocks) alone give
    two programs per SM; otherwise enough for about four per SM, each split at least 2 K-steps."""
    if n_blocks >= 2 * n_sm:
        return 1
    max_split = max(1, K // (2 * block_k))
    return max(1, min(max_split, triton.cdiv(4 * n_sm, n_blocks)))


def _gemm_config(M: int, N: int, dtype: torch.dtype, cuda: bool, n_sm: int) -> _GemmConfig:
    if not cuda:
        return _INTERP_GEMM
    if dtype == torch.float32:
        return _GEMM_FP32
    big = _GEMM_BIG
    if triton.cdiv(M, big.block_m) * triton.cdiv(N, big.block_n) >= n_sm:
        return big
    return _GEMM_SMALL


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # exact fp32 products; ignored for 16-bit operands


# ---------------------------------------------------------------------------------------------
# launch plans: the launcher runs them, aot_specs compiles exactly the same ones
# ---------------------------------------------------------------------------------------------


@dataclass
class _Launch:
    """One kernel launch: runtime arguments by name (tensors, ints), constexprs, grid, warps."""
    kernel: object
    grid: tuple
    args: dict
    meta: dict
    num_warps: int
    num_stages: int
    kind: str  # "down" / "up" (decode path), "gemm-z" / "gemm-y" (GEMM path)


def _gemm_launch(a, b, b_kn_strides, bias, c, N: int, prec: str, cuda: bool, n_sm: int, kind: str):
    """C[:, :N] = a @ B (+ bias), where B[k, n] lives in ``b`` at strides ``b_kn_strides``; c is the
    whole output buffer (its columns N.. are z's row padding, stored as 0)."""
    M, K = a.shape
    cfg = _gemm_config(M, N, a.dtype, cuda, n_sm)
    return _Launch(
        _lowrank_gemm_kernel, (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),),
        dict(a_ptr=a, b_ptr=b, bias_ptr=bias if bias is not None else c, c_ptr=c,
             M=M, N=N, K=K, N_STORE=c.shape[1],
             stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b_kn_strides[0],
             stride_bn=b_kn_strides[1], stride_cm=c.stride(0), stride_cn=c.stride(1)),
        dict(HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
             GROUP_M=cfg.group_m, DOT_PREC=prec),
        cfg.warps, cfg.stages, kind)


def _plan_gemm(x2, U, V, bias, y, prec, cuda, n_sm) -> list[_Launch]:
    T, _ = x2.shape
    R = V.shape[0]
    # the intermediate in x's dtype (the same rounding and bytes as torch's two-matmul baseline),
    # rows padded to a multiple of 16 elements so that both GEMMs see a 16-aligned row stride
    zbuf = _empty((T, _pad16(R)), x2.dtype, x2.device)
    z = zbuf[:, :R]
    return [_gemm_launch(x2, V, (V.stride(1), V.stride(0)), None, zbuf, R, prec, cuda, n_sm, "gemm-z"),
            _gemm_launch(z, U, (U.stride(1), U.stride(0)), bias, y, U.shape[0], prec, cuda, n_sm, "gemm-y")]


def _plan_decode(x2, U, V, bias, y, prec, split_k, block_t, cuda, n_sm, split_reduce="auto") -> list[_Launch]:
    T, K = x2.shape
    R = V.shape[0]
    N = U.shape[0]
    dev = x2.device
    cfg = _decode_config(T, cuda, block_t)
    n_t = triton.cdiv(T, cfg.block_t)
    if n_t > 65535:  # the token blocks are a y/z grid dimension (at most 65535); far outside decode
        return _plan_gemm(x2, U, V, bias, y, prec, cuda, n_sm)
    n_r = triton.cdiv(R, cfg.down_r)
    if split_k is None:
        split_k = _split_k(K, n_r * n_t, cfg.down_k, n_sm)
    split_k = max(1, min(int(split_k), triton.cdiv(max(K, 1), cfg.down_k)))
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split_k), cfg.down_k) * cfg.down_k
    split_k = triton.cdiv(max(K, 1), k_per_split)  # no empty splits
    if split_reduce == "auto":
        split_reduce = "load" if cfg.block_t == 1 and split_k <= _LOAD_MAX_SPLIT else "atomic"
    if split_reduce not in ("atomic", "load"):
        raise ValueError(f"split_reduce must be 'auto', 'atomic' or 'load', got {split_reduce!r}")
    atomic = split_k > 1 and split_reduce == "atomic"
    n_parts = split_k if split_k > 1 and not atomic else 1
    # fp32 workspace [T, r] in a [T, r16] buffer (16-aligned rows); tiny (T·r words). Split partial
    # sums either go into one zeroed z with atomics, or each into its own [T, r16] slice of an
    # [n_parts, T, r16] buffer, summed by the up kernel when it loads z.
    R_pad = _pad16(R)
    z = (torch.zeros((T, R_pad), dtype=torch.float32, device=dev) if atomic
         else _empty((n_parts, T, R_pad), torch.float32, dev))
    zs = 0 if z.dim() == 2 else z.stride(0)
    down = _Launch(
        _lowrank_down_kernel, (n_r, split_k, n_t),
        dict(x_ptr=x2, v_ptr=V, z_ptr=z, T=T, R=R, R_STORE=R_pad, K=K, K_PER_SPLIT=k_per_split,
             stride_xt=x2.stride(0), stride_xk=x2.stride(1), stride_vr=V.stride(0), stride_vk=V.stride(1),
             stride_zs=zs, stride_zt=z.stride(-2), stride_zr=z.stride(-1)),
        dict(BLOCK_T=cfg.block_t, BLOCK_R=cfg.down_r, BLOCK_K=cfg.down_k, ATOMIC=atomic, DOT_PREC=prec),
        cfg.down_warps, cfg.stages, "down")
    up = _Launch(
        _lowrank_up_kernel, (triton.cdiv(N, cfg.up_o), n_t),
        dict(z_ptr=z, u_ptr=U, b_ptr=bias if bias is not None else y, y_ptr=y, T=T, N=N, R=R, N_PARTS=n_parts,
             stride_zs=zs, stride_zt=z.stride(-2), stride_zr=z.stride(-1), stride_un=U.stride(0),
             stride_ur=U.stride(1),
             stride_yt=y.stride(0), stride_yn=y.stride(1)),
        dict(HAS_BIAS=bias is not None, BLOCK_T=cfg.block_t, BLOCK_O=cfg.up_o, BLOCK_R=cfg.up_r,
             DOT_PREC=prec),
        cfg.up_warps, cfg.stages, "up")
    return [down, up]


def _plan(path, x2, U, V, bias, y, prec, split_k, block_t, cuda, n_sm, split_reduce="auto") -> list[_Launch]:
    if path == "decode":
        return _plan_decode(x2, U, V, bias, y, prec, split_k, block_t, cuda, n_sm, split_reduce)
    return _plan_gemm(x2, U, V, bias, y, prec, cuda, n_sm)


def _execute(launches: list[_Launch]) -> None:
    for ln in launches:
        ln.kernel[ln.grid](**ln.args, **ln.meta, num_warps=ln.num_warps, num_stages=ln.num_stages)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialized buffers the kernels overwrite completely (tests swap in a NaN-filled version)."""
    return torch.empty(shape, dtype=dtype, device=device)


def lowrank_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    path: str = "auto",
    split_k: Optional[int] = None,
    block_t: Optional[int] = None,
    split_reduce: str = "auto",
) -> torch.Tensor:
    """``y = (x Vᵀ) Uᵀ + bias`` with Triton: x [..., in], V [r, in], U [out, r], bias [out] -> [..., out].

    ``path``: ``"auto"`` (by token count, :func:`choose_path`), ``"decode"`` or ``"gemm"``.
    ``split_k`` (decode path): number of in-splits of the down kernel (None: heuristic).
    ``split_reduce`` (decode path, split_k > 1): ``"load"`` (partials summed by the up kernel),
    ``"atomic"`` (fp32 atomics into a zeroed z) or ``"auto"`` (see the module docstring). ``block_t`` (decode path): token tile, 1 for GEMV programs or a
    power of two ≥ 16 for tensor-core tiles (None: 1 when T == 1, else 16-64). These keywords are for
    tests and benchmarks; the dispatch calls the positional form.
    """
    if x.dim() < 1 or U.dim() != 2 or V.dim() != 2:
        raise ValueError(f"expected x [..., in], U [out, r], V [r, in]; got {tuple(x.shape)}, "
                         f"{tuple(U.shape)}, {tuple(V.shape)}")
    K = x.shape[-1]
    R, N = V.shape[0], U.shape[0]
    if V.shape[1] != K or U.shape[1] != R or (bias is not None and tuple(bias.shape) != (N,)):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, U {tuple(U.shape)}, V {tuple(V.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    dtype = x.dtype
    if dtype not in _DTYPES:
        raise TypeError(f"x must be fp32, fp16 or bf16, got {dtype}")
    for name, t in (("U", U), ("V", V), ("bias", bias)):
        if t is not None and (t.dtype != dtype or t.device != x.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {dtype} on {x.device}")
    dev = x.device
    if dev.type != "cuda":
        if not _interpreting():
            raise RuntimeError("the Triton low-rank linear runs on CUDA tensors, or on CPU tensors only "
                               "under the Triton interpreter (TRITON_INTERPRET=1)")
        if dtype == torch.bfloat16:
            raise TypeError("bf16 is not supported by the Triton interpreter (its bf16 tl.dot is wrong); "
                            "test fp32/fp16 on CPU and bf16 on a GPU")
    if path not in ("auto", "decode", "gemm"):
        raise ValueError(f"path must be 'auto', 'decode' or 'gemm', got {path!r}")

    x2 = x.reshape(-1, K)  # a view whenever the leading dims allow; any strides are passed through
    if bias is not None:
        bias = bias.contiguous()  # the kernels read bias at unit stride; a copy of `out` elements at most
    T = x2.shape[0]
    y = _empty((T, N), dtype, dev)
    if T == 0:
        return y.reshape(*x.shape[:-1], N)
    if R == 0 or K == 0:  # degenerate: no product to take (grids of size 0 cannot launch)
        y.copy_(bias.expand(T, N) if bias is not None else torch.zeros((), dtype=dtype, device=dev))
        return y.reshape(*x.shape[:-1], N)
    if path == "auto":
        path = choose_path(T)
    prec = _dot_precision(dtype, dev)
    cuda = dev.type == "cuda"
    launches = _plan(path, x2, U, V, bias, y, prec, split_k, block_t, cuda, _num_sms(dev), split_reduce)
    if cuda:
        with torch.cuda.device(dev):
            _execute(launches)
    else:
        _execute(launches)
    return y.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (H100, sm_90)
# ---------------------------------------------------------------------------------------------


# LLaMA-7B's projections (in, out) and the ranks the keep rule r = ⌊keep·in·out/(in + out)⌋ gives them
# at keep 0.4 / 0.6 / 0.8: 4096² -> 819, 1228, 1638; 11008×4096 -> 1194, 1791, 2388. None is a
# multiple of 16; 1024 stands for one that is (Triton then also specializes r itself as aligned).
_AOT_LAYERS = ((4096, 4096, 819), (4096, 4096, 1228), (4096, 4096, 1638), (11008, 4096, 1791),
               (4096, 11008, 1791), (4096, 4096, 1024))
_AOT_TOKENS = (1, 16, 32, 64, 128, 2048)  # GEMV, the three token tiles, both GEMM tilings
_TRITON_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _factor(rows: int, cols: int, dtype, device) -> torch.Tensor:
    """A [rows, cols] factor laid out as LowRankLinear stores it: a view of a [rows, cols16] buffer."""
    return torch.empty((rows, _pad16(cols)), dtype=dtype, device=device)[:, :cols]


def _spec_of(ln: _Launch) -> dict:
    """The ASTSource arguments of a launch as Triton's runtime specializes it: an integer equal to 1
    becomes a constexpr, one divisible by 16 gets ``tt.divisibility = 16``, so does a pointer whose
    address is 16-byte aligned (every buffer here; meta tensors stand in for them), others none."""
    sig, const, attrs = {}, dict(ln.meta), {}
    for i, name in enumerate(ln.kernel.arg_names):
        if name in ln.meta:
            sig[name] = "constexpr"
            continue
        v = ln.args[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TRITON_TY[v.dtype]
            aligned = (v.storage_offset() * v.element_size()) % 16 == 0
        else:
            v = int(v)
            if v == 1:
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            aligned = v % 16 == 0
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return {"name": ln.kernel.__name__, "fn": ln.kernel, "signature": sig, "constexprs": const,
            "attrs": attrs, "num_warps": ln.num_warps, "num_stages": ln.num_stages}


def _describe(ln: _Launch, dtype, R: int, T: int) -> str:
    ty, m = _TRITON_TY[dtype], ln.meta
    bias = " +bias" if m.get("HAS_BIAS") else ""
    rank = f"r={R}" if R % 16 else "r%16=0"
    if ln.kind in ("down", "up"):
        tile = "gemv" if m["BLOCK_T"] == 1 else f"dot T{m['BLOCK_T']}"
        blocks = (f"R{m['BLOCK_R']} K{m['BLOCK_K']}{' atomic' if m['ATOMIC'] else ''}" if ln.kind == "down"
                  else f"O{m['BLOCK_O']} R{m['BLOCK_R']}")
        return f"{ty} {ln.kind} {tile} {blocks}{bias} {rank} (T={T})"
    what = "z=xVᵀ" if ln.kind == "gemm-z" else "y=zUᵀ"
    return f"{ty} {m['BLOCK_M']}x{m['BLOCK_N']}x{m['BLOCK_K']} {what}{bias} {rank} (T={T})"


def aot_specs() -> list[dict]:
    """The H100 launches of real calls, for :func:`prehab_svd.aot.compile_all`: the launch plans of
    the launcher itself (``_plan``), on meta tensors laid out as LowRankLinear stores its factors,
    for LLaMA-7B's layers at its real ranks (819, 1228, 1638, 1791, and 1024 for a multiple of 16)
    and token counts 1-2048, in bf16 without bias (LLaMA's), plus fp32 and a bias variant; each
    distinct compile once. Signatures and divisibility hints are what Triton's runtime
    specialization gives those arguments (``_spec_of``), so a ragged rank compiles as it runs: r and
    K unhinted, the padded row strides of U and z hinted.

    tensor_cores: the bf16 GEMMs must use wgmma. The decode kernels are memory-bound: the GEMV ones
    (T = 1) use no tensor cores by design; the token-tile ones use ``tl.dot`` on 16-64 token rows,
    lowered to mma.sync (wgmma from 64 rows), so they are not required to be wgmma.
    """
    meta = torch.device("meta")
    cases = [(K, N, R, T, torch.bfloat16, False) for K, N, R in _AOT_LAYERS for T in _AOT_TOKENS]
    cases += [(4096, 4096, 819, T, torch.float32, False) for T in (1, 2048)]
    cases += [(4096, 4096, 819, T, torch.bfloat16, True) for T in (1, 2048)]
    specs, seen = [], {}
    for K, N, R, T, dtype, has_bias in cases:
        x2 = torch.empty((T, K), dtype=dtype, device=meta)
        U, V = _factor(N, R, dtype, meta), _factor(R, K, dtype, meta)
        y = torch.empty((T, N), dtype=dtype, device=meta)
        bias = torch.empty((N,), dtype=dtype, device=meta) if has_bias else None
        for ln in _plan(choose_path(T), x2, U, V, bias, y, "ieee", None, None, True, _H100_SMS):
            spec = _spec_of(ln)
            key = (spec["name"], tuple(spec["signature"].items()), tuple(sorted(spec["constexprs"].items())),
                   tuple(sorted(spec["attrs"])), spec["num_warps"], spec["num_stages"])
            if key in seen:
                seen[key]["shapes"].append((K, N, R, T))
                continue
            spec.update(config=_describe(ln, dtype, R, T), kind=ln.kind, rank=R, tokens=T,
                        dtype=_TRITON_TY[dtype], shapes=[(K, N, R, T)],
                        tensor_cores=ln.kind.startswith("gemm") and dtype != torch.float32)
            seen[key] = spec
            specs.append(spec)
    return specs
