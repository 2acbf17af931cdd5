"""Tests of the Triton stable-rank kernels (prehab_svd.kernels.stable_rank): the Prehab regularizer's
value and gradient, kinds "stable" (‖M‖_F²/σ₁², power iteration) and "nuclear" (‖M‖_*²/‖M‖_F²,
Newton–Schulz), M = W L or M = W, batched.

On a machine with no GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, fp32 and
fp16 W; the interpreter's bf16 tl.dot is wrong, errors ~1e10) with exact-fp32 dots
(input_precision="ieee"), so they are compared with

* the reference (prehab_svd.ops.reference.stable_rank) at the same iteration counts: value, gradient
  and state to ≤ 1e-5 relative (the same algorithm in the same precision: only summation order
  differs);
* a float64 SVD oracle on matrices built from chosen singular values (a clear gap σ₂/σ₁ = 1/2 for
  "stable", so the power iteration converges; singular values in [0.3, 1] for "nuclear", so
  Newton–Schulz converges): value to ≤ 1e-4 relative and gradient cosine ≥ 0.999 (it is ~1 − 1e-10).

Every kernel output, intermediates included, is allocated through the module's ``_empty`` which the
tests replace by a NaN-filled allocation: an element a kernel never wrote stays NaN and fails.
bf16 and the H100 configurations (tf32 tensor cores) run in the GPU-only tests, which skip themselves
here. Iteration counts are kept small (the interpreter runs ~10 ms per program); the defaults
(32/4/16 steps) run once each.
"""

from __future__ import annotations


import torch

from _triton_env import CUDA, DEV, INTERPRET, cannot_run, needs_cuda_for, run_aot_script, triton  # noqa: F401  (sets up the interpreter)

import zlib  # noqa: E402

import pytest  # noqa: E402

import prehab_svd.ops as ops  # noqa: E402
from prehab_svd.ops import _registry  # noqa: E402
from prehab_svd.ops import reference as ref  # noqa: E402



pytestmark = cannot_run
needs_cuda = needs_cuda_for("bf16 and the H100 tf32 configurations")



def kmod():
    from prehab_svd.kernels import stable_rank

    return stable_rank


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every buffer a kernel writes starts as NaN (so an element never written is caught)."""
    K = kmod()
    monkeypatch.setattr(K, "_empty", lambda *shape, device: torch.full(shape, float("nan"), device=device))
    return K


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den > 0 else num


def cosines(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double().cpu().flatten(1), b.double().cpu().flatten(1), dim=1)


def make_L(B, n, mode, g, dtype=torch.float32):
    """A whitening factor: random lower-triangular with positive diagonal, [n, n] or [B, n, n]."""
    if mode is None:
        return None
    shape = (n, n) if mode == "shared" else (B, n, n)
    T = torch.randn(*shape, generator=g, dtype=torch.float64).tril(-1) * (0.5 / n ** 0.5)
    d = 0.5 + torch.rand(*shape[:-1], generator=g, dtype=torch.float64)
    return (T + torch.diag_embed(d)).to(dtype).to(DEV)


def with_spectrum(B, m, n, sigmas, g) -> torch.Tensor:
    """fp64 [B, m, n] matrices with the given singular values (random singular vectors)."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(B, m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(B, n, k, generator=g, dtype=torch.float64))[0]
    return U @ torch.diag_embed(sigmas.expand(B, k)) @ V.mT


def check_finite(*ts):
    for t in ts:
        assert torch.isfinite(t).all(), "NaN/Inf in an output: an element was not written"


def compare_to_reference(W, L, kind, state, iters, tol=1e-5):
    K = kmod()
    v, g, s = K.stable_rank(W, L, kind, state, iters)
    vr, gr, sr = ref.stable_rank(W, L, kind, state, iters)
    check_finite(v, g, s)
    assert v.dtype == g.dtype == s.dtype == torch.float32
    assert v.shape == vr.shape and g.shape == gr.shape and s.shape == sr.shape
    assert v.is_contiguous() and g.is_contiguous() and s.is_contiguous()
    assert rel(v, vr) <= tol, (v, vr)
    assert rel(g, gr) <= tol, rel(g, gr)
    if kind == "stable":
        assert rel(s, sr) <= tol, rel(s, sr)
    return v, g, s


