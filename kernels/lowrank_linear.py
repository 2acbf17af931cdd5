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
       only a few hundred rows) the partial sums are added into z with fp32 atomics (z is zeroed
       first), otherwise stored.
    2. ``_lowrank_up_kernel``, grid (out-blocks × token-blocks): y = z Uᵀ + b, bias in the epilogue.
       Each program reads one [BLOCK_O, r] slab of U and all of z.

    Why two launches and not one fused kernel: V and U are each read exactly once from HBM (the
    bandwidth optimum); the only extra traffic is z, T·r fp32 words (T=16, r=819: 52 KB, L2-resident),
    written once and re-read from L2 by each out-block. A single fused split-r kernel (each program
    owns an r-block, computes z_blk on chip, then atomically adds z_blk U_blkᵀ into y) saves z's
    round trip but needs an fp32 y accumulator with T·out·(r/BLOCK_R) atomics, a memset of it and a
    final cast launch: more launches and more atomic traffic, not fewer bytes of factors. Here the
    only atomics are the in-split partial sums of z (T·r·split of them), and there are none at all
    when the r-blocks alone fill the GPU (then the result is bitwise deterministic; with
    ``split > 1`` the order of the fp32 atomic additions varies from run to run, so results may
    differ in the last bits between runs).

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

Alignment: the kernels take any shape and stride, but 16-byte vector loads and the cp.async
pipeline need rows that start 16-byte aligned. An odd rank (r = 819 for a 4096² layer at keep 0.4)
makes every row of U [out, r] (and of z) misaligned, so those loads fall back to 2-byte scalars and
the GEMMs' K loop is not pipelined. Storing factors with r rounded to a multiple of 8 (zero-padded
columns of U / rows of V change nothing in y) avoids it; that is a choice for the layer, not here.

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


