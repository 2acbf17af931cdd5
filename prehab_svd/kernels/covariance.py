"""Triton kernel of the fused streaming covariance update: ``G += xᵀx`` and ``C += xᵀy`` in one pass.

The math is :func:`prehab_svd.ops.reference.covariance_update`; this is a faster way to the same
numbers (16-bit inputs on the tensor cores with fp32 accumulation, fp32 inputs in exact-fp32 dots).

Work split (d = features, nb = ceil(d / BLOCK_D) tile rows):

* One program per output tile; each program streams all T tokens in BLOCK_T chunks, accumulates in
  fp32 registers, and adds its result into the accumulators once at the end (every output tile has
  exactly one owner, so each element gets one fp32 addition per call and the result is
  deterministic; the addition is a relaxed atomic add only so that no old values are loaded back
  into registers, see ``_tile_add``).
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
def _tile_add(acc, base_ptr, row0, col0, stride_r, stride_c, lb, mask):
    """base[row0 + r, col0 + c] += acc[r, c] where mask[r, c].

    A relaxed atomic add without a returned value (``red.global.add``): every output element has
    exactly one owner program per call, so this is the same single fp32 addition old + acc as a
    load-add-store, with the same rounding and a deterministic result, but it keeps no loaded old
    values in registers (measured: the load-add-store epilogue is what spilled the 128-tile G+C
    kernel, see CONFIGS). The tile's origin is a 64-bit scalar offset (row0·stride_r + col0·stride_c
    exceeds 2³¹ once d² does); the offsets inside the tile, from ``lb`` (arange(BLOCK_D), int32 or
    int64 as the launcher chose, see OFF64), are at most (BLOCK_D − 1)·(|stride_r| + |stride_c|).
    """
    base = base_ptr + row0.to(tl.int64) * stride_r + col0.to(tl.int64) * stride_c
    ptrs = base + (lb[:, None] * stride_r + lb[None, :] * stride_c)
    tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


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
    OFF64: tl.constexpr = False,
):
    """Addressing: every tile is a 64-bit scalar origin plus loop-invariant offsets inside the tile
    (32-bit, or 64-bit with OFF64). The origins of the x/y tiles advance by a 64-bit scalar step per
    token chunk, so no product of an index and a stride is formed in 32 bits where it can reach 2³¹
    (a column-major x with T·d ≥ 2³¹, a d×d accumulator with d² ≥ 2³¹). It also keeps the loop's
    per-element state to one 32-bit offset per loaded vector (the first version advanced a 64-bit
    pointer per element every chunk); what removed the 128-tile G+C kernel's spill was the epilogue
    (see _tile_add and CONFIGS)."""
    pid = tl.program_id(0)
    n_upper = n_blocks * (n_blocks + 1) // 2
    offs_t = tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_D)
    lt = offs_t.to(tl.int64) if OFF64 else offs_t
    lb = offs_b.to(tl.int64) if OFF64 else offs_b
    n_chunks = tl.cdiv(T, BLOCK_T)
    step_x = tl.cast(stride_xt, tl.int64) * BLOCK_T  # (tl.cast: a stride may be the constexpr 1)
    step_y = tl.cast(stride_yt, tl.int64) * BLOCK_T

    if pid < n_upper:
        # ---- upper tile pair (i, j), i <= j: G_ij (mirrored into G_ji) and, with y, C_ij ----------
        i, j = _upper_pair(pid)
        # [BLOCK_T, BLOCK_D] token-major tiles: offsets inside a tile, loop invariant
        off_x = lt[:, None] * stride_xt + lb[None, :] * stride_xd
        row_i = i * BLOCK_D
        col_j = j * BLOCK_D
        mask_i = offs_b < d - row_i
        mask_j = offs_b < d - col_j
        xi_base = x_ptr + row_i.to(tl.int64) * stride_xd
        xj_base = x_ptr + col_j.to(tl.int64) * stride_xd
        acc_g = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        if HAS_C:
            off_y = lt[:, None] * stride_yt + lb[None, :] * stride_yd
            yj_base = y_ptr + col_j.to(tl.int64) * stride_yd
            acc_c = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for k in range(n_chunks):
            t_ok = (k * BLOCK_T + offs_t) < T
            xi = tl.load(xi_base + off_x, mask=t_ok[:, None] & mask_i[None, :], other=0.0)
            xj = tl.load(xj_base + off_x, mask=t_ok[:, None] & mask_j[None, :], other=0.0)
            xit = tl.trans(xi)  # [BLOCK_D, BLOCK_T]: loaded once, used by both products
            acc_g = _dot(xit, xj, acc_g, IEEE)
            if HAS_C:
                yj = tl.load(yj_base + off_y, mask=t_ok[:, None] & mask_j[None, :], other=0.0)
                acc_c = _dot(xit, yj, acc_c, IEEE)
                yj_base += step_y
            xi_base += step_x
            xj_base += step_x
        mask = mask_i[:, None] & mask_j[None, :]
        # C first, so that its accumulator is dead when G's mirror (a transposed store: the compiler
        # converts acc_g's register layout through shared memory) needs registers for both layouts
        # (measured: with G first the 128-tile G+C kernel spills)
        if HAS_C:
            _tile_add(acc_c, c_ptr, row_i, col_j, stride_c0, stride_c1, lb, mask)
        _tile_add(acc_g, g_ptr, row_i, col_j, stride_g0, stride_g1, lb, mask)
        if i != j:
            # the mirrored tile G_ji = (G_ij)ᵀ: element (r, c) of acc_g goes to G[col_j + c, row_i + r],
            # at offset (row_i + r)·stride_g1 + (col_j + c)·stride_g0: the same call, strides swapped
            _tile_add(acc_g, g_ptr, row_i, col_j, stride_g1, stride_g0, lb, mask)
    else:
        if HAS_C:
            # ---- strictly lower tile pair (i, j), i > j: C_ij only (C is not symmetric) ----------
            i, j = _lower_pair(pid - n_upper)
            off_x = lt[:, None] * stride_xt + lb[None, :] * stride_xd
            off_y = lt[:, None] * stride_yt + lb[None, :] * stride_yd
            row_i = i * BLOCK_D
            col_j = j * BLOCK_D
            mask_i = offs_b < d - row_i
            mask_j = offs_b < d - col_j
            xi_base = x_ptr + row_i.to(tl.int64) * stride_xd
            yj_base = y_ptr + col_j.to(tl.int64) * stride_yd
            acc_c = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
            for k in range(n_chunks):
                t_ok = (k * BLOCK_T + offs_t) < T
                xi = tl.load(xi_base + off_x, mask=t_ok[:, None] & mask_i[None, :], other=0.0)
                yj = tl.load(yj_base + off_y, mask=t_ok[:, None] & mask_j[None, :], other=0.0)
                acc_c = _dot(tl.trans(xi), yj, acc_c, IEEE)
                xi_base += step_x
                yj_base += step_y
            _tile_add(acc_c, c_ptr, row_i, col_j, stride_c0, stride_c1, lb, mask_i[:, None] & mask_j[None, :])


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
    # arithmetic intensity of a 128×128×64 GEMM tile (with the cross term, x_iᵀ[x_j | y_j] is a
    # 128×256 tile, the shape of a Hopper GEMM's two consumer warpgroups); shared memory 3 stages ×
    # (2 or 3) × 16 KiB; one CTA of 8 warps per SM (the G+C accumulators alone take 128 of its
    # registers per thread, so registers, like the 144 KiB of shared memory, allow one CTA).
    # Chosen by the compiler's numbers (no GPU to time on; ptxas -v, sm_90a, Triton 3.9 / 3.6):
    # the first version (a 64-bit pointer per element advanced every chunk, a load-add-store
    # epilogue with G's mirror before C) needed 255 registers and spilled 80/104 B (3.9) or 48/72 B
    # (3.6) in G+C. 16 warps (64 registers of accumulators per thread, a 128-register cap) still
    # spilled 28-92 B; 64-token chunks vs 32, 2-4 stages changed nothing; per-tile 64-bit origins with
    # loop-invariant 32-bit offsets reached 254 registers with no spill but no margin (a maxnreg of
    # 232 spilled 116-180 B). What the registers went to was the epilogue: old values loaded back
    # while both accumulators are live, and the mirror's layout conversion of acc_g. With C's
    # tile added first and relaxed atomic adds (red.global, no values loaded back): 220 (3.9) / 229
    # (3.6) registers, no spills, wgmma m64n128k16, 16-byte cp.async.
    "tc128": (128, 64, 8, 3),
    # small d (too few 128-tiles to fill the SMs): 64×64 tiles, 4 warps (one warpgroup), 4 stages.
    "tc64": (64, 64, 4, 4),
    # fp32 inputs: exact fp32 dots (input_precision="ieee", no TF32, to match the fp32 reference
    # to ~1e-6), which run on the FMA units, not the tensor cores. 8 warps: at 4 warps the G+C
    # variant spills (255 registers, 344-512 B); at 8, 149 (3.9) / 75 (3.6) registers, no spills.
    "fp32": (64, 32, 8, 3),
    # the CPU interpreter: small tiles exercise several tiles (and the masks) on small d; its cost is
    # mostly per program, so larger d gets larger tiles.
    "interp16": (16, 16, 4, 1),
    "interp32": (32, 16, 4, 1),
    "interp64": (64, 32, 4, 1),
}


_INT32_MAX = 2 ** 31 - 1


def needs_off64(block_t: int, block_d: int, *, x_strides, y_strides, acc_strides) -> bool:
    """Whether an offset inside one tile can pass 2³¹ elements, so the kernel must form them in 64
    bits (OFF64). x/y tiles span (block_t − 1)·stride_t + (block_d − 1)·stride_d; accumulator tiles
    (block_d − 1)·(stride_0 + stride_1). Tile origins and the per-chunk steps are always 64-bit."""
    span = 0
    for st, sd in list(x_strides) + list(y_strides):
        span = max(span, (block_t - 1) * abs(st) + (block_d - 1) * abs(sd))
    for s0, s1 in acc_strides:
        span = max(span, (block_d - 1) * (abs(s0) + abs(s1)))
    return span > _INT32_MAX


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
    # bf16 on CPU: the interpreter's bf16 tl.dot is wrong (errors of ~1e10, measured); the dispatch never sends
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
    off64 = needs_off64(block_t, block_d, x_strides=[x.stride()], y_strides=[yy.stride()],
                        acc_strides=[G.stride(), CC.stride()])
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
        OFF64=off64,
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


def _signature(dtype: str) -> dict:
    sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "g_ptr": "*fp32", "c_ptr": "*fp32"}
    for name in ("T", "d", "stride_xt", "stride_xd", "stride_yt", "stride_yd",
                 "stride_g0", "stride_g1", "stride_c0", "stride_c1", "n_blocks"):
        sig[name] = "constexpr" if name in _UNIT_STRIDES else "i32"
    for name in ("HAS_C", "IEEE", "BLOCK_T", "BLOCK_D", "OFF64"):
        sig[name] = "constexpr"
    return sig


def aot_specs() -> list[dict]:
    """The configurations the launcher uses on H100: bf16 (tensor cores) and fp32, with and without
    the cross term, specialized as the JIT specializes contiguous inputs (unit strides constant).

    Each spec also carries ``attrs`` (Triton's ``ASTSource(attrs=...)``: 16-divisibility of the
    pointers, d and the row strides), so the table shows the variant aligned calls run: pipelined
    16-byte cp.async loads (num_stages buffers: 96 KiB of shared memory for G, 144 KiB for G+C at
    128-tiles). Plus the 128-tile G+C kernel for column-major x and y (token stride 1, feature stride
    T, T a multiple of 16), with 32-bit and with 64-bit offsets inside a tile (OFF64: a column-major
    x of more than 2³¹/127 ≈ 16.9M tokens).
    """
    names = covariance_kernel.arg_names
    specs = []

    def add(dtype, cfg, has_c, unit, off64=False, label=""):
        block_d, block_t, num_warps, num_stages = CONFIGS[cfg]
        div16 = [n for n in ("x_ptr", "y_ptr", "g_ptr", "c_ptr", "d", "stride_xt", "stride_xd", "stride_yt",
                             "stride_yd", "stride_g0", "stride_c0") if n not in unit]
        if "stride_xt" in unit:
            div16.append("T")  # column-major: stride_xd = T, a multiple of 16
        constexprs = {"HAS_C": has_c, "IEEE": dtype == "fp32", "BLOCK_T": block_t, "BLOCK_D": block_d,
                      "OFF64": off64}
        constexprs.update({n: 1 for n in unit})
        sig = _signature(dtype)
        for n in sig:
            if n.startswith("stride_"):
                sig[n] = "constexpr" if n in unit else "i32"
        specs.append({
            "name": "covariance_kernel",
            "fn": covariance_kernel,
            "signature": sig,
            "constexprs": constexprs,
            "attrs": {(names.index(n),): [["tt.divisibility", 16]] for n in div16},
            "num_warps": num_warps,
            "num_stages": num_stages,
            "tensor_cores": dtype != "fp32",
            "vector_loads": True,
            "config": f"{dtype} {'G+C' if has_c else 'G'} {cfg} D{block_d} T{block_t} "
                      f"w{num_warps} s{num_stages}{label}",
        })

    for cfg, dtype in (("tc128", "bf16"), ("tc64", "bf16"), ("fp32", "fp32")):
        for has_c in (False, True):
            add(dtype, cfg, has_c, _UNIT_STRIDES)
    col_major = ("stride_xt", "stride_yt", "stride_g1", "stride_c1")
    add("bf16", "tc128", True, col_major, label=" x col-major")
    add("bf16", "tc128", True, col_major, off64=True, label=" x col-major OFF64")
    return specs