# ---------------------------------------------------------------------------------------------
# against the reference, same iteration counts (interpreter: fp32 / fp16 W)
# ---------------------------------------------------------------------------------------------

# (kind, B, m, n, L mode, W dtype, iters): odd shapes, single and multi-tile (the interpreter's
# tiles are 32 wide; GEMVs stream 64-wide chunks), m < n and m > n (Newton–Schulz transposes)
CASES = [
    ("stable", 1, 17, 29, None, torch.float32, 6),
    ("stable", 3, 40, 23, "batched", torch.float32, 5),
    ("stable", 2, 64, 64, "shared", torch.float32, 4),
    ("stable", 1, 130, 70, None, torch.float32, 3),
    ("stable", 2, 33, 20, "shared", torch.float16, 5),
    ("nuclear", 1, 17, 29, "shared", torch.float32, 6),
    ("nuclear", 3, 40, 23, None, torch.float32, 4),
    ("nuclear", 2, 64, 64, "batched", torch.float32, 4),
    ("nuclear", 1, 130, 70, None, torch.float32, 3),
    ("nuclear", 1, 20, 33, "batched", torch.float16, 4),
]


def _case_id(c):
    kind, B, m, n, lm, dt, it = c
    return f"{kind}-B{B}-{m}x{n}-L{lm or 'none'}-{str(dt)[6:]}-it{it}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(case, nan_outputs):
    kind, B, m, n, lmode, dtype, iters = case
    g = gen("ref", case[:5])
    W = randn(B, m, n, g=g, dtype=dtype)
    L = make_L(B, n, lmode, g, dtype=dtype)
    compare_to_reference(W, L, kind, None, iters)


@pytest.mark.parametrize("kind", ["stable", "nuclear"])
def test_default_iterations(kind, nan_outputs):
    """iters=None: 32 cold power-iteration steps / 16 Newton–Schulz steps, as the reference."""
    g = gen("default", kind)
    W = randn(2 if kind == "stable" else 1, 19, 12, g=g)
    compare_to_reference(W, None, kind, None, None)


def test_strided_W_and_mixed_dtypes(nan_outputs):
    """A transposed (non-contiguous) W, an fp16 W with an fp32 L (upcast in the kernel), fp64 L."""
    g = gen("strided")
    W = randn(2, 29, 45, g=g).mT  # [2, 45, 29], column-major
    assert not W.is_contiguous()
    compare_to_reference(W, None, "stable", None, 4)
    compare_to_reference(W, make_L(2, 29, "shared", g), "nuclear", None, 4)
    W16 = randn(1, 21, 18, g=g, dtype=torch.float16)
    compare_to_reference(W16, make_L(1, 18, "batched", g), "stable", None, 4)
    compare_to_reference(randn(2, 21, 18, g=g), make_L(2, 18, "shared", g, torch.float64), "stable", None, 3)


def test_warm_start(nan_outputs):
    """state continues the power iteration: 3 steps + 3 warm steps == 6 cold steps, and the warm
    call matches the reference warm call (the default warm count is 4)."""
    K = kmod()
    g = gen("warm")
    W = randn(2, 27, 19, g=g)
    L = make_L(2, 19, "shared", g)
    _, _, s3 = K.stable_rank(W, L, "stable", None, 3)
    v6, g6, s6 = K.stable_rank(W, L, "stable", None, 6)
    vw, gw, sw = K.stable_rank(W, L, "stable", s3, 3)
    assert rel(vw, v6) <= 1e-5 and rel(gw, g6) <= 1e-5 and rel(sw, s6) <= 1e-5
    _, _, sr3 = ref.stable_rank(W, L, "stable", None, 3)
    compare_to_reference(W, L, "stable", sr3, None)  # default warm count
    # fp16 state is accepted (upcast)
    compare_to_reference(W, L, "stable", s3.half(), 2)


