"""Tests of the Triton covariance kernel (prehab_svd.kernels.covariance): G += xᵀx, C += xᵀy.

On a machine with no GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, fp32 and
fp16; the interpreter's bf16 dot is wrong, errors ~1e10); bf16 and the H100 configurations run in
the GPU-only tests, which skip themselves here. Every case starts from a random nonzero (and
non-symmetric) accumulator and checks, against a float64 oracle computed from the same rounded inputs:

* the relative Frobenius error ‖G_new − (G_old + xᵀx)‖ / ‖|G_old| + |x|ᵀ|x|‖ (relative to the size of
  what is summed, so a small update on a large accumulator is judged fairly), ≤ 1e-5 for fp32 inputs,
  1e-2 for 16-bit ones;
* elementwise, |G_new − (G_old + xᵀx)| ≤ (T + 4)·u·(|G_old| + |x|ᵀ|x|), u = 2⁻²⁴: the rigorous bound of
  fp32 accumulation (16-bit products are exact in fp32). An element the kernel never wrote (a missed
  tile, a missed mirror of an upper tile into the lower triangle, a masked-off edge) is off by a whole
  |xᵀx|_ij and fails it.
"""

from __future__ import annotations


import torch

from _triton_env import CUDA, DEV, INTERPRET, cannot_run, needs_cuda_for, run_aot_script, triton  # noqa: F401  (sets up the interpreter)

import zlib  # noqa: E402

import pytest  # noqa: E402

import triton.language as tl  # noqa: E402

import prehab_svd.ops as ops  # noqa: E402
from prehab_svd.kernels.covariance import _lower_pair, _upper_pair, covariance_kernel  # noqa: E402


# did it take effect for the kernel? (not if prehab_svd.kernels.covariance was imported before)
KERNEL_INTERPRETED = type(covariance_kernel).__name__ == "InterpretedFunction"

pytestmark = [cannot_run, pytest.mark.skipif(
    not (CUDA or KERNEL_INTERPRETED),
    reason="no CUDA GPU, and the Triton interpreter is not in effect for the kernel (TRITON_INTERPRET "
           "was 0, or prehab_svd.kernels.covariance was imported before it was set): it cannot run here",
)]
needs_cuda = needs_cuda_for("bf16 and the H100 configurations")

U32 = 2.0 ** -24
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def kmod():
    from prehab_svd.kernels import covariance

    return covariance


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den > 0 else num


def check_acc(new, old, a, b, tol):
    """new == old + aᵀb (a, b the rounded inputs): Frobenius and elementwise forward-error bound."""
    a64, b64 = a.double().cpu(), b.double().cpu()
    upd = a64.mT @ b64
    new64, old64 = new.double().cpu(), old.double().cpu()
    assert torch.isfinite(new64).all()
    mag = old64.abs() + a64.abs().mT @ b64.abs()  # the size of what is summed, elementwise
    err = (torch.linalg.vector_norm(new64 - old64 - upd) / torch.linalg.vector_norm(mag)).item()
    assert err <= tol, f"relative Frobenius error {err:.3g} > {tol}"
    T = a.shape[0]
    # on the GPU, tensor-core fp32 accumulation may truncate instead of rounding: twice the bound
    bound = (2 if CUDA else 1) * (T + 4) * U32 * mag + 1e-30
    ratio = ((new64 - (old64 + upd)).abs() / bound).max().item()
    assert ratio <= 1.0, f"an element is off by {ratio:.3g}x the fp32 error bound (not written?)"


def run_case(T, d, dtype, cross, launcher=None):
    g = gen("cov", T, d, dtype, cross)
    x = randn(T, d, g=g, dtype=dtype)
    y = randn(T, d, g=g, dtype=dtype, scale=0.5) if cross else None
    scale = max(T, 1) ** 0.5
    G = randn(d, d, g=g, scale=scale)  # nonzero, not symmetric: the mirror must add, not copy
    C = randn(d, d, g=g, scale=scale) if cross else None
    G0 = G.clone()
    C0 = C.clone() if cross else None
    (launcher or kmod().covariance_update)(G, x, C, y)
    tol = TOL[dtype]
    check_acc(G, G0, x, x, tol)
    if cross:
        check_acc(C, C0, x, y, tol)


# odd shapes (no multiple of any block size), one tile up to many tiles per side; the interpreter
# uses 16/32/64-wide tiles (see CONFIGS), so d = 50, 77, 130 have 2-5 tile rows with ragged edges.
SHAPES = [(1, 1), (1, 19), (7, 16), (37, 50), (129, 77), (300, 33), (63, 130)]


