"""Tests of the CUDA C++ backend (csrc/, built as the extension prehab_svd._C; prehab_svd/ops/_cuda.py).

Three layers; each test skips itself, with the reason, where it cannot run:

* everywhere (the CPU CI): importing prehab_svd builds and imports nothing; where the extension cannot
  run, ``backend="cuda"`` is a clear BackendUnavailableError; ``prehab-svd kernels`` reports the CUDA
  backend (where it is not built: why, and how to build it); setup.py's skip line says how to build it.
* where the extension is built (CI's .venv-cuda: the CUDA build of torch, no GPU): it imports, it is
  compiled for sm_90a, and no kernel spills registers (cuobjdump + the ptxas -v build log).
* on a GPU: each op against a float64 oracle on fresh random inputs with odd shapes (not multiples of
  the tiles: d = 37, T = 1, r = 13, ...), misaligned and strided operands (the scalar-load variants),
  bf16/fp16/fp32, every path (GEMV / tensor-core decode / cuBLAS; token splits with atomics). Every
  output element must be written: outputs are pre-filled with NaN (``out=``), workspaces too
  (``PREHAB_SVD_CUDA_NAN_WORKSPACES=1``), accumulators start at zero and are updated twice.
  Tolerances by relative Frobenius error against the oracle (fp32 1e-5, bf16/fp16 1e-2); the stable-rank
  surrogates (iterative, in fp32 whatever W's dtype) 1e-4 against float64 and 1e-5 against the torch
  backend on the same GPU (same algorithm and precision, only summation order differs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prehab_svd.ops as ops
from prehab_svd.ops import BackendUnavailableError, _cuda, reference

os.environ["PREHAB_SVD_CUDA_NAN_WORKSPACES"] = "1"  # read by the C++ side at each call

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.cuda.is_available()
# PREHAB_SVD_CUDA_JIT=1 asks for the just-in-time build (torch.utils.cpp_extension.load, minutes the
# first time, cached after) where no prehab_svd._C was built ahead of time, e.g. an install made with
# PREHAB_SVD_NO_CUDA=1 on the GPU machine: the GPU tests then run on that build instead of skipping.
JIT = os.environ.get(_cuda.JIT_ENV, "0") not in ("", "0")


def _usable_extension() -> tuple[bool, str]:
    """(usable, why not): the ahead-of-time prehab_svd._C, else (with JIT asked for) the JIT build."""
    if _cuda.extension_available():
        return True, ""
    if JIT and torch.version.cuda is not None:
        try:
            if _cuda.load(jit=True) is not None:
                return True, ""
        except Exception as e:  # reported by test_jit_request_gives_a_usable_extension, not hidden
            return False, f"{_cuda.JIT_ENV}=1 but the just-in-time build failed: {type(e).__name__}: {str(e)[-500:]}"
    return False, _cuda.status()


EXT, EXT_WHY = _usable_extension()

needs_ext = pytest.mark.skipif(not EXT, reason=f"the CUDA extension is not usable here: {EXT_WHY}")
needs_gpu = pytest.mark.skipif(
    not (GPU and EXT),
    reason="needs a CUDA GPU (none is visible)" if not GPU else f"needs the CUDA extension: {EXT_WHY}")


@pytest.mark.skipif(not (JIT and GPU), reason=f"checks a requested JIT build ({_cuda.JIT_ENV}=1) on a GPU")
def test_jit_request_gives_a_usable_extension():
    """Asked for and on a GPU, the extension must load: a failed build fails here instead of turning
    every GPU test below into a skip."""
    assert EXT, EXT_WHY
    for op in ("covariance_update", "stable_rank", "lowrank_linear"):
        assert "cuda" in ops.available_backends(op, torch.device("cuda"), torch.bfloat16)
cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU build of torch's behaviour")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SR_TOL64 = 1e-4
SR_TOL_TORCH = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def gen(*key) -> torch.Generator:
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# ---------------------------------------------------------------------------------------------
# everywhere
# ---------------------------------------------------------------------------------------------


def test_import_builds_and_loads_nothing():
    code = ("import sys, prehab_svd, prehab_svd.ops; "
            "print(any(m in sys.modules for m in ('prehab_svd._C', 'prehab_svd_cuda_jit')))")
    env = {k: v for k, v in os.environ.items() if k != _cuda.JIT_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


OP_CALLS = {
    "covariance_update": lambda b: ops.covariance_update(torch.zeros(5, 5), torch.randn(3, 5), backend=b),
    "stable_rank": lambda b: ops.stable_rank(torch.randn(4, 3), backend=b),
    "lowrank_linear": lambda b: ops.lowrank_linear(torch.randn(2, 5), torch.randn(4, 3), torch.randn(3, 5),
                                                   backend=b),
}


@pytest.mark.parametrize("op", list(OP_CALLS))
def test_cuda_backend_unavailable_is_a_clear_error(op, monkeypatch):
    """CPU tensors (or no extension): backend="cuda" names the backend and the op; auto still works."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.delenv(_cuda.JIT_ENV, raising=False)
    with pytest.raises(BackendUnavailableError, match=f"'cuda' backend of op '{op}' is not available"):
        OP_CALLS[op]("cuda")
    OP_CALLS[op]("auto")