def test_zero_matrix_and_fp64(nan_outputs):
    """A zero matrix has value 0 and gradient 0 (never NaN); fp64 W runs the reference."""
    K = kmod()
    W = torch.zeros(2, 9, 14, device=DEV)
    for kind in ("stable", "nuclear"):
        v, g, s = K.stable_rank(W, None, kind, None, 3)
        assert (v == 0).all() and (g == 0).all() and torch.isfinite(s).all()
    W64 = torch.randn(1, 7, 5, dtype=torch.float64, device=DEV)
    v, g, s = K.stable_rank(W64, None, "stable", None, 5)
    vr, gr, sr = ref.stable_rank(W64, None, "stable", None, 5)
    assert v.dtype == torch.float64 and torch.equal(v, vr) and torch.equal(g, gr) and torch.equal(s, sr)
    with pytest.raises(ValueError):
        K.stable_rank(W64.float(), None, "bogus", None, 1)


# ---------------------------------------------------------------------------------------------
# against a float64 SVD oracle
# ---------------------------------------------------------------------------------------------


def oracle(W, L, kind):
    """Value and gradient w.r.t. W in float64 from an exact SVD of M = W L (the rounded inputs)."""
    M = W.double().cpu()
    L64 = None if L is None else L.double().cpu()
    if L64 is not None:
        M = M @ L64
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    fro2 = M.square().sum((1, 2))
    if kind == "stable":
        s1 = S[:, 0]
        val = fro2 / s1 ** 2
        gM = 2 * M / (s1 ** 2)[:, None, None] - (2 * fro2 / s1 ** 3)[:, None, None] * (
            U[:, :, :1] @ Vh[:, :1, :])
    else:
        nuc = S.sum(1)
        val = nuc ** 2 / fro2
        gM = (2 * nuc / fro2)[:, None, None] * (U @ Vh) - (2 * val / fro2)[:, None, None] * M
    return val, gM if L64 is None else gM @ L64.mT


@pytest.mark.parametrize("kind,B,m,n,lmode,iters", [
    ("stable", 2, 40, 23, "batched", 12),
    ("stable", 1, 29, 66, None, 12),
    ("nuclear", 2, 23, 40, "shared", 8),
    ("nuclear", 1, 70, 45, None, 8),
])
def test_matches_fp64_svd(kind, B, m, n, lmode, iters, nan_outputs):
    g = gen("oracle", kind, B, m, n)
    k = min(m, n)
    if kind == "stable":  # σ₂/σ₁ = 1/2: the angle shrinks 4x per step
        sig = torch.cat([torch.tensor([4.0, 2.0]), 2.0 * torch.rand(k - 2, generator=g)]).double()
    else:  # well conditioned: 4 quintic + 4 cubic Newton–Schulz steps converge
        sig = 0.4 + 0.6 * torch.rand(k, generator=g, dtype=torch.float64)
    M = with_spectrum(B, m, n, sig, g)
    L = make_L(B, n, lmode, g)
    # W = M L⁻¹ so that W L has the chosen spectrum (up to the fp32 rounding of W and L)
    W = M if L is None else torch.linalg.solve_triangular(L.double().cpu(), M, upper=False, left=False)
    W = W.float().to(DEV)
    v, grad, _ = kmod().stable_rank(W, L, kind, None, iters)
    check_finite(v, grad)
    v64, g64 = oracle(W, L, kind)
    assert rel(v, v64) <= 1e-4, (v, v64)
    assert cosines(grad, g64).min().item() >= 0.999
    assert rel(grad, g64) <= 1e-3


# ---------------------------------------------------------------------------------------------
# the building blocks: GEMM, symmetric product, tf32 rounding
# ---------------------------------------------------------------------------------------------


def test_batched_gemm_strides_broadcast_epilogue(nan_outputs):
    """C = alpha·A@B + beta·D with A transposed (strides), B shared across the batch (stride 0)."""
    K = kmod()
    g = gen("gemm")
    A = randn(3, 45, 37, g=g).mT  # [3, 37, 45] column-major
    Bm = randn(1, 45, 70, g=g)
    D = randn(3, 37, 70, g=g)
    C = K.batched_gemm(A, Bm, alpha=-0.75, beta=1.5, D=D)
    want = -0.75 * (A.double() @ Bm.double()) + 1.5 * D.double()
    check_finite(C)
    assert rel(C, want) <= 1e-5
    A16, B16 = randn(2, 33, 40, g=g, dtype=torch.float16), randn(2, 40, 19, g=g, dtype=torch.float16)
    C16 = K.batched_gemm(A16, B16)
    assert rel(C16, A16.double() @ B16.double()) <= 1e-5  # 16-bit products are exact in fp32