@triton.jit
def _lowrank_down_kernel(
    x_ptr, v_ptr, z_ptr,
    T, R, K, K_PER_SPLIT,
    stride_xt, stride_xk, stride_vr, stride_vk, stride_zt, stride_zr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """z[t, j] (+)= Σ_{k in this program's in-split} x[t, k] V[j, k], in fp32."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    offs_kb = tl.arange(0, BLOCK_K)
    v_rows = v_ptr + offs_r.to(tl.int64)[:, None] * stride_vr
    if BLOCK_T == 1:
        # GEMV: one token per program; V tile [BLOCK_R, BLOCK_K] times the broadcast x chunk.
        x_row = x_ptr + pid_t.to(tl.int64) * stride_xt
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + offs_kb
            k_mask = offs_k < k_hi
            xv = tl.load(x_row + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
            v = tl.load(v_rows + offs_k[None, :] * stride_vk, mask=r_mask[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(v * xv[None, :], axis=1)
        z_ptrs = z_ptr + pid_t.to(tl.int64) * stride_zt + offs_r * stride_zr
        if ATOMIC:
            tl.atomic_add(z_ptrs, acc, mask=r_mask)
        else:
            tl.store(z_ptrs, acc, mask=r_mask)
    else:
        # a token tile [BLOCK_T, BLOCK_K] against a V slab [BLOCK_R, BLOCK_K] on the tensor cores
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
        acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + offs_kb
            k_mask = offs_k < k_hi
            xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=t_mask[:, None] & k_mask[None, :],
                         other=0.0)
            v = tl.load(v_rows + offs_k[None, :] * stride_vk, mask=r_mask[:, None] & k_mask[None, :],
                        other=0.0)
            acc = tl.dot(xt, tl.trans(v), acc, input_precision=DOT_PREC)
        z_ptrs = z_ptr + offs_t.to(tl.int64)[:, None] * stride_zt + offs_r[None, :] * stride_zr
        z_mask = t_mask[:, None] & r_mask[None, :]
        if ATOMIC:
            tl.atomic_add(z_ptrs, acc, mask=z_mask)
        else:
            tl.store(z_ptrs, acc, mask=z_mask)


@triton.jit
def _lowrank_up_kernel(
    z_ptr, u_ptr, b_ptr, y_ptr,
    T, N, R,
    stride_zt, stride_zr, stride_un, stride_ur, stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """y[t, o] = Σ_j z[t, j] U[o, j] + b[o]; z is the fp32 workspace of the down kernel."""
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < N
    offs_rb = tl.arange(0, BLOCK_R)
    u_rows = u_ptr + offs_o.to(tl.int64)[:, None] * stride_un
    if BLOCK_T == 1:
        z_row = z_ptr + pid_t.to(tl.int64) * stride_zt
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + offs_rb
            r_mask = offs_r < R
            zv = tl.load(z_row + offs_r * stride_zr, mask=r_mask, other=0.0)
            u = tl.load(u_rows + offs_r[None, :] * stride_ur, mask=o_mask[:, None] & r_mask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(u * zv[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)
        y_ptrs = y_ptr + pid_t.to(tl.int64) * stride_yt + offs_o * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=o_mask)
    else:
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        z_rows = z_ptr + offs_t.to(tl.int64)[:, None] * stride_zt
        acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + offs_rb
            r_mask = offs_r < R
            # z is rounded to the factors' dtype here (a no-op for fp32), like torch's baseline
            zt = tl.load(z_rows + offs_r[None, :] * stride_zr, mask=t_mask[:, None] & r_mask[None, :],
                         other=0.0).to(u_ptr.dtype.element_ty)
            u = tl.load(u_rows + offs_r[None, :] * stride_ur, mask=o_mask[:, None] & r_mask[None, :],
                        other=0.0)
            acc = tl.dot(zt, tl.trans(u), acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_o[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & o_mask[None, :])


@triton.jit
def _lowrank_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """C = A B (+ bias[N] broadcast over rows), fp32 accumulation, one rounding to C's dtype.

    Used twice: A = x, B = Vᵀ (B[k, n] = V[n, k]: pass V's strides swapped), C = z; then A = z,
    B = Uᵀ, C = y with the bias.
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
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a pretend GPU, so that the split heuristic is exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _decode_config(T: int, device: torch.device, block_t: Optional[int]) -> _DecodeConfig:
    if block_t is None:
        block_t = 1 if T == 1 else max(16, min(64, triton.next_power_of_2(T)))
    if block_t != 1 and (block_t < 16 or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be 1 (GEMV) or a power of two ≥ 16, got {block_t}")
    if device.type != "cuda":
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


def _gemm_config(M: int, N: int, dtype: torch.dtype, device: torch.device) -> _GemmConfig:
    if device.type != "cuda":
        return _INTERP_GEMM
    if dtype == torch.float32:
        return _GEMM_FP32
    big = _GEMM_BIG
    if triton.cdiv(M, big.block_m) * triton.cdiv(N, big.block_n) >= _num_sms(device):
        return big
    return _GEMM_SMALL


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # exact fp32 products; ignored for 16-bit operands


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _gemm(a: torch.Tensor, b: torch.Tensor, b_kn_strides, bias, c: torch.Tensor, prec: str):
    """c = a @ B (+ bias), where B[k, n] lives in ``b`` at strides ``b_kn_strides``."""
    M, N = c.shape
    K = a.shape[1]
    cfg = _gemm_config(M, N, a.dtype, a.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _lowrank_gemm_kernel[grid](
        a, b, bias if bias is not None else c, c,
        M, N, K,
        a.stride(0), a.stride(1), b_kn_strides[0], b_kn_strides[1], c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PREC=prec, num_warps=cfg.warps, num_stages=cfg.stages,
    )


def _run_gemm_path(x2, U, V, bias, y, prec):
    T, K = x2.shape
    R = V.shape[0]
    # the intermediate in x's dtype: the same rounding and bytes as torch's two-matmul baseline
    z = _empty((T, R), x2.dtype, x2.device)
    _gemm(x2, V, (V.stride(1), V.stride(0)), None, z, prec)  # z = x Vᵀ
    _gemm(z, U, (U.stride(1), U.stride(0)), bias, y, prec)   # y = z Uᵀ + b


def _run_decode_path(x2, U, V, bias, y, prec, split_k, block_t):
    T, K = x2.shape
    R = V.shape[0]
    N = U.shape[0]
    dev = x2.device
    cfg = _decode_config(T, dev, block_t)
    n_t = triton.cdiv(T, cfg.block_t)
    if n_t > 65535:  # the token blocks are a y/z grid dimension (at most 65535); far outside decode
        _run_gemm_path(x2, U, V, bias, y, prec)
        return
    n_r = triton.cdiv(R, cfg.down_r)
    if split_k is None:
        split_k = _split_k(K, n_r * n_t, cfg.down_k, _num_sms(dev))
    split_k = max(1, min(int(split_k), triton.cdiv(max(K, 1), cfg.down_k)))
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split_k), cfg.down_k) * cfg.down_k
    split_k = triton.cdiv(max(K, 1), k_per_split)  # no empty splits
    atomic = split_k > 1
    # fp32 workspace [T, r]: tiny (T·r words); zeroed only when split partial sums are added into it
    z = (torch.zeros((T, R), dtype=torch.float32, device=dev) if atomic
         else _empty((T, R), torch.float32, dev))
    _lowrank_down_kernel[(n_r, split_k, n_t)](
        x2, V, z,
        T, R, K, k_per_split,
        x2.stride(0), x2.stride(1), V.stride(0), V.stride(1), z.stride(0), z.stride(1),
        BLOCK_T=cfg.block_t, BLOCK_R=cfg.down_r, BLOCK_K=cfg.down_k, ATOMIC=atomic, DOT_PREC=prec,
        num_warps=cfg.down_warps, num_stages=cfg.stages,
    )
    _lowrank_up_kernel[(triton.cdiv(N, cfg.up_o), n_t)](
        z, U, bias if bias is not None else y, y,
        T, N, R,
        z.stride(0), z.stride(1), U.stride(0), U.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_T=cfg.block_t, BLOCK_O=cfg.up_o, BLOCK_R=cfg.up_r, DOT_PREC=prec,
        num_warps=cfg.up_warps, num_stages=cfg.stages,
    )


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
) -> torch.Tensor:
    """``y = (x Vᵀ) Uᵀ + bias`` with Triton: x [..., in], V [r, in], U [out, r], bias [out] -> [..., out].

    ``path``: ``"auto"`` (by token count, :func:`choose_path`), ``"decode"`` or ``"gemm"``.
    ``split_k`` (decode path): number of in-splits of the down kernel (None: heuristic; > 1 adds the
    partial sums with fp32 atomics). ``block_t`` (decode path): token tile, 1 for GEMV programs or a
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
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            _run(path, x2, U, V, bias, y, prec, split_k, block_t)
    else:
        _run(path, x2, U, V, bias, y, prec, split_k, block_t)
    return y.reshape(*x.shape[:-1], N)


def _run(path, x2, U, V, bias, y, prec, split_k, block_t):
    if path == "decode":
        _run_decode_path(x2, U, V, bias, y, prec, split_k, block_t)
    else:
        _run_gemm_path(x2, U, V, bias, y, prec)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (H100, sm_90)
# ---------------------------------------------------------------------------------------------


def aot_specs() -> list[dict]:
    """The H100 configurations the launcher uses (bf16, plus the fp32 GEMM config), for
    :func:`prehab_svd.aot.compile_all`. Unit strides (the usual row-major layouts) are constexpr 1,
    as Triton's runtime specialization makes them.

    tensor_cores: the GEMM configs must use wgmma. The decode kernels are memory-bound: the GEMV
    ones (T = 1) use no tensor cores by design; the token-tile ones use ``tl.dot`` on 16-64 token
    rows, which Triton lowers to mma.sync (M < 64 per warpgroup), not wgmma: still tensor cores, but
    not required to be wgmma, so they are marked False here and checked for ``mma`` in the tests.
    """

    def down(cfg: _DecodeConfig, atomic: bool, ty: str = "bf16") -> dict:
        sig = {"x_ptr": f"*{ty}", "v_ptr": f"*{ty}", "z_ptr": "*fp32",
               "T": "i32", "R": "i32", "K": "i32", "K_PER_SPLIT": "i32",
               "stride_xt": "i32", "stride_xk": "constexpr", "stride_vr": "i32", "stride_vk": "constexpr",
               "stride_zt": "i32", "stride_zr": "constexpr",
               "BLOCK_T": "constexpr", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr",
               "ATOMIC": "constexpr", "DOT_PREC": "constexpr"}
        const = {"stride_xk": 1, "stride_vk": 1, "stride_zr": 1, "BLOCK_T": cfg.block_t,
                 "BLOCK_R": cfg.down_r, "BLOCK_K": cfg.down_k, "ATOMIC": atomic, "DOT_PREC": "ieee"}
        kind = "gemv" if cfg.block_t == 1 else f"dot T{cfg.block_t}"
        return {"name": "_lowrank_down_kernel", "fn": _lowrank_down_kernel, "signature": sig,
                "constexprs": const, "num_warps": cfg.down_warps, "num_stages": cfg.stages,
                "tensor_cores": False,
                "config": f"{ty} {kind} R{cfg.down_r} K{cfg.down_k}{' atomic' if atomic else ''}"}

    def up(cfg: _DecodeConfig, ty: str = "bf16") -> dict:
        sig = {"z_ptr": "*fp32", "u_ptr": f"*{ty}", "b_ptr": f"*{ty}", "y_ptr": f"*{ty}",
               "T": "i32", "N": "i32", "R": "i32",
               "stride_zt": "i32", "stride_zr": "constexpr", "stride_un": "i32", "stride_ur": "constexpr",
               "stride_yt": "i32", "stride_yn": "constexpr",
               "HAS_BIAS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_O": "constexpr",
               "BLOCK_R": "constexpr", "DOT_PREC": "constexpr"}
        const = {"stride_zr": 1, "stride_ur": 1, "stride_yn": 1, "HAS_BIAS": True, "BLOCK_T": cfg.block_t,
                 "BLOCK_O": cfg.up_o, "BLOCK_R": cfg.up_r, "DOT_PREC": "ieee"}
        kind = "gemv" if cfg.block_t == 1 else f"dot T{cfg.block_t}"
        return {"name": "_lowrank_up_kernel", "fn": _lowrank_up_kernel, "signature": sig,
                "constexprs": const, "num_warps": cfg.up_warps, "num_stages": cfg.stages,
                "tensor_cores": False, "config": f"{ty} {kind} O{cfg.up_o} R{cfg.up_r} +bias"}

    def gemm(cfg: _GemmConfig, ty: str, bias: bool, tc: bool, prec: str = "ieee") -> dict:
        sig = {"a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "c_ptr": f"*{ty}",
               "M": "i32", "N": "i32", "K": "i32",
               "stride_am": "i32", "stride_ak": "constexpr", "stride_bk": "constexpr", "stride_bn": "i32",
               "stride_cm": "i32", "stride_cn": "constexpr",
               "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_K": "constexpr", "GROUP_M": "constexpr", "DOT_PREC": "constexpr"}
        const = {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "HAS_BIAS": bias,
                 "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                 "GROUP_M": cfg.group_m, "DOT_PREC": prec}
        label = f"{ty} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} " + ("y=zUᵀ+b" if bias else "z=xVᵀ")
        return {"name": "_lowrank_gemm_kernel", "fn": _lowrank_gemm_kernel, "signature": sig,
                "constexprs": const, "num_warps": cfg.warps, "num_stages": cfg.stages,
                "tensor_cores": tc, "config": label}

    specs = [down(_DECODE_GEMV, atomic=False), down(_DECODE_GEMV, atomic=True), up(_DECODE_GEMV)]
    for bt in (16, 32, 64):
        specs += [down(_decode_dot_config(bt), atomic=True), up(_decode_dot_config(bt))]
    for cfg in (_GEMM_BIG, _GEMM_SMALL):
        specs += [gemm(cfg, "bf16", bias=False, tc=True), gemm(cfg, "bf16", bias=True, tc=True)]
    specs.append(gemm(_GEMM_FP32, "fp32", bias=True, tc=False))
    for spec in specs:
        spec["attrs"] = _aligned_attrs(spec["signature"])
    return specs


def _aligned_attrs(signature: dict) -> dict:
    """Divisibility hints as Triton's runtime specialization sets them for 16-byte-aligned pointers and
    sizes/strides that are multiples of 16 (LLaMA widths, a rank rounded to 16); the token count is
    left unhinted. ``ASTSource(..., attrs=spec["attrs"])`` compiles the variant that runs on such
    shapes (vectorized, cp.async-pipelined); without it the compile is the unaligned fallback (scalar
    loads, one pipeline stage), which is what an odd rank such as 819 gets at run time too."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
            if ty.startswith("*") or (ty == "i32" and name not in ("T", "M"))}
