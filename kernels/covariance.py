"""Triton kernel of the fused streaming covariance update: ``G += xᵀx`` and ``C += xᵀy`` in one pass.

The math is :func:`prehab_svd.ops.reference.covariance_update`; this is a faster way to the same
numbers (16-bit inputs on the tensor cores with fp32 accumulation, fp32 inputs in exact-fp32 dots).

Work split (d = features, nb = ceil(d / BLOCK_D) tile rows):

* One program per output tile; each program streams all T tokens in BLOCK_T chunks, accumulates in
  fp32 registers, and adds its result into the accumulators once at the end (read-modify-write; every
  output tile has exactly one owner, so no atomics and a deterministic result).
* "Upper" programs, one per tile pair (i, j) with i ≤ j, nb(nb+1)/2 of them: they load x[:, i-block],
  x[:, j-block] (and y[:, j-block]) once per token chunk and compute G_ij = x_iᵀx_j (and, reusing the
  x_i tile, C_ij = x_iᵀy_j). G's lower triangle is never computed: an upper program with i < j also
  writes the transpose of its tile into G's (j, i) tile, so G stays the full symmetric matrix the
  reference returns. Diagonal tiles are written once.
* "Lower" programs (only with the cross term), one per (i, j) with i > j, nb(nb-1)/2 of them: C is not
  symmetric, so these compute C_ij = x_iᵀy_j alone. They come after the upper programs in the 1-D
  grid, so the heavier programs (two products) are scheduled first.

So the self term costs half the MMA work of a full ``xᵀx`` GEMM, and self + cross costs 3/4 of two
GEMMs. No temporary of size d×d (or [B, d, d]) is allocated; the only per-call work besides the kernel
is choosing a configuration.

Pid -> (i, j): upper pairs are enumerated column by column (pid = j(j+1)/2 + i, i ≤ j), strictly lower
pairs row by row (q = i(i-1)/2 + j, j < i); both are inverted with a float square root and an exact
integer correction. Consecutive programs thus share a tile in L2: x_j, y_j (upper) or x_i (lower).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["aot_specs", "covariance_kernel", "covariance_update", "pick_config", "CONFIGS"]


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _upper_pair(p):
    """p = j(j+1)/2 + i, 0 <= i <= j (upper-triangular pairs, column by column) -> (i, j).

    The float square root may be off by one ulp (the GPU's is approximate); the two integer
    corrections make the result exact. Works on scalars and on tensors of p alike.
    """
    j = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > p, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= p, j + 1, j)
    return p - j * (j + 1) // 2, j


@triton.jit
def _lower_pair(q):
    """q = i(i-1)/2 + j, 0 <= j < i (strictly lower pairs, row by row) -> (i, j)."""
    i = ((tl.sqrt((8 * q + 1).to(tl.float32)) + 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i - 1) // 2 > q, i - 1, i)
    i = tl.where((i + 1) * i // 2 <= q, i + 1, i)
    return i, q - i * (i - 1) // 2


@triton.jit
def _tile_rmw(acc, base_ptr, stride_r, stride_c, offs_r, offs_c, d):
    """base[offs_r, offs_c] += acc (masked to the d×d matrix). Row offsets in int64."""
    mask = (offs_r[:, None] < d) & (offs_c[None, :] < d)
    ptrs = base_ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c
    old = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, old + acc, mask=mask)


@triton.jit
def covariance_kernel(
    x_ptr, y_ptr, g_ptr, c_ptr,
    T, d,
    stride_xt, stride_xd, stride_yt, stride_yd,
    stride_g0, stride_g1, stride_c0, stride_c1,
    n_blocks,
    HAS_C: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_upper = n_blocks * (n_blocks + 1) // 2
    offs_t = tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_D)
    n_chunks = tl.cdiv(T, BLOCK_T)

    if pid < n_upper:
        # ---- upper tile pair (i, j), i <= j: G_ij (mirrored into G_ji) and, with y, C_ij ----------
        i, j = _upper_pair(pid)
        offs_i = i * BLOCK_D + offs_b
        offs_j = j * BLOCK_D + offs_b
        mask_i = offs_i < d
        mask_j = offs_j < d
        # token-major tiles [BLOCK_T, BLOCK_D]; advanced by pointer increments (64-bit pointers,
        # so T * stride never overflows 32-bit arithmetic)
        xi_ptrs = x_ptr + offs_t[:, None] * stride_xt + offs_i[None, :] * stride_xd
        xj_ptrs = x_ptr + offs_t[:, None] * stride_xt + offs_j[None, :] * stride_xd
        acc_g = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        if HAS_C:
            yj_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_j[None, :] * stride_yd
            acc_c = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for k in range(n_chunks):
            t_ok = (k * BLOCK_T + offs_t) < T
            xi = tl.load(xi_ptrs, mask=t_ok[:, None] & mask_i[None, :], other=0.0)
            xj = tl.load(xj_ptrs, mask=t_ok[:, None] & mask_j[None, :], other=0.0)
            xit = tl.trans(xi)  # [BLOCK_D, BLOCK_T]: loaded once, used by both products
            if IEEE:
                acc_g = tl.dot(xit, xj, acc_g, input_precision="ieee")
            else:
                acc_g = tl.dot(xit, xj, acc_g)
            if HAS_C:
                yj = tl.load(yj_ptrs, mask=t_ok[:, None] & mask_j[None, :], other=0.0)
                if IEEE:
                    acc_c = tl.dot(xit, yj, acc_c, input_precision="ieee")
                else:
                    acc_c = tl.dot(xit, yj, acc_c)
                yj_ptrs += BLOCK_T * stride_yt
            xi_ptrs += BLOCK_T * stride_xt
            xj_ptrs += BLOCK_T * stride_xt
        _tile_rmw(acc_g, g_ptr, stride_g0, stride_g1, offs_i, offs_j, d)
        if i != j:
            # the mirrored tile G_ji = (G_ij)ᵀ: element (r, c) of acc_g goes to G[j-block c, i-block r]
            _tile_rmw(acc_g, g_ptr, stride_g1, stride_g0, offs_i, offs_j, d)
        if HAS_C:
            _tile_rmw(acc_c, c_ptr, stride_c0, stride_c1, offs_i, offs_j, d)
    else:
        if HAS_C:
            # ---- strictly lower tile pair (i, j), i > j: C_ij only (C is not symmetric) ----------
            i, j = _lower_pair(pid - n_upper)
            offs_i = i * BLOCK_D + offs_b
            offs_j = j * BLOCK_D + offs_b
            mask_i = offs_i < d
            mask_j = offs_j < d
            xi_ptrs = x_ptr + offs_t[:, None] * stride_xt + offs_i[None, :] * stride_xd
            yj_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_j[None, :] * stride_yd
            acc_c = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
            for k in range(n_chunks):
                t_ok = (k * BLOCK_T + offs_t) < T
                xi = tl.load(xi_ptrs, mask=t_ok[:, None] & mask_i[None, :], other=0.0)
                yj = tl.load(yj_ptrs, mask=t_ok[:, None] & mask_j[None, :], other=0.0)
                if IEEE:
                    acc_c = tl.dot(tl.trans(xi), yj, acc_c, input_precision="ieee")
                else:
                    acc_c = tl.dot(tl.trans(xi), yj, acc_c)
                xi_ptrs += BLOCK_T * stride_xt
                yj_ptrs += BLOCK_T * stride_yt
            _tile_rmw(acc_c, c_ptr, stride_c0, stride_c1, offs_i, offs_j, d)


# ---------------------------------------------------------------------------------------------
# configuration (no autotune: it does not run in the interpreter, and a fixed rule is reproducible)
# ---------------------------------------------------------------------------------------------

# H100 SXM: 132 SMs. Used only to decide whether 128-wide tiles leave enough programs to fill it
# (on CUDA the launcher reads the device's own SM count).
_H100_SMS = 132


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# name -> (BLOCK_D, BLOCK_T, num_warps, num_stages)
CONFIGS = {
    # 16-bit inputs, tensor cores (wgmma), fp32 accumulators in registers. 128×128 tiles: the
    # arithmetic intensity of a 128×128×64 GEMM tile; shared memory 3 stages × (2 or 3) × 16 KiB.
    "tc128": (128, 64, 8, 3),
    # small d (too few 128-tiles to fill the SMs): 64×64 tiles, 4 warps (one warpgroup), 4 stages.
    "tc64": (64, 64, 4, 4),
    # fp32 inputs: exact fp32 dots (input_precision="ieee", no TF32, to match the fp32 reference
    # to ~1e-6), which run on the FMA units, not the tensor cores.
    "fp32": (64, 32, 4, 3),
    # the CPU interpreter: small tiles exercise several tiles (and the masks) on small d; its cost is
    # mostly per program, so larger d gets larger tiles.
    "interp16": (16, 16, 4, 1),
    "interp32": (32, 16, 4, 1),
    "interp64": (64, 32, 4, 1),
}


def _n_programs(d: int, block_d: int, has_c: bool) -> int:
    nb = triton.cdiv(d, block_d)
    return nb * nb if has_c else nb * (nb + 1) // 2


def pick_config(d: int, T: int, dtype: torch.dtype, has_c: bool, device_type: str,
                num_sms: int = _H100_SMS) -> str:
    """The configuration name (a key of :data:`CONFIGS`) the launcher uses for these arguments.

    Deterministic and shape-based: tensor-core 128-tiles when they give at least one program per SM
    (on H100: d > 1920 for the self term alone, d > 1408 with the cross term), else 64-tiles; fp32
    inputs their own config; the interpreter small tiles. T does not enter (yet): every program
    streams all tokens, so T only scales the time.
    """
    if device_type != "cuda":
        return "interp16" if d <= 64 else "interp32" if d <= 256 else "interp64"
    if dtype == torch.float32:
        return "fp32"
    if _n_programs(d, 128, has_c) >= num_sms:
        return "tc128"
    return "tc64"


# ---------------------------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------------------------


def covariance_update(
    G: torch.Tensor, x: torch.Tensor, C: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None
) -> None:
    """In place: ``G += xᵀx`` and, when C is given, ``C += xᵀy`` (x, y: [T, d]; G, C: [d, d] fp32).

    Arguments arrive validated by :func:`prehab_svd.ops.covariance_update`. Any strides are accepted
    for x, y, G and C (nothing is made contiguous). Falls back to the reference for what the kernel
    does not do (see the comments below).
    """
    from prehab_svd.ops import reference

    T, d = x.shape
    if T == 0 or d == 0:
        return
    has_c = C is not None
    # fp64 accumulators or inputs: tensor cores have no fp64 path and an fp64 FMA kernel would not
    # beat cuBLAS's DGEMM, so the reference (cuBLAS / CPU BLAS) does it.
    if G.dtype != torch.float32 or (has_c and C.dtype != torch.float32) or x.dtype == torch.float64 \
            or (has_c and y.dtype == torch.float64):
        reference.covariance_update(G, x, C, y)
        return
    # bf16 on CPU: the interpreter's bf16 tl.dot is wrong (shared/ENV.md); the dispatch never sends
    # it here, but a direct call must still be right.
    if x.device.type != "cuda" and (x.dtype == torch.bfloat16 or (has_c and y.dtype == torch.bfloat16)):
        reference.covariance_update(G, x, C, y)
        return
    if has_c and y.dtype != x.dtype:
        # mixed input dtypes: one tile dtype is needed for tl.dot; promote both (exact, since the
        # reference forms the products in fp32 anyway). Costs one [T, d] copy, never a d×d buffer.
        dt = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dt), y.to(dt)

    sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.device.type == "cuda" else _H100_SMS
    name = pick_config(d, T, x.dtype, has_c, x.device.type, sms)
    block_d, block_t, num_warps, num_stages = CONFIGS[name]
    nb = triton.cdiv(d, block_d)
    grid = (_n_programs(d, block_d, has_c),)
    yy = y if has_c else x  # dummies when there is no cross term (never read: HAS_C is False)
    CC = C if has_c else G
    covariance_kernel[grid](
        x, yy, G, CC,
        T, d,
        x.stride(0), x.stride(1), yy.stride(0), yy.stride(1),
        G.stride(0), G.stride(1), CC.stride(0), CC.stride(1),
        nb,
        HAS_C=has_c,
        IEEE=x.dtype == torch.float32,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (prehab_svd.aot / `prehab-svd kernels`)
# ---------------------------------------------------------------------------------------------


# What the JIT sees at run time for contiguous x, y, G, C with d % 16 == 0 (every LLaMA width): the unit
# strides specialized to the constant 1 and the pointers, d and the row strides known to be multiples
# of 16. Only with these does Triton vectorize the tile loads into cp.async and pipeline them
# (num_stages buffers in shared memory); for d % 16 != 0 the loads stay unpipelined (correct, slower).
_UNIT_STRIDES = ("stride_xd", "stride_yd", "stride_g1", "stride_c1")
_DIVISIBLE_16 = ("x_ptr", "y_ptr", "g_ptr", "c_ptr", "d", "stride_xt", "stride_yt", "stride_g0", "stride_c0")


def _signature(dtype: str) -> dict:
    sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "g_ptr": "*fp32", "c_ptr": "*fp32"}
    for name in ("T", "d", "stride_xt", "stride_xd", "stride_yt", "stride_yd",
                 "stride_g0", "stride_g1", "stride_c0", "stride_c1", "n_blocks"):
        sig[name] = "constexpr" if name in _UNIT_STRIDES else "i32"
    for name in ("HAS_C", "IEEE", "BLOCK_T", "BLOCK_D"):
        sig[name] = "constexpr"
    return sig


def aot_specs() -> list[dict]:
    """The configurations the launcher uses on H100: bf16 (tensor cores) and fp32, with and without
    the cross term, specialized as the JIT specializes contiguous inputs (unit strides constant).

    Each spec also carries ``attrs`` (Triton's ``ASTSource(attrs=...)``: 16-divisibility of the
    pointers, d and the row strides). Compiled with them, the bf16 kernels pipeline their loads
    (cp.async, num_stages buffers: 96 KiB of shared memory for G, 144 KiB for G+C at 128-tiles);
    compiled without them (``prehab_svd.aot`` today ignores the key) the loads are not vectorized and
    the table shows the unpipelined variant (64 KiB). Both issue wgmma.
    """
    attrs = {(covariance_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in _DIVISIBLE_16}
    specs = []
    for cfg, dtype in (("tc128", "bf16"), ("tc64", "bf16"), ("fp32", "fp32")):
        block_d, block_t, num_warps, num_stages = CONFIGS[cfg]
        for has_c in (False, True):
            constexprs = {"HAS_C": has_c, "IEEE": dtype == "fp32", "BLOCK_T": block_t, "BLOCK_D": block_d}
            constexprs.update({n: 1 for n in _UNIT_STRIDES})
            specs.append({
                "name": "covariance_kernel",
                "fn": covariance_kernel,
                "signature": _signature(dtype),
                "constexprs": constexprs,
                "attrs": attrs,
                "num_warps": num_warps,
                "num_stages": num_stages,
                "tensor_cores": dtype != "fp32",
                "config": f"{dtype} {'G+C' if has_c else 'G'} {cfg} D{block_d} T{block_t} "
                          f"w{num_warps} s{num_stages}",
            })
    return specs