def test_symmetric_product_mirrors_upper_tiles(nan_outputs):
    """alpha·X Xᵀ + beta·D from the upper tiles only: 3×3 tiles of 32 for S = 70, exactly symmetric."""
    K = kmod()
    g = gen("syrk")
    X = randn(2, 70, 45, g=g)
    D = randn(2, 70, 70, g=g)
    D = D + D.mT
    C = K.symmetric_product(X, alpha=0.5, beta=-2.0, D=D)
    check_finite(C)
    assert torch.equal(C, C.mT)
    assert rel(C, 0.5 * X.double() @ X.double().mT - 2.0 * D.double()) <= 1e-5
    Xt = randn(1, 50, 19, g=g).mT  # [1, 19, 50] strided: one tile
    assert rel(K.symmetric_product(Xt), Xt.double() @ Xt.double().mT) <= 1e-5


def test_tf32_output_rounding(nan_outputs):
    """ROUND_TF32 (used on CUDA with tf32 dots): every Newton–Schulz output is a tf32 value (13 low
    mantissa bits zero), within half a tf32 ulp of the unrounded iteration's step, and the polar
    factor still converges (value within 1e-3 of the fp64 SVD)."""
    K = kmod()
    g = gen("round")
    M = with_spectrum(1, 37, 52, 0.3 + 0.7 * torch.rand(37, generator=g, dtype=torch.float64), g).float().to(DEV)
    P, _ = K.polar_newton_schulz(M, 8, prec="ieee", round_tf32=True)
    bits = P.contiguous().view(torch.int32)
    assert ((bits & 0x1FFF) == 0).all()
    X = K.symmetric_product(P, round_tf32=True, prec="ieee")
    Xx = K.symmetric_product(P, round_tf32=False, prec="ieee")
    assert ((X.view(torch.int32) & 0x1FFF) == 0).all()
    assert ((X - Xx).abs() <= Xx.abs() * 2.0 ** -11 + 1e-30).all()
    U, S, Vh = torch.linalg.svd(M.double().cpu(), full_matrices=False)
    nuc = (P.double().cpu() * M.double().cpu()).sum((1, 2))
    assert rel(nuc, S.sum(1)) <= 1e-3
    assert cosines(P, U @ Vh).min().item() >= 0.9999


import triton.language as tl  # noqa: E402

from prehab_svd.kernels.stable_rank import _round_tf32  # noqa: E402


@triton.jit
def _round_tf32_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(o_ptr + offs, _round_tf32(tl.load(x_ptr + offs, mask=ok, other=0.0)), mask=ok)


def _round_tf32_ref(bits: torch.Tensor) -> torch.Tensor:
    """Bit-exact reference (int64 arithmetic on the fp32 bit patterns): NaN and ±inf unchanged; a
    finite value's magnitude rounded to 10 mantissa bits, ties away from zero (overflow to inf)."""
    b = bits.to(torch.int64) & 0xFFFFFFFF
    sign, mag = b & 0x80000000, b & 0x7FFFFFFF
    special = (mag & 0x7F800000) == 0x7F800000
    rounded = sign | ((mag + 0x1000) & 0x7FFFE000)
    out = torch.where(special, b, rounded)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def test_round_tf32_keeps_nan_and_inf():
    """_round_tf32 on NaNs of every mantissa (0x7FFFFFFF is the GPU's canonical NaN: the old
    add-and-mask carried it into the sign bit and returned −0.0), ±inf, the largest finite value
    (rounds to inf), ties, subnormals and random values, against a bit-exact int64 reference."""
    g = gen("round-nan")
    special = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFF000, 0x7FFFEFFF,
               0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F801000, 0x3F800FFF, 0xBF801000,
               0x00001000, 0x80000FFF, 0x00000000, 0x80000000]
    rnd = torch.randint(0, 2 ** 32, (301,), generator=g, dtype=torch.int64)
    bits64 = torch.cat([torch.tensor(special, dtype=torch.int64), rnd])
    bits = torch.where(bits64 >= 2 ** 31, bits64 - 2 ** 32, bits64).to(torch.int32)
    x = bits.view(torch.float32).to(DEV)
    out = torch.empty_like(x)
    _round_tf32_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    got = out.cpu().view(torch.int32)
    want = _round_tf32_ref(bits)
    assert torch.equal(got, want), (got != want).nonzero()[:5]
    assert torch.isnan(out[:6].cpu()).all() and torch.isnan(x[:6].cpu()).all()
    assert torch.isinf(out[7:11].cpu()).all()  # ±inf kept, ±max finite rounds to ±inf
    assert (got[:11] == bits[:11]).sum() == 9  # specials unchanged, but the two max-finite values


