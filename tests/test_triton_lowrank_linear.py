"""Tests of the Triton low-rank linear (prehab_svd.kernels.lowrank_linear): y = (x Vᵀ) Uᵀ + b.

On a machine with no GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, fp32 and
fp16; the interpreter's bf16 dot is wrong, errors ~1e10); bf16 and the H100 configurations run in
the GPU-only tests, which skip themselves here. Both code paths are forced explicitly: "decode" (the
down kernel z = x Vᵀ into an fp32 workspace, with and without split-in atomics, GEMV and token-tile
programs; then the up kernel y = z Uᵀ + b) and "gemm" (two tiled GEMMs, bias in the epilogue).

Every result is compared with a float64 oracle computed from the same (rounded) inputs by relative
Frobenius error (≤ 1e-5 fp32, ≤ 1e-2 fp16). Every buffer the kernels are meant to overwrite (y, and
the intermediate z where it is not zero-initialised for atomics) is pre-filled with NaN, so an output
element, or an element of z, that no program wrote makes the result non-finite and fails.
"""

from __future__ import annotations


import torch

from _triton_env import CUDA, DEV, INTERPRET, cannot_run, needs_cuda_for, run_aot_script, triton  # noqa: F401  (sets up the interpreter)

import pytest  # noqa: E402

import prehab_svd.ops as ops  # noqa: E402
from prehab_svd.kernels import lowrank_linear as lk  # noqa: E402



pytestmark = cannot_run
needs_cuda = needs_cuda_for("bf16 and the H100 configurations")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Make every buffer the kernels must overwrite start as NaN."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(lk, "_empty", nan_empty)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make(lead, K, N, R, dtype, bias=True, seed=0):
    g = _gen(seed)
    x = torch.randn(*lead, K, generator=g).to(device=DEV, dtype=dtype)
    V = (torch.randn(R, K, generator=g) / K ** 0.5).to(device=DEV, dtype=dtype)
    U = (torch.randn(N, R, generator=g) / R ** 0.5).to(device=DEV, dtype=dtype)
    b = torch.randn(N, generator=g).to(device=DEV, dtype=dtype) if bias else None
    return x, U, V, b


def _oracle(x, U, V, b):
    """float64, from the same rounded inputs, independent of the code under test."""
    x64 = x.double().reshape(-1, x.shape[-1])
    y = (x64 @ V.double().T) @ U.double().T
    if b is not None:
        y = y + b.double()
    return y.reshape(*x.shape[:-1], U.shape[0])


def _check(y, x, U, V, b):
    assert y.shape == (*x.shape[:-1], U.shape[0])
    assert y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all(), "an output element was not written (NaN pre-fill survived)"
    ref = _oracle(x, U, V, b)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[x.dtype], f"relative Frobenius error {err:.3e} > {TOL[x.dtype]:.0e}"
    return err