@cpu_torch
def test_not_registered_and_status_explains_on_cpu_torch():
    for op in OP_CALLS:
        assert "cuda" not in ops.registered_backends(op)
    s = _cuda.status()
    assert s.startswith("not built: torch") and "CPU build" in s
    assert "pip install --no-build-isolation -e ." in s and "load(jit=True)" in s
    assert _cuda.load() is None and not _cuda.extension_available()


def test_kernels_command_reports_the_cuda_backend(monkeypatch, capsys):
    """`prehab-svd kernels` prints the CUDA section first (the Triton summary stays the last line) and
    passes where the extension is not built. The Triton AOT compile is stubbed (tests/test_cli.py runs
    it for real)."""
    from prehab_svd import aot, cli

    fake = [aot.AotResult("covariance", "covariance_kernel", "stub", True, shared=0, num_warps=4, wgmma=True,
                          tensor_cores=True, registers=128, spill_stores=0, spill_loads=0, load_bytes=16)]
    monkeypatch.setattr(aot, "compile_all", lambda arch=90, modules=None: fake)
    code = cli.main(["kernels"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("CUDA backend (prehab_svd._C): ")
    assert lines[-1].startswith("sm_90 (") and lines[-1].endswith(", 0 failed, 0 spill")
    if EXT:
        assert "built, loads" in lines[0] and "sm_90a" in out
        assert code == 0, out
    else:
        assert "not built" in lines[0] or "not loadable" in lines[0]
        assert code == 0, out


@cpu_torch
def test_setup_skip_line_says_how_to_build():
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not a source checkout")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    skip = [line for line in out.stdout.splitlines() if "skipping the CUDA extension" in line]
    assert len(skip) == 1, out.stdout
    assert "CPU build" in skip[0] and "pip install --no-build-isolation -e ." in skip[0]
    assert "load(jit=True)" in skip[0]


def test_sources_are_found_for_a_jit_build():
    src = _cuda.csrc_dir()
    assert src is not None
    for name in ("bindings.cpp", "prehab_svd.h", "common.cuh", "covariance.cu", "stable_rank.cu", "lowrank_linear.cu"):
        assert (src / name).is_file(), name


# ---------------------------------------------------------------------------------------------
# where the extension is built (no GPU needed)
# ---------------------------------------------------------------------------------------------

KERNELS = ("cov_tc_kernel", "cov_f32_kernel", "gemv_nt_kernel", "gemm_nt_tc_kernel", "mv_kernel", "mtv_kernel",
           "rowdot_kernel", "sr_epilogue_kernel")


@needs_ext
def test_extension_imports_with_its_constants():
    mod = _cuda.load()
    assert mod is not None
    for name in ("covariance_update", "stable_rank", "lowrank_linear", "arch_list"):
        assert callable(getattr(mod, name))
    assert mod.GEMV_MAX_T == _cuda.GEMV_MAX_T and mod.DECODE_MAX_T == _cuda.DECODE_MAX_T
    for op in OP_CALLS:
        assert "cuda" in ops.registered_backends(op)
        assert ops.registered_backends(op)[-1] == "cuda"  # lowest priority until measured faster


@needs_ext
def test_every_kernel_compiled_for_sm90a_without_spills():
    from prehab_svd import cuda_report

    so = cuda_report.so_path()
    if so is None:
        pytest.skip("the extension was built just in time, not as prehab_svd._C")
    if cuda_report.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA_HOME/bin, PATH or Triton's copy)")
    rows = cuda_report.resource_usage(so)
    names = {r.name.split("<")[0] for r in rows}
    assert set(KERNELS) <= names, names
    want = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")
    if want in ("9.0a", ""):
        assert {r.arch for r in rows} == {"sm_90a"}
    for kernel in KERNELS:
        assert any(r.arch == "sm_90a" for r in rows if r.name.startswith(kernel + "<")), kernel
    log = cuda_report._ptxas_log()
    if log is not None:
        spills = cuda_report.ptxas_spills(Path(log).read_text(errors="replace"))
        for r in rows:
            r.spill = spills.get((r.mangled, r.arch))
    bad = [(r.name, r.arch, r.spill_bound) for r in rows if r.spill_bound != 0]
    assert not bad, f"register spills: {bad}"
    text, ok = cuda_report.cuda_report()
    assert ok and "0 with spills" in text


# ---------------------------------------------------------------------------------------------
# on a GPU: correctness against float64
# ---------------------------------------------------------------------------------------------


def _cuda_tensor(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype=dtype).cuda()


# (T, d): odd d, one token, d below one tile, many tokens with few tiles (token splits, atomics)
COV_CASES = [(1, 37), (5, 64), (33, 130), (77, 8), (300, 200), (5000, 72)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("T,d", COV_CASES)
@pytest.mark.parametrize("cross", [False, True], ids=["G", "G+C"])
def test_covariance_update(T, d, dtype, cross):
    mod = _cuda.load()
    g = gen("cov", T, d, cross)
    x = _cuda_tensor(torch.randn(T, d, generator=g), dtype)
    y = _cuda_tensor(torch.randn(T, d, generator=g), dtype) if cross else None
    G = torch.zeros(d, d, device="cuda")
    C = torch.zeros(d, d, device="cuda") if cross else None
    for _ in range(2):  # accumulates: 2 xᵀx; an element never written stays 0
        mod.covariance_update(G, x, C, y)
    torch.cuda.synchronize()
    x64 = x.double()
    ref = 2 * x64.T @ x64
    assert torch.isfinite(G).all()
    assert not ((G == 0) & (ref != 0)).any(), "an element of G was not written"
    assert rel(G, ref) <= TOL[dtype]
    assert torch.equal(G, G.T) or rel(G, G.T) <= 1e-6  # the mirrored tiles are the computed ones
    if cross:
        refc = 2 * x64.T @ y.double()
        assert not ((C == 0) & (refc != 0)).any(), "an element of C was not written"
        assert rel(C, refc) <= TOL[dtype]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_covariance_strided_misaligned_and_mixed(dtype):
    """x a column slice of a wider tensor (misaligned rows: scalar loads), G and C transposed views,
    y in another dtype (promoted), through the public op."""
    T, d = 45, 70
    g = gen("cov-strided", dtype)
    wide = _cuda_tensor(torch.randn(T, d + 3, generator=g), dtype)
    x = wide[:, 1:d + 1]
    y = _cuda_tensor(torch.randn(T, d, generator=g), torch.float32)
    G = torch.zeros(d, d, device="cuda").T
    C = torch.zeros(d, d, device="cuda").T
    G0 = torch.randn(d, d, generator=g).cuda()
    G += G0
    ops.covariance_update(G, x, C, y, backend="cuda")
    x64 = x.double()
    assert rel(G - G0, x64.T @ x64) <= TOL[dtype]
    assert rel(C, x64.T @ y.double()) <= TOL[dtype]
    acc = ops.CovarianceAccumulator(d, cross=True, device="cuda", backend="cuda")
    acc.update(x.reshape(5, 9, d), y.to(dtype).reshape(5, 9, d))
    assert rel(acc.gram(), x64.T @ x64 / T) <= TOL[dtype]


def _spectrum_matrix(B, m, n, kind, g):
    """B matrices with chosen singular values: a clear gap σ₂/σ₁ = 1/2 ("stable": power iteration
    converges), or all in [0.3, 1] ("nuclear": Newton–Schulz converges)."""
    k = min(m, n)
    out = []
    for _ in range(B):
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        if kind == "stable":
            s = torch.cat([torch.tensor([2.0]), torch.rand(k - 1, generator=g, dtype=torch.float64)])
        else:
            s = 0.3 + 0.7 * torch.rand(k, generator=g, dtype=torch.float64)
        out.append(U @ torch.diag(s) @ V.T)
    return torch.stack(out)


SR_CASES = [(1, 37, 53), (3, 64, 31), (2, 130, 70), (1, 1, 9), (2, 96, 96)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,m,n", SR_CASES)
@pytest.mark.parametrize("kind", ["stable", "nuclear"])
@pytest.mark.parametrize("whiten", ["none", "shared", "batched"])
def test_stable_rank(kind, B, m, n, dtype, whiten):
    g = gen("sr", kind, B, m, n, whiten)
    if whiten == "none":
        W = _spectrum_matrix(B, m, n, kind, g)
        L = None
    else:
        # W L has the chosen spectrum: W = target · L⁻¹ with a well-conditioned triangular L
        Ls = torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(n, n, generator=g, dtype=torch.float64).tril()
        L = Ls if whiten == "shared" else torch.stack([Ls] * B)
        W = torch.linalg.solve_triangular(Ls.T, _spectrum_matrix(B, m, n, kind, g).mT, upper=True).mT
    Wc = _cuda_tensor(W, dtype)
    Lc = None if L is None else _cuda_tensor(L, dtype)
    iters = 24 if kind == "stable" else 16
    state = torch.randn(B, n, generator=g).cuda() if kind == "stable" else None
    v, gr, s = ops.stable_rank(Wc, Lc, kind=kind, state=state, iters=iters, backend="cuda")
    for t in (v, gr, s) if kind == "stable" else (v, gr):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert gr.shape == (B, m, n) and v.shape == (B,)
    # float64 oracle from the same (rounded) inputs and the same start vector
    v64, g64, s64 = reference.stable_rank(Wc.double(), None if Lc is None else Lc.double(), kind,
                                          None if state is None else state.double(), iters)
    assert rel(v, v64) <= SR_TOL64, (v, v64)
    assert rel(gr, g64) <= SR_TOL64
    if kind == "stable":
        assert rel(s, s64) <= SR_TOL64
    # the torch backend on the same GPU: same algorithm, same precision
    vt, gt, st = ops.stable_rank(Wc, Lc, kind=kind, state=state, iters=iters, backend="torch")
    assert rel(v, vt) <= SR_TOL_TORCH and rel(gr, gt) <= SR_TOL_TORCH


@needs_gpu
def test_stable_rank_defaults_cold_start_and_zero_matrix():
    g = gen("sr-defaults")
    W = _spectrum_matrix(2, 50, 40, "stable", g).float().cuda()
    v, gr, s = ops.stable_rank(W, backend="cuda")  # cold start: the reference's seeded vector
    vt, gt, st = ops.stable_rank(W, backend="torch")
    assert rel(v, vt) <= SR_TOL_TORCH and rel(gr, gt) <= SR_TOL_TORCH and rel(s, st) <= SR_TOL_TORCH
    v2, _, _ = ops.stable_rank(W, state=s, backend="cuda")  # warm (4 steps)
    assert rel(v2, v) <= 1e-4
    for kind in ("stable", "nuclear"):
        z = torch.zeros(2, 7, 5, device="cuda")
        vz, gz, _ = ops.stable_rank(z, kind=kind, backend="cuda")
        assert (vz == 0).all() and (gz == 0).all()
    Wr = W.clone().requires_grad_()
    val, _ = ops.stable_rank_loss(Wr, backend="cuda")
    val.sum().backward()
    assert rel(Wr.grad, gt) <= SR_TOL_TORCH


# (in, out, r): odd, aligned, mixed; long `in` (split over K with fp32 atomics into z), aligned and odd
LR_SHAPES = [(37, 29, 13), (256, 96, 64), (64, 130, 24), (2056, 72, 40), (2051, 33, 17)]
LR_TOKENS = [1, 3, 8, 9, 17, 64, 65, 200]


def _lr_inputs(T, K, N, R, dtype, bias, key):
    g = gen("lr", T, K, N, R, bias, key)
    x = _cuda_tensor(torch.randn(T, K, generator=g), dtype)
    V = _cuda_tensor(torch.randn(R, K, generator=g) / K ** 0.5, dtype)
    U = _cuda_tensor(torch.randn(N, R, generator=g) / R ** 0.5, dtype)
    b = _cuda_tensor(torch.randn(N, generator=g), dtype) if bias else None
    return x, U, V, b


def _lr_oracle(x, U, V, b):
    y = (x.double() @ V.double().T) @ U.double().T
    return y if b is None else y + b.double()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("K,N,R", LR_SHAPES)
@pytest.mark.parametrize("T", LR_TOKENS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lowrank_linear_every_path(T, K, N, R, dtype, bias):
    mod = _cuda.load()
    x, U, V, b = _lr_inputs(T, K, N, R, dtype, bias, "paths")
    ref = _lr_oracle(x, U, V, b)
    paths = ["auto", "cublas"]
    if T <= mod.GEMV_MAX_T:
        paths.append("gemv")
    if dtype != torch.float32:
        paths.append("tensor_core")
    for path in paths:
        out = torch.full((T, N), float("nan"), dtype=dtype, device="cuda")
        y = mod.lowrank_linear(x, U, V, b, mod.PATHS[path], out)
        assert y.data_ptr() == out.data_ptr()
        assert torch.isfinite(out).all(), f"{path}: an output element was not written"
        err = rel(out, ref)
        assert err <= TOL[dtype], f"{path}: relative error {err:.2e}"


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_lowrank_linear_op_strided_and_autograd(dtype):
    """Through the public op: 3-D x, a misaligned column slice of U (scalar loads), and gradients."""
    K, N, R = 48, 40, 16
    g = gen("lr-op", dtype)
    x = _cuda_tensor(torch.randn(2, 3, K, generator=g), dtype)
    Uw = _cuda_tensor(torch.randn(N, R + 1, generator=g) / R ** 0.5, dtype)
    U = Uw[:, 1:]
    V = _cuda_tensor(torch.randn(R, K, generator=g) / K ** 0.5, dtype)
    b = _cuda_tensor(torch.randn(N, generator=g), dtype)
    y = ops.lowrank_linear(x, U, V, b, backend="cuda")
    assert y.shape == (2, 3, N) and y.dtype == dtype
    assert rel(y.reshape(-1, N), _lr_oracle(x.reshape(-1, K), U, V, b)) <= TOL[dtype]
    xs, Us, Vs = (t.detach().clone().requires_grad_() for t in (x, U, V))
    ops.lowrank_linear(xs, Us, Vs, b, backend="cuda").sum().backward()
    xr, Ur, Vr = (t.detach().clone().requires_grad_() for t in (x, U, V))
    ops.lowrank_linear(xr, Ur, Vr, b, backend="torch").sum().backward()
    for a, r in ((xs, xr), (Us, Ur), (Vs, Vr)):
        assert rel(a.grad, r.grad) <= TOL[dtype]


def _padded_cuda(rows, cols, dtype, g, scale=1.0):
    """[rows, cols] as LowRankLinear stores a factor: a view of a [rows, cols16] buffer, padding NaN
    (a kernel that reads past column `cols` poisons its output)."""
    buf = torch.full((rows, -(-cols // 16) * 16), float("nan"))
    buf[:, :cols] = torch.randn(rows, cols, generator=g) * scale
    return _cuda_tensor(buf, dtype)[:, :cols]


# ranks that are not multiples of 8 or 16 (LLaMA-7B's 819, 1228 at small widths), one that is
LR_RAGGED = [(64, 48, 13), (1024, 96, 819), (520, 40, 1228), (256, 64, 48)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("K,N,R", LR_RAGGED)
@pytest.mark.parametrize("T", [1, 5, 16, 40, 100])
def test_lowrank_linear_ragged_rank_padded_factors(T, K, N, R, dtype):
    """Padded factors (16-aligned row strides, NaN padding) at ragged ranks: every path takes its
    16-byte vector loads (rows aligned) and finishes the last r mod 8 columns element by element;
    nothing past column r is read (the NaN would reach y), z's padded rows are never read past r."""
    mod = _cuda.load()
    g = gen("lr-ragged", T, K, N, R, dtype)
    x = _padded_cuda(T, K, dtype, g)
    V = _padded_cuda(R, K, dtype, g, K ** -0.5)
    U = _padded_cuda(N, R, dtype, g, R ** -0.5)
    b = _cuda_tensor(torch.randn(N, generator=g), dtype)
    ref = _lr_oracle(x, U, V, b)
    paths = ["auto", "cublas"] + (["gemv"] if T <= mod.GEMV_MAX_T else []) + \
        (["tensor_core"] if dtype != torch.float32 else [])
    for path in paths:
        out = torch.full((T, N), float("nan"), dtype=dtype, device="cuda")
        mod.lowrank_linear(x, U, V, b, mod.PATHS[path], out)
        assert torch.isfinite(out).all(), f"{path}: an output element was not written, or padding was read"
        assert rel(out, ref) <= TOL[dtype], f"{path}: relative error {rel(out, ref):.2e}"


@needs_gpu
def test_lowrank_layer_on_cuda_backend_is_padded_and_right():
    from prehab_svd import LowRankLinear

    torch.manual_seed(0)
    layer = LowRankLinear(96, 80, 819 % 96, backend="cuda").to("cuda", torch.bfloat16)
    assert layer.U.stride(0) % 16 == 0 and layer.U.stride(0) != layer.rank
    for T in (1, 7, 33, 200):
        x = torch.randn(T, 96, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
        assert rel(y, _lr_oracle(x, layer.U, layer.V, layer.bias)) <= TOL[torch.bfloat16]