def test_matrices_past_int32_offsets_go_to_the_reference(monkeypatch):
    """In-matrix offsets are 32-bit in the kernels (the batch offset is 64-bit): a matrix spanning
    2³¹ elements (here a meta tensor, no memory) is computed by the reference instead; one just
    below does not."""
    K = kmod()
    calls = []
    monkeypatch.setattr(K._ref, "stable_rank", lambda *a: calls.append(a) or "reference")
    big = torch.empty_strided((2, 3, 5), (0, 2 ** 29, 1), device="meta")  # span 2·2²⁹ + 4 < 2³¹
    assert K.offsets_fit_int32(big, None)
    huge = torch.empty_strided((2, 5, 3), (0, 2 ** 29, 1), device="meta")  # span 4·2²⁹ + 2 > 2³¹
    assert not K.offsets_fit_int32(huge, None)
    assert not K.offsets_fit_int32(torch.empty(1, 4, 4, device="meta"),
                                   torch.empty_strided((4, 4), (1, 2 ** 30), device="meta"))
    # internal buffers: M = W L is [m, pad16(n)]; 46341² > 2³¹
    assert not K.offsets_fit_int32(torch.empty_strided((1, 46341, 46341), (0, 1, 0), device="meta"), None)
    assert K.stable_rank(huge, None, "stable", None, 2) == "reference" and len(calls) == 1


# ---------------------------------------------------------------------------------------------
# through the public dispatch and autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stable", "nuclear"])
@pytest.mark.parametrize("e", [40, -40])
def test_extreme_scales_through_the_public_op(kind, e):
    """Weights scaled by 2^±40 (M = W L beyond fp32's range for ‖MᵀMv‖²): the op rescales by a power
    of two before the kernel, so the value is unchanged and the gradient scales by 2^-e exactly
    (the kernel alone returned 0 for the stable rank here)."""
    g = gen("scale", kind, e)
    W = randn(2, 13, 9, g=g)
    L = make_L(2, 9, "batched", g)
    v0, g0, _ = ops.stable_rank(W, L, kind=kind, iters=20, backend="triton")
    v, grad, _ = ops.stable_rank(W * 2.0 ** e, L, kind=kind, iters=20, backend="triton")
    assert torch.isfinite(v).all() and torch.isfinite(grad).all()
    assert rel(v, v0) <= 1e-6 and rel(grad * 2.0 ** e, g0) <= 1e-6
    ref_v, ref_g, _ = ops.stable_rank(W, L, kind=kind, iters=20, backend="torch")  # same start
    assert rel(v, ref_v) <= 1e-5 and rel(grad * 2.0 ** e, ref_g) <= 1e-4