# token count -> leading dims of x (1-D, 2-D and 3-D inputs)
LEAD = {1: (), 3: (3,), 17: (17,), 70: (2, 35), 200: (5, 40)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("path", ["decode", "gemm"])
@pytest.mark.parametrize("T", sorted(LEAD))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64(dtype, path, T, bias):
    x, U, V, b = _make(LEAD[T], 45, 37, 11, dtype, bias=bias, seed=T)
    _check(lk.lowrank_linear(x, U, V, b, path=path), x, U, V, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("path,lead", [("decode", (17,)), ("gemm", (2, 45)), ("decode", (1, 1))])
def test_larger_shape(dtype, path, lead):
    x, U, V, b = _make(lead, 300, 257, 67, dtype, seed=7)
    _check(lk.lowrank_linear(x, U, V, b, path=path), x, U, V, b)


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("split_k", [1, 2, 5])
@pytest.mark.parametrize("split_reduce", ["auto", "atomic", "load"])
def test_decode_split_in(T, split_k, split_reduce):
    """The down kernel's in-splits: plain stores (split 1), fp32 atomics into a zeroed z, and one
    partial per split in a NaN-prefilled buffer summed by the up kernel on load (a partial no program
    wrote would poison y)."""
    x, U, V, b = _make((T,), 150, 41, 23, torch.float32, seed=split_k)
    _check(lk.lowrank_linear(x, U, V, b, path="decode", split_k=split_k, split_reduce=split_reduce),
           x, U, V, b)


def test_decode_gemv_split_is_two_launches_without_memset(monkeypatch):
    """T = 1 with in-splits: by default the partials are summed on load, so the plan is the two
    kernels and nothing else (no zeroed workspace: torch.zeros is never called); token tiles with
    splits keep the atomics into a zeroed z."""
    x, U, V, b = _make((1,), 150, 41, 23, torch.float32)
    y = torch.empty(1, 41)
    zeros = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: zeros.append(a) or real_zeros(*a, **k))
    plan = lk._plan("decode", x, U, V, b, y, "ieee", 4, None, False, 4)
    assert [ln.kind for ln in plan] == ["down", "up"] and not zeros
    down, up = plan
    assert not down.meta["ATOMIC"] and up.args["N_PARTS"] == down.grid[1] == 3  # K=150: 3 splits of 64
    assert down.args["stride_zs"] == up.args["stride_zs"] == lk._pad16(23)
    x17 = torch.randn(17, 150)
    plan = lk._plan("decode", x17, U, V, b, torch.empty(17, 41), "ieee", 4, None, False, 4)
    assert plan[0].meta["ATOMIC"] and plan[1].args["N_PARTS"] == 1 and len(zeros) == 1
    with pytest.raises(ValueError, match="split_reduce"):
        lk.lowrank_linear(x, U, V, b, path="decode", split_k=2, split_reduce="tree")


@pytest.mark.parametrize("T,block_t", [(3, 1), (5, 32), (70, 16)])
def test_decode_token_tiles(T, block_t):
    """GEMV programs for several tokens (one per token), and token tiles over several token blocks."""
    x, U, V, b = _make((T,), 45, 37, 11, torch.float16, seed=T)
    _check(lk.lowrank_linear(x, U, V, b, path="decode", block_t=block_t, split_k=2), x, U, V, b)


@pytest.mark.parametrize("path", ["decode", "gemm"])
def test_strided_inputs(path):
    """Transposed and sliced views: the launcher passes strides, it does not assume contiguity."""
    g = _gen(3)
    T, K, N, R = 19, 45, 37, 11
    x = torch.randn(K, T, generator=g).to(DEV).T                      # [T, K], stride (1, T)
    V = torch.randn(K, 2 * R, generator=g).to(DEV).T[::2]             # [R, K], strides (2, 2R)
    U = (torch.randn(R, N, generator=g) / R ** 0.5).to(DEV).T         # [N, R], stride (1, N)
    b = torch.randn(2 * N, generator=g).to(DEV)[::2]                  # [N], stride 2
    assert not (x.is_contiguous() or V.is_contiguous() or U.is_contiguous() or b.is_contiguous())
    _check(lk.lowrank_linear(x, U, V, b, path=path), x, U, V, b)


def _padded(rows, cols, dtype, g, scale=1.0, fill=float("nan")):
    """A [rows, cols] view of a [rows, cols16] buffer whose padding columns hold ``fill`` (NaN: a
    kernel that reads past column `cols` poisons its output), as LowRankLinear stores its factors."""
    buf = torch.full((rows, lk._pad16(cols)), fill, dtype=torch.float32)
    buf[:, :cols] = torch.randn(rows, cols, generator=g) * scale
    view = buf.to(device=DEV, dtype=dtype)[:, :cols]
    assert view.stride(0) % 16 == 0 and view.stride(1) == 1
    return view


# ranks the keep rule produces are rarely multiples of 16 (LLaMA-7B: 819, 1228, 1638, 1791):
# 13 and 29 (< and > 16, ragged), 16 (aligned), 819 itself at a small width
RAGGED = [(45, 37, 13), (48, 40, 16), (64, 33, 29), (40, 24, 819)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("path,T,block_t", [("decode", 1, None), ("decode", 3, 1), ("decode", 17, None),
                                            ("decode", 40, 32), ("gemm", 70, None)])
@pytest.mark.parametrize("K,N,R", RAGGED)
def test_ragged_ranks_padded_factors(dtype, path, T, block_t, K, N, R):
    """Factors stored with 16-aligned row strides whose padding is NaN, ranks that are and are not
    multiples of 16: the kernels read exactly r columns (the NaN padding never reaches y), the
    16-wide tail step after the 16-aligned main loop covers the last r mod 16 columns."""
    g = _gen(R * 100 + T)
    x = _padded(T, K, dtype, g)                      # x rows padded too (row stride 48 / 64)
    V = _padded(R, K, dtype, g, scale=K ** -0.5)
    U = _padded(N, R, dtype, g, scale=R ** -0.5)
    b = torch.randn(N, generator=g).to(device=DEV, dtype=dtype)
    split = 2 if path == "decode" else None         # also the atomic in-split into the padded z
    y = lk.lowrank_linear(x, U, V, b, path=path, block_t=block_t, split_k=split)
    _check(y, x, U, V, b)
    if path == "decode":  # and plain stores into z's padded rows
        _check(lk.lowrank_linear(x, U, V, None, path=path, block_t=block_t, split_k=1), x, U, V, None)


@pytest.mark.parametrize("R", [13, 819])
def test_workspace_is_padded_to_16(R):
    """z (decode: fp32; gemm: x's dtype) gets a 16-aligned row stride, whatever the rank: the plan
    the launcher runs (also what aot_specs compiles) passes a stride Triton marks as aligned."""
    x, U, V, b = _make((3,), 32, 24, R, torch.float32)
    y = torch.empty(3, 24)
    where = {"decode": (("down", "stride_zt"), ("up", "stride_zt")),
             "gemm": (("gemm-z", "stride_cm"), ("gemm-y", "stride_am"))}
    for path, uses in where.items():
        launches = {ln.kind: ln for ln in lk._plan(path, x, U, V, b, y, "ieee", None, None, False, 4)}
        assert sorted(launches) == sorted(k for k, _ in uses)
        for kind, arg in uses:
            assert launches[kind].args[arg] == lk._pad16(R), (path, kind, arg)
        assert path != "gemm" or launches["gemm-z"].args["N_STORE"] == lk._pad16(R)


def test_triton_supports_no_fp64(monkeypatch):
    """Every op's Triton `supports` says no to dtypes its kernels do not take (fp64), on CUDA as under
    the interpreter, so "auto" falls back to torch instead of the launcher raising TypeError."""
    from prehab_svd.ops import _registry, _triton

    for op, (module, _) in _triton.KERNEL_MODULES.items():
        supports = _triton._supports(module)
        monkeypatch.setattr(_triton, "interpreting", lambda: False)  # as on a GPU machine
        assert supports(torch.device("cuda"), torch.bfloat16) is True
        assert supports(torch.device("cuda"), torch.float32) is True
        assert supports(torch.device("cuda"), torch.float64) is False, op
        assert supports(torch.device("cuda"), torch.int64) is False, op
        monkeypatch.setattr(_triton, "interpreting", lambda: True)
        assert supports(torch.device("cpu"), torch.float64) is False, op
        assert supports(torch.device("cpu"), torch.float16) is True
    # the dispatch decision: with Triton ranked first, fp64 resolves to torch, fp32 to Triton
    impl = _registry._REGISTRY["lowrank_linear"]["triton"]
    monkeypatch.setitem(_registry._REGISTRY["lowrank_linear"], "triton",
                        _registry.BackendImpl(impl.fn, impl.supports, 100))
    assert _registry.resolve("lowrank_linear", "auto", torch.device("cpu"), torch.float64) == "torch"
    assert _registry.resolve("lowrank_linear", "auto", torch.device("cpu"), torch.float32) == "triton"
    x, U, V, b = (t.double() for t in _make((3,), 45, 37, 11, torch.float32))
    y = ops.lowrank_linear(x, U, V, b)  # auto with Triton first: fp64 runs (on torch), no TypeError
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _oracle(x, U, V, b), rtol=1e-12, atol=1e-12)
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.lowrank_linear(x, U, V, b, backend="triton")


def test_auto_path_and_heuristics():
    assert lk.choose_path(1) == "decode" and lk.choose_path(lk.DECODE_MAX_T) == "decode"
    assert lk.choose_path(lk.DECODE_MAX_T + 1) == "gemm"
    # H100 (132 SMs), LLaMA-7B 4096² at keep 0.4 (r = 819): T=1 GEMV has 103 r-blocks of 8 rows ->
    # split `in` to fill the GPU; T=16 has 26 r-blocks of 32 -> split more; enough r-blocks -> none.
    assert lk._split_k(4096, 103, 512, 132) == 4
    assert lk._split_k(4096, 26, 128, 132) == 16
    assert lk._split_k(4096, 300, 512, 132) == 1
    assert lk._split_k(100, 26, 128, 132) == 1  # never split below 2 K-steps per program
    x, U, V, b = _make((5, 3), 45, 37, 11, torch.float32, seed=11)  # auto: T=15 -> decode
    _check(lk.lowrank_linear(x, U, V, b), x, U, V, b)


def test_degenerate_shapes():
    x, U, V, b = _make((0,), 45, 37, 11, torch.float32)
    assert lk.lowrank_linear(x, U, V, b).shape == (0, 37)
    x, U, V, b = _make((4,), 45, 37, 0, torch.float32)  # rank 0: y = b
    torch.testing.assert_close(lk.lowrank_linear(x, U, V, b), b.expand(4, 37))
    torch.testing.assert_close(lk.lowrank_linear(x, U, V, None), torch.zeros(4, 37, device=DEV))


def test_rejects_bad_arguments():
    x, U, V, b = _make((3,), 45, 37, 11, torch.float32)
    with pytest.raises(TypeError):
        lk.lowrank_linear(x, U.half(), V, b)
    with pytest.raises(ValueError):
        lk.lowrank_linear(x, U, V[:, :44], b)
    with pytest.raises(ValueError):
        lk.lowrank_linear(x, U, V, b, path="fused")
    if INTERPRET:
        with pytest.raises(TypeError, match="bf16"):
            lk.lowrank_linear(*(t.bfloat16() for t in (x, U, V, b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead", [(2, 3), (2, 40)])
def test_public_dispatch(dtype, lead):
    """prehab_svd.ops.lowrank_linear(..., backend="triton") runs this kernel, with autograd."""
    assert "triton" in ops.available_backends("lowrank_linear", DEV, dtype)
    x, U, V, b = _make(lead, 45, 37, 11, dtype, seed=5)
    y = ops.lowrank_linear(x, U, V, b, backend="triton")
    _check(y, x, U, V, b)
    assert torch.equal(y, lk.lowrank_linear(x, U, V, b))  # the dispatch calls the auto path
    if dtype == torch.float32:  # the backward is plain torch; check it runs through the custom op
        leaves = [t.clone().requires_grad_() for t in (x, U, V, b)]
        ops.lowrank_linear(*leaves, backend="triton").square().sum().backward()
        ref = [t.clone().requires_grad_() for t in (x, U, V, b)]
        ops.lowrank_linear(*ref, backend="torch").square().sum().backward()
        for a, r in zip(leaves, ref):
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


def test_layer_forward_uses_triton():
    from prehab_svd import LowRankLinear

    torch.manual_seed(0)
    layer = LowRankLinear(45, 37, 11, bias=True, device=DEV)
    layer.backend = "triton"
    x = torch.randn(2, 9, 45, device=DEV)
    with torch.no_grad():
        _check(layer(x), x, layer.U, layer.V, layer.bias)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90 (no GPU needed)
# ---------------------------------------------------------------------------------------------


_AOT_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prehab_svd import aot
from prehab_svd.kernels import lowrank_linear as lk

results = aot.compile_all(90, modules=["lowrank_linear"])
rows = [dict(module=r.module, config=r.config, ok=r.ok, failed=r.failed, wgmma=r.wgmma,
             tensor_cores=r.tensor_cores, shared=r.shared, error=r.error) for r in results]
specs = lk.aot_specs()
# what the PTX of the variants that real calls at ragged and aligned ranks run does
ptx = {}
for s in specs:
    if not (s["tokens"] in (1, 16, 2048) and s["dtype"] == "bf16"):
        continue
    k = triton.compile(ASTSource(fn=s["fn"], signature=s["signature"], constexprs=s["constexprs"],
                                 attrs=s["attrs"]), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": s["num_warps"], "num_stages": s["num_stages"]})
    asm = k.asm["ptx"]
    cp = re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)? \[[^\]]+\], \[[^\]]+\], (0x[0-9a-f]+|\d+)", asm)
    ptx[s["config"]] = dict(kind=s["kind"], rank=s["rank"], tokens=s["tokens"], shared=k.metadata.shared,
                            wgmma="wgmma" in asm, mma=bool(re.search(r"\bmma\.sync", asm)),
                            cp_async_sizes=sorted({int(c, 0) for c in cp}), atomics="atom.global" in asm,
                            v4_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", asm)))
# Triton's own runtime specialization of the integer arguments, to check _spec_of against
try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    spec_rule = {str(v): list(native_specialize_impl(BaseBackend, v, False, True, True))
                 for v in (1, 13, 819, 832, 4096, 2 ** 31 + 16)}
except Exception as e:  # an internal API (triton >= 3.4): absent or changed in another version
    spec_rule = {"error": repr(e)}
print(json.dumps({"table": aot.format_table(results), "rows": rows, "ptx": ptx, "spec_rule": spec_rule}))
"""


@pytest.fixture(scope="module")
def aot_out():
    """Run the sm_90 compiles once, in a subprocess with the interpreter off: in a process where
    TRITON_INTERPRET=1 was set before the kernel module was imported, its kernels are
    InterpretedFunctions, which cannot be compiled."""
    return run_aot_script(_AOT_SCRIPT, timeout=900)


def test_aot_specs_are_the_launch_plans():
    """aot_specs() compiles what real calls launch: for LLaMA-7B's real ranks the ragged rank itself
    is unhinted while the padded row strides of U and z are hinted as divisible by 16; a multiple-of-
    16 rank is hinted too; T = 1 becomes a constexpr as Triton specializes it."""
    specs = lk.aot_specs()
    ranks = {s["rank"] for s in specs}
    assert {819, 1024} <= ranks
    for s in specs:
        names = list(s["signature"])
        hinted = {names[i] for (i,) in s["attrs"]}
        R = s["rank"]
        if s["kind"] == "up":
            assert ("R" in hinted) == (R % 16 == 0), s["config"]
            assert "stride_un" in hinted and "z_ptr" in hinted and "u_ptr" in hinted, s["config"]
            assert s["tokens"] == 1 or "stride_zt" in hinted, s["config"]
        if s["kind"] == "gemm-y":
            assert ("K" in hinted) == (R % 16 == 0), s["config"]
            assert {"stride_am", "stride_bn", "stride_cm"} <= hinted, s["config"]
        if s["kind"] == "gemm-z":
            assert ("N" in hinted) == (R % 16 == 0) and {"N_STORE", "stride_cm"} <= hinted, s["config"]
        if s["kind"] == "down":
            assert {"R_STORE", "K", "K_PER_SPLIT"} <= hinted, s["config"]
        if s["tokens"] == 1 and s["kind"] in ("down", "up"):
            assert s["signature"]["T"] == "constexpr" and s["constexprs"]["T"] == 1


def test_aot_compile_all_for_this_module(aot_out):
    """prehab_svd.aot.compile_all() on this module's specs: every H100 launch compiles for sm_90
    within the shared-memory limit, and the tensor-core (bf16 GEMM) ones issue wgmma."""
    rows, table = aot_out["rows"], aot_out["table"]
    assert len(rows) == len(lk.aot_specs()) and all(r["module"] == "lowrank_linear" for r in rows), table
    assert not any(r["failed"] for r in rows), table
    tc = [r for r in rows if r["tensor_cores"]]
    assert len(tc) >= 6 and all(r["wgmma"] for r in tc), table  # bf16 GEMMs: both tilings, z and y
    assert all(r["config"].startswith(("bf16", "fp32")) for r in rows)


def test_aot_ragged_rank_variants_vectorize(aot_out):
    """At a ragged rank (819) the variants real calls run keep what an aligned rank gets: the bf16
    y = z Uᵀ GEMM pipelines 16-byte cp.async into ≥ 3 stages of shared memory on wgmma (it fell to
    scalar loads and one stage before the padding), the GEMV up kernel issues 16-byte vector loads,
    the token-tile down kernel tensor-core mma and fp32 atomics."""
    ptx = aot_out["ptx"]
    stages3 = 3 * (128 * 64 + 64 * 128) * 2
    for R in (819, 1024):
        gy = [v for v in ptx.values() if v["kind"] == "gemm-y" and v["rank"] == R and v["tokens"] == 2048]
        assert gy and all(v["wgmma"] and v["cp_async_sizes"][-1:] == [16] and v["shared"] >= stages3
                          for v in gy), gy
        up = [v for v in ptx.values() if v["kind"] == "up" and v["rank"] == R and v["tokens"] == 1]
        assert up and all(v["v4_loads"] > 0 and not v["mma"] for v in up), up
        up16 = [v for v in ptx.values() if v["kind"] == "up" and v["rank"] == R and v["tokens"] == 16]
        assert up16 and all(v["mma"] and 16 in v["cp_async_sizes"] for v in up16), up16
    d = [v for v in ptx.values() if v["kind"] == "down" and v["tokens"] == 16]
    assert d and all(v["mma"] and v["atomics"] and 16 in v["cp_async_sizes"] for v in d), d


def test_aot_spec_rule_matches_triton(aot_out):
    """_spec_of's rule (1 -> constexpr, multiples of 16 -> divisible, ≥ 2³¹ -> i64) is Triton's."""
    rule = aot_out["spec_rule"]
    if "error" in rule:
        pytest.skip(f"this Triton's specialization is not callable as in 3.9: {rule['error']}")
    for v, (ty, key) in rule.items():
        v = int(v)
        assert ty == ("constexpr" if v == 1 else "i32" if v < 2 ** 31 else "i64"), (v, ty)
        assert v == 1 or (key == "D") == (v % 16 == 0), (v, key)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16 and the H100 configurations
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "decode", "gemm"])
@pytest.mark.parametrize("T", [1, 16, 64, 300])
@pytest.mark.parametrize("shape", [(45, 37, 11), (1024, 768, 203), (4096, 4096, 816)])
def test_cuda_bf16(path, T, shape):
    K, N, R = shape
    x, U, V, b = _make((T,), K, N, R, torch.bfloat16, seed=T)
    _check(lk.lowrank_linear(x, U, V, b, path=path), x, U, V, b)


@needs_cuda
def test_cuda_bf16_dispatch_and_fp32_tf32_off():
    x, U, V, b = _make((3, 7), 512, 384, 96, torch.bfloat16, seed=1)
    _check(ops.lowrank_linear(x, U, V, b, backend="triton"), x, U, V, b)
    x, U, V, b = _make((300,), 512, 384, 96, torch.float32, seed=2)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for path in ("decode", "gemm"):
            _check(lk.lowrank_linear(x, U, V, b, path=path), x, U, V, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@needs_cuda
@pytest.mark.parametrize("path,block_t", [("decode", 64), ("gemm", None)])
def test_cuda_int64_offsets_column_major_x(path, block_t):
    """A column-major x with T·in ≥ 2³¹: the element (t, k) sits at t + k·T, past int32 for the last
    columns (k·T with T = 2¹⁹ + 3, k ≥ 4096). int32 offsets would wrap and read the wrong memory."""
    T, K, N, R = 2 ** 19 + 3, 4100, 64, 40
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(K, T, device="cuda", dtype=torch.float16, generator=g).T  # 4.3 GB, stride (1, T)
    assert x.stride(1) * (K - 1) >= 2 ** 31
    U = (torch.randn(N, R, device="cuda", generator=g) / R ** 0.5).half()
    V = (torch.randn(R, K, device="cuda", generator=g) / K ** 0.5).half()
    y = lk.lowrank_linear(x, U, V, None, path=path, block_t=block_t)
    assert torch.isfinite(y).all()
    for rows in (slice(0, 8), slice(T - 8, T)):
        _check(y[rows], x[rows], U, V, None)