@pytest.mark.parametrize("cross", [False, True], ids=["G", "G+C"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,d", SHAPES)
def test_matches_fp64_oracle(T, d, dtype, cross):
    run_case(T, d, dtype, cross)


@pytest.mark.parametrize("T,d,dtype", [(41, 511, torch.float32), (200, 300, torch.float16)])
def test_larger_d(T, d, dtype):
    run_case(T, d, dtype, True)


def test_streaming_batches():
    """Three calls of different token counts accumulate like one call on the concatenation."""
    d = 45
    g = gen("stream")
    G = randn(d, d, g=g)
    C = randn(d, d, g=g)
    G0, C0 = G.clone(), C.clone()
    xs, ys = [], []
    for T in (5, 64, 100):
        x = randn(T, d, g=g, dtype=torch.float16)
        y = randn(T, d, g=g, dtype=torch.float16)
        kmod().covariance_update(G, x, C, y)
        xs.append(x)
        ys.append(y)
    X, Y = torch.cat(xs), torch.cat(ys)
    check_acc(G, G0, X, X, 1e-5)
    check_acc(C, C0, X, Y, 1e-5)


def test_strided_inputs_and_accumulators():
    """Non-contiguous x, y (transposed, column-strided) and G, C as windows (one transposed) of larger
    buffers: only the window changes."""
    T, d = 70, 37
    g = gen("strides")
    x = randn(d, T, g=g).mT  # [T, d] with strides (1, T)
    y = randn(T, 2 * d + 3, g=g)[:, 1:2 * d + 1:2]  # column stride 2
    assert not x.is_contiguous() and not y.is_contiguous()
    Gbuf = randn(d + 5, d + 9, g=g)
    Cbuf = randn(d + 4, d + 6, g=g)
    G = Gbuf[2:2 + d, 3:3 + d]
    C = Cbuf[1:1 + d, 4:4 + d].mT  # strides (1, d + 6)
    Gbuf0, Cbuf0 = Gbuf.clone(), Cbuf.clone()
    G0, C0 = G.clone(), C.clone()
    kmod().covariance_update(G, x, C, y)
    check_acc(G, G0, x, x, 1e-5)
    check_acc(C, C0, x, y, 1e-5)
    outside = torch.ones_like(Gbuf, dtype=torch.bool)
    outside[2:2 + d, 3:3 + d] = False
    assert torch.equal(Gbuf[outside], Gbuf0[outside])
    outside = torch.ones_like(Cbuf, dtype=torch.bool)
    outside[1:1 + d, 4:4 + d] = False
    assert torch.equal(Cbuf[outside], Cbuf0[outside])


def _sparse_column_major(tmp_path, T, d, stride, dtype, g):
    """[T, d] view with strides (1, stride) over a sparse memory-mapped file: element (t, c) sits at
    c·stride + t, far past 2³¹ for the last columns, while only the T·d used elements touch memory."""
    n = (d - 1) * stride + T
    path = tmp_path / "x.bin"
    with open(path, "wb") as f:
        f.truncate(n * torch.tensor([], dtype=dtype).element_size())
    store = torch.from_file(str(path), shared=True, size=n, dtype=dtype)
    x = store.as_strided((T, d), (1, stride))
    x.copy_(randn(T, d, g=g, dtype=dtype).cpu())
    return x


@pytest.mark.skipif(CUDA, reason="the interpreter reads CPU memory directly (the file is mapped there)")
@pytest.mark.parametrize("stride,off64", [(140_000_000, False), (2 ** 30 + 16, True)],
                         ids=["int64-origins", "int64-in-tile"])
def test_offsets_past_2_31(tmp_path, stride, off64):
    """A column-major x whose element offsets pass 2³¹ (T·d ≥ 2³¹ with T tokens as the feature stride).

    stride 140M, d = 20 (interpreter tiles of 16 columns): the second tile starts at column 16, offset
    16·140M = 2.24e9 > 2³¹, while every offset inside a tile stays below 2³¹ (15·140M + 15), so this
    checks the 64-bit tile origins with 32-bit in-tile offsets (the launcher's OFF64 stays off). With
    32-bit index·stride products the kernel would read at a wrapped (negative) offset. stride 2³⁰+16,
    d = 4: in-tile offsets pass 2³¹ (3·stride), so the launcher must choose OFF64."""
    cov = kmod()
    T, d = 37, 20 if not off64 else 4
    g = gen("off64", stride)
    x = _sparse_column_major(tmp_path, T, d, stride, torch.float16, g)
    y = randn(T, d, g=g, dtype=torch.float16)
    block_d, block_t = cov.CONFIGS[cov.pick_config(d, T, x.dtype, True, "cpu")][:2]
    assert cov.needs_off64(block_t, block_d, x_strides=[x.stride()], y_strides=[y.stride()],
                           acc_strides=[(d, 1)]) is off64
    assert (d - 1) * stride > 2 ** 31
    G, C = randn(d, d, g=g), randn(d, d, g=g)
    G0, C0 = G.clone(), C.clone()
    cov.covariance_update(G, x, C, y)
    check_acc(G, G0, x, x, TOL[torch.float16])
    check_acc(C, C0, x, y, TOL[torch.float16])


def test_needs_off64_bounds():
    """The launcher's 64-bit decision: the largest in-tile offset, exactly at the int32 edge."""
    cov = kmod()
    lim = 2 ** 31 - 1
    # x tile span (block_t - 1)·st + (block_d - 1)·sd
    edge = (lim - 63) // 127  # 63 + 127·edge <= 2³¹ - 1 < 63 + 127·(edge + 1)
    assert not cov.needs_off64(64, 128, x_strides=[(1, edge)], y_strides=[], acc_strides=[])
    assert cov.needs_off64(64, 128, x_strides=[(1, edge + 1)], y_strides=[], acc_strides=[])
    assert cov.needs_off64(64, 128, x_strides=[], y_strides=[(2 ** 26, 1)], acc_strides=[])
    # accumulator tile span (block_d - 1)·(s0 + s1): G with rows of stride 17M (127·17M > 2³¹)
    assert not cov.needs_off64(64, 128, x_strides=[(4096, 1)], y_strides=[(4096, 1)], acc_strides=[(4096, 1)])
    assert cov.needs_off64(64, 128, x_strides=[], y_strides=[], acc_strides=[(17_000_000, 1)])


def test_public_dispatch():
    """Through prehab_svd.ops.covariance_update(..., backend="triton") and CovarianceAccumulator."""
    T, d = 53, 70
    g = gen("dispatch")
    x = randn(T, d, g=g, dtype=torch.float16)
    y = randn(T, d, g=g, dtype=torch.float16)
    G = randn(d, d, g=g)
    C = randn(d, d, g=g)
    G0, C0 = G.clone(), C.clone()
    assert "triton" in ops.available_backends("covariance_update", x.device, x.dtype)
    ops.covariance_update(G, x, C, y, backend="triton")
    check_acc(G, G0, x, x, 1e-5)
    check_acc(C, C0, x, y, 1e-5)

    acc = ops.CovarianceAccumulator(d, cross=True, device=DEV, backend="triton")
    x3 = randn(2, 31, d, g=g)  # [batch, tokens, d]: flattened to 62 tokens
    y3 = randn(2, 31, d, g=g)
    acc.update(x3, y3)
    acc.update(x3[:1], y3[:1])
    X = torch.cat([x3.reshape(-1, d), x3[0]]).double().cpu()
    Y = torch.cat([y3.reshape(-1, d), y3[0]]).double().cpu()
    assert acc.tokens == 93
    assert rel_err(acc.gram(), X.mT @ X / 93) <= 1e-5
    assert rel_err(acc.cross(), X.mT @ Y / 93) <= 1e-5


def test_fallbacks_and_edge_cases():
    cov = kmod()
    g = gen("fallbacks")
    T, d = 20, 24
    # fp64 accumulators: the reference (no fp64 tensor-core path)
    x = randn(T, d, g=g)
    G = randn(d, d, g=g).double()
    G0 = G.clone()
    cov.covariance_update(G, x, None, None)
    assert G.dtype == torch.float64
    assert rel_err(G - G0, x.double().mT @ x.double()) <= 1e-6
    # mixed input dtypes (x fp16, y fp32): promoted, same numbers
    x = randn(T, d, g=g, dtype=torch.float16)
    y = randn(T, d, g=g, dtype=torch.float32)
    G, C = randn(d, d, g=g), randn(d, d, g=g)
    G0, C0 = G.clone(), C.clone()
    cov.covariance_update(G, x, C, y)
    check_acc(G, G0, x, x, 1e-5)
    check_acc(C, C0, x, y, 1e-5)
    # no tokens: nothing changes
    G0 = G.clone()
    cov.covariance_update(G, x[:0], None, None)
    assert torch.equal(G, G0)


def test_bf16_direct_call_on_cpu_uses_reference():
    """The dispatch never sends CPU bf16 to Triton; a direct call must still be right."""
    if DEV != "cpu":
        pytest.skip("CPU-only check")
    g = gen("bf16cpu")
    x = randn(33, 20, g=g, dtype=torch.bfloat16)
    G = randn(20, 20, g=g)
    G0 = G.clone()
    kmod().covariance_update(G, x, None, None)
    check_acc(G, G0, x, x, 1e-5)


@triton.jit
def _pairs_kernel(out_ptr, n, LOWER: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if LOWER:
        i, j = _lower_pair(p)
    else:
        i, j = _upper_pair(p)
    tl.store(out_ptr + 2 * p, i, mask=p < n)
    tl.store(out_ptr + 2 * p + 1, j, mask=p < n)


def test_pair_mapping_is_a_bijection():
    """The 1-D grid -> (i, j) maps used by the kernel, evaluated on every program id of a 1024×1024
    tile grid: upper pairs (i ≤ j) and strictly lower pairs (i > j) each exactly once."""
    nb = 1024
    for lower in (False, True):
        n = nb * (nb - 1) // 2 if lower else nb * (nb + 1) // 2
        out = torch.full((n, 2), -1, dtype=torch.int32, device=DEV)
        block = 1 << 16 if INTERPRET else 1024
        _pairs_kernel[(triton.cdiv(n, block),)](out, n, LOWER=lower, BLOCK=block)
        out = out.cpu().long()
        i, j = out[:, 0], out[:, 1]
        assert (i >= 0).all() and (j >= 0).all() and (i < nb).all() and (j < nb).all()
        assert ((i > j) if lower else (i <= j)).all()
        assert torch.unique(i * nb + j).numel() == n  # distinct pairs, so all of them


def test_config_heuristic():
    cov = kmod()
    bf16 = torch.bfloat16
    # LLaMA-7B widths on H100: 128-tiles, the configuration of the AOT table
    assert cov.pick_config(4096, 8192, bf16, False, "cuda") == "tc128"
    assert cov.pick_config(4096, 8192, bf16, True, "cuda") == "tc128"
    assert cov.pick_config(11008, 2048, torch.float16, True, "cuda") == "tc128"
    # too few 128-tiles to fill 132 SMs: 64-tiles
    assert cov.pick_config(1024, 8192, bf16, False, "cuda") == "tc64"
    assert cov.pick_config(4096, 8192, torch.float32, True, "cuda") == "fp32"
    assert cov.pick_config(4096, 8192, torch.float32, True, "cpu").startswith("interp")
    labels = {s["config"].split()[2] for s in cov.aot_specs()}
    assert {"tc128", "tc64", "fp32"} <= labels  # every CUDA configuration is compiled ahead of time


_AOT_SCRIPT = """
import json
from prehab_svd import aot
results = aot.compile_all(90, modules=["covariance"])
print(json.dumps({"table": aot.format_table(results),
                  "rows": [dict(module=r.module, config=r.config, ok=r.ok, failed=r.failed, wgmma=r.wgmma,
                                tensor_cores=r.tensor_cores, shared=r.shared, registers=r.registers,
                                spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                                load_bytes=r.load_bytes) for r in results],
                  "limit": aot.SHARED_LIMIT[90]}))
"""


def test_aot_compile_for_sm90():
    """prehab_svd.aot.compile_all() on this module's specs only, compiled with the alignment attrs
    the JIT infers for aligned inputs: all compile for sm_90, fit the shared memory, do not spill a
    register (ptxas -v), load 16 bytes per global access, and the tensor-core (bf16) ones issue
    wgmma; the 128-tile G+C kernel (aa-svd at d = 4096, 11008) is pipelined into 144 KiB.

    In a subprocess with the interpreter off: in a process where TRITON_INTERPRET=1 was set before
    the kernel module was imported, its kernels are InterpretedFunctions, which cannot be compiled.
    """
    out = run_aot_script(_AOT_SCRIPT, timeout=600)
    rows, table = out["rows"], out["table"]
    assert len(rows) == len(kmod().aot_specs()) == 8, table
    assert all(r["module"] == "covariance" for r in rows), table
    assert not any(r["failed"] for r in rows), table
    assert all(r["registers"] and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), table
    assert all(r["load_bytes"] == 16 for r in rows), table
    tc = [r for r in rows if r["tensor_cores"]]
    assert len(tc) == 6 and all(r["wgmma"] for r in tc), table
    big = [r for r in rows if r["config"] == "bf16 G+C tc128 D128 T64 w8 s3"]
    assert len(big) == 1 and big[0]["shared"] == 3 * 3 * 128 * 64 * 2 <= out["limit"], table


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("cross", [False, True], ids=["G", "G+C"])
@pytest.mark.parametrize("T,d", [(1, 1), (333, 257), (1000, 2100), (77, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_cuda_matches_fp64_oracle(T, d, dtype, cross):
    run_case(T, d, dtype, cross)


@needs_cuda
def test_cuda_public_dispatch_bf16_strided():
    T, d = 515, 300
    g = gen("cuda-dispatch")
    x = randn(d, T, g=g, dtype=torch.bfloat16).mT
    y = randn(T, d, g=g, dtype=torch.bfloat16)
    G, C = randn(d, d, g=g), randn(d, d, g=g)
    G0, C0 = G.clone(), C.clone()
    ops.covariance_update(G, x, C, y, backend="triton")
    check_acc(G, G0, x, x, 1e-2)
    check_acc(C, C0, x, y, 1e-2)


@needs_cuda
def test_cuda_no_dxd_allocation():
    """Streaming: a call allocates no d×d temporary (peak memory grows by far less than d²·4 bytes)."""
    T, d = 4096, 2048
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    G = torch.zeros(d, d, device="cuda")
    C = torch.zeros(d, d, device="cuda")
    kmod().covariance_update(G, x, C, y)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kmod().covariance_update(G, x, C, y)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < d * d * 4 // 8



def _aa_svd_logits(monkeypatch, backend: str, stats_dtype=torch.float32, **options):
    from conftest import tiny_model, token_batches
    from prehab_svd import compress

    original = ops.CovarianceAccumulator
    with monkeypatch.context() as m:
        m.setattr(ops, "CovarianceAccumulator", lambda *a, **k: original(*a, **{**k, "backend": backend}))
        model = tiny_model("llama", layers=2, hidden=64, intermediate=120)
        compress(model, "aa-svd", 0.5, token_batches(n=8, batch=2, tokens=24, seed=1), stats_dtype=stats_dtype,
                 **options)
    with torch.no_grad():
        return model(**token_batches(n=1, batch=2, tokens=24, seed=7)[0]).logits.double()


@cannot_run
@pytest.mark.skipif(CUDA, reason="compares the backends on CPU tensors (the interpreter's)")
def test_aa_svd_model_and_the_covariance_backend(monkeypatch):
    """Issue 15's case: aa-svd of a tiny GQA Llama, 384 calibration tokens, the torch against the
    Triton covariance backend. With the default options (fp32 per-batch products, float64 sums, OAS
    shrinkage) the models agree to 1e-5 (measured 1.1e-6). The exact optimum (``shrinkage=0``) is
    sensitive to the two kernels' own fp32 rounding (~1e-7 of the Gram): o_proj's input has real
    directions 3e-5 below its largest (two query heads share each compressed value head), so 1e-7
    there reaches the logits at 5.3e-4 (was 5.6e-3 with fp32 running sums); shrinkage lifts those
    directions. With float64 products (``stats_dtype``) both backends run the same float64 BLAS
    product (the Triton kernel has no fp64 path) and even the exact optimum agrees to rounding."""
    ref = _aa_svd_logits(monkeypatch, "torch")
    got = _aa_svd_logits(monkeypatch, "triton")
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    ref0 = _aa_svd_logits(monkeypatch, "torch", shrinkage=0.0)
    got0 = _aa_svd_logits(monkeypatch, "triton", shrinkage=0.0)
    rel = float((got0 - ref0).abs().max() / ref0.abs().max())
    assert 0 < rel <= 2e-3, rel  # the kernels really differ, and by no more than measured
    ref64 = _aa_svd_logits(monkeypatch, "torch", torch.float64, shrinkage=0.0)
    got64 = _aa_svd_logits(monkeypatch, "triton", torch.float64, shrinkage=0.0)
    assert float((got64 - ref64).abs().max() / ref64.abs().max()) <= 1e-5