def test_public_dispatch_and_loss_backward():
    impl = _registry.get_impl("stable_rank", "triton", torch.device(DEV), torch.float32)
    assert impl.__name__ == "triton_stable_rank"
    g = gen("public")
    W = randn(23, 31, g=g)  # 2-D: the wrapper batches it
    L = make_L(1, 31, "shared", g)
    v, grad, st = ops.stable_rank(W, L, kind="stable", iters=5, backend="triton")
    vr, gr, sr = ops.stable_rank(W, L, kind="stable", iters=5, backend="torch")
    assert v.shape == () and grad.shape == W.shape and st.shape == (31,)
    assert rel(v, vr) <= 1e-5 and rel(grad, gr) <= 1e-5 and rel(st, sr) <= 1e-5
    v2, _, _ = ops.stable_rank(W, L, kind="stable", state=st, backend="triton")  # warm, 4 steps
    assert rel(v2, ops.stable_rank(W, L, kind="stable", state=sr, backend="torch")[0]) <= 1e-5

    Wb = randn(2, 18, 25, g=g).requires_grad_()
    val, state = ops.stable_rank_loss(Wb, kind="nuclear", iters=4, backend="triton")
    assert state is None
    (2.5 * val[0] - val[1]).backward()
    _, gref, _ = ref.stable_rank(Wb.detach(), None, "nuclear", None, 4)
    want = torch.stack([2.5 * gref[0], -gref[1]])
    assert rel(Wb.grad, want) <= 1e-5

    Ws = randn(2, 21, 16, g=g).requires_grad_()
    L2 = make_L(2, 16, "batched", g)
    val, state = ops.stable_rank_loss(Ws, L2, kind="stable", iters=4, backend="triton")
    assert state.shape == (2, 16)
    val.sum().backward()
    _, gref, sref = ref.stable_rank(Ws.detach(), L2, "stable", None, 4)
    assert rel(Ws.grad, gref) <= 1e-5 and rel(state, sref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90
# ---------------------------------------------------------------------------------------------

_AOT_SCRIPT = """
import json
from prehab_svd import aot
results = aot.compile_all(90, modules=["stable_rank"])
print(json.dumps({"table": aot.format_table(results),
                  "rows": [dict(module=r.module, name=r.name, config=r.config, ok=r.ok, failed=r.failed,
                                wgmma=r.wgmma, tensor_cores=r.tensor_cores, shared=r.shared,
                                registers=r.registers, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                                load_bytes=r.load_bytes, vector_loads=r.vector_loads) for r in results]}))
"""


@pytest.mark.slow
def test_aot_compile_for_sm90():
    """prehab_svd.aot.compile_all() on this module's specs (every launch of stable_rank at 32 × 4096²
    and at an odd n, specialized as the JIT specializes those calls): all compile for sm_90 within
    the shared memory limit, none spills a register (ptxas -v), every aligned variant loads 16 bytes
    per global access (the bf16 M = W L included: 2-byte loads when the alignment was not passed),
    and every tensor-core kernel (bf16 W L, tf32 GEMM and symmetric product) issues wgmma. In a
    subprocess with the interpreter off (InterpretedFunctions cannot be compiled)."""
    out = run_aot_script(_AOT_SCRIPT, timeout=900)
    rows, table = out["rows"], out["table"]
    K = kmod()
    specs = K.aot_specs()
    assert len(rows) == len(specs), table
    assert all(r["module"] == "stable_rank" for r in rows), table
    assert not any(r["failed"] for r in rows), table
    assert all(r["registers"] and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), table
    aligned = [r for r in rows if r["vector_loads"]]
    assert len(aligned) >= 18 and all(r["load_bytes"] == 16 for r in aligned), table
    assert not any(r["config"].endswith("4093") for r in aligned), table
    assert any(r["config"].endswith("8x64x1536") and r["name"] == "syrk_kernel" for r in rows), table  # small
    tc = [r for r in rows if r["tensor_cores"]]
    assert {r["name"] for r in tc} == {"bmm_kernel", "syrk_kernel"}, table
    assert all(r["wgmma"] for r in tc), table
    names = {s["name"] for s in specs}
    assert names == {"bmm_kernel", "syrk_kernel", "mv_kernel", "mtv_kernel", "epilogue_kernel",
                     "rowdot_kernel", "scale_kernel"}
    # the odd-n launches are in the table too (the JIT compiles them for such shapes)
    assert any(r["config"].endswith("32x4096x4093") and r["name"] == "mv_kernel" for r in rows), table


def test_aot_specs_are_the_jit_specializations():
    """The specs' signatures follow the JIT's rule on the launch arguments: an int equal to 1 is the
    constant 1, one divisible by 16 carries the 16-divisibility attribute, pointers are aligned."""
    K = kmod()
    specs = K.aot_specs()
    wl = [s for s in specs if s["config"].startswith("bf16 M = W L")]
    assert len(wl) == len(K.AOT_SHAPES) == 3
    names = list(K.bmm_kernel.arg_names)
    for s in wl:
        odd = s["config"].endswith("4093")
        assert s["constexprs"]["BLOCK_M"] == (64 if s["config"].endswith("8x64x1536") else 128)  # CUDA configs
        assert s["constexprs"]["s_ak"] == 1 and s["constexprs"]["s_bn"] == 1 and s["constexprs"]["s_cn"] == 1
        # s_am = n: divisible by 16 at n = 4096, not at 4093; s_cm = pad16(n) always (M's padded rows)
        assert ((names.index("s_am"),) in s["attrs"]) is (not odd)
        assert (names.index("s_cm"),) in s["attrs"]
        assert (names.index("a_ptr"),) in s["attrs"] and s["signature"]["a_ptr"] == "*bf16"
    mv_odd = [s for s in specs if s["name"] == "mv_kernel" and s["config"].startswith("bf16 W y = M v,")
              and s["config"].endswith("4093")]
    assert len(mv_odd) == 1 and mv_odd[0]["constexprs"]["BLOCK_N"] * mv_odd[0]["constexprs"]["BLOCK_M"] \
        == K.GEMV_TILE[False]


# ---------------------------------------------------------------------------------------------
# GPU only (bf16, tf32 tensor cores)
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("kind", ["stable", "nuclear"])
@pytest.mark.parametrize("wdt,ldt", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float32, None), (torch.float16, torch.float16)])
def test_cuda_matches_reference_and_svd(kind, wdt, ldt):
    """On the GPU (tf32 products, NS outputs rounded to tf32): value within 2e-3 of the fp32 reference,
    gradient cosine ≥ 0.999 to the float64 SVD gradient, on 3 × 513×385 with a gap / clean spectrum."""
    B, m, n = 3, 513, 385
    g = gen("cuda", kind, wdt, ldt)
    k = min(m, n)
    if kind == "stable":
        sig = torch.cat([torch.tensor([4.0, 2.0]), 2.0 * torch.rand(k - 2, generator=g)]).double()
    else:
        sig = 0.05 + torch.rand(k, generator=g, dtype=torch.float64)
    M = with_spectrum(B, m, n, sig, g)
    L = None if ldt is None else make_L(B, n, "batched", g, dtype=ldt)
    W = M if L is None else torch.linalg.solve_triangular(L.double().cpu(), M, upper=False, left=False)
    W = W.to(wdt).to(DEV)
    v, grad, _ = kmod().stable_rank(W, L, kind, None, None)
    vr, gr, _ = ref.stable_rank(W, L, kind, None, None)
    check_finite(v, grad)
    assert rel(v, vr) <= 2e-3
    assert cosines(grad, gr).min().item() >= 0.9999
    v64, g64 = oracle(W, L, kind)
    assert cosines(grad, g64).min().item() >= 0.999
    if kind == "stable":  # converged: the fp64 value
        assert rel(v, v64) <= 2e-3


@needs_cuda
def test_cuda_public_dispatch_bf16_loss():
    g = gen("cuda-public")
    W = randn(4, 300, 200, g=g, dtype=torch.bfloat16).requires_grad_()
    L = make_L(4, 200, "shared", g, dtype=torch.bfloat16)
    val, st = ops.stable_rank_loss(W, L, kind="stable", backend="triton")
    val.sum().backward()
    _, gr, _ = ref.stable_rank(W.detach(), L, "stable", None, None)
    assert W.grad.dtype == torch.bfloat16
    assert cosines(W.grad.float(), gr).min().item() >= 0.999
    val2, _ = ops.stable_rank_loss(W.detach(), L, kind="stable", state=st, backend="triton")
    assert rel(val2, ops.stable_rank(W.detach(), L, kind="stable", state=st, backend="torch")[0]) <= 2e-3
