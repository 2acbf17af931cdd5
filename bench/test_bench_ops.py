"""Benchmarks of the three ops: every registered backend against the strongest plain-torch baseline
(and, for lowrank_linear, the dense nn.Linear of the same shape), one pytest-benchmark group per
shape so they print side by side.

CPU: small shapes in fp32 (1024x1024 and 2752x1024, the LLaMA-7B ratios scaled down).
CUDA: LLaMA-7B shapes (4096x4096, 11008x4096, 4096x11008) in bf16.
keep_ratio is the fraction of the layer's parameters kept: rank r = floor(keep · m·n / (m+n)).

Baselines (the strongest plain torch in the same precision, bench/ratios.py builds them): lowrank
``F.linear(F.linear(x, V), U, b)`` and the dense layer; covariance the 16-bit product with an fp32
result (``torch.addmm``/``torch.mm`` with ``out_dtype=float32`` on CUDA; the implementation used is in
each case's ``extra_info["impl"]``), never an fp32 upcast (an SGEMM, ~10x slower); stable rank with W
and L in the weights' dtype against the same algorithm in plain torch. ``python bench/ratios.py`` prints
the same comparisons as ratios with errors against float64, eager and under CUDA graphs.

See bench/conftest.py for how to run and what is reported.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import prehab_svd.ops as ops
from prehab_svd.ops import reference

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # bench/ is not installed: import its helpers from the checkout
    sys.path.insert(0, _ROOT)
from bench.ratios import covariance_baseline, n_sets, stable_rank_baseline  # noqa: E402


def _device() -> torch.device:  # same rule as conftest.bench_device (not imported: name clash with tests/)
    forced = os.environ.get("PREHAB_BENCH_DEVICE")
    return torch.device(forced or ("cuda" if torch.cuda.is_available() else "cpu"))


DEVICE = _device()
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ELT = torch.empty((), dtype=DTYPE).element_size()

# (out_features m, in_features n) of W [m, n]
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)] if ON_GPU else [(1024, 1024), (2752, 1024)]
KEEPS = [0.4, 0.6, 0.8]
TOKENS = [1, 16, 128, 2048, 8192] if ON_GPU else [1, 16, 128]
COV_DIMS = [4096, 11008] if ON_GPU else [1024]
COV_TOKENS = [2048, 8192] if ON_GPU else [128, 1024]


def rank_for(m: int, n: int, keep: float) -> int:
    return max(1, math.floor(keep * m * n / (m + n)))


def shape_id(s):
    return f"{s[0]}x{s[1]}"


def _backends(op: str) -> list[str]:
    return ops.registered_backends(op)


def _require(op: str, backend: str, dtype: torch.dtype) -> None:
    if backend not in ops.available_backends(op, DEVICE, dtype):
        pytest.skip(f"backend {backend!r} of {op} cannot run {DEVICE.type}/{dtype} here")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# =============================================================================================
# lowrank_linear (inference)
# =============================================================================================
LR_VARIANTS = [f"backend:{b}" for b in _backends("lowrank_linear")] + ["baseline", "dense"]


@pytest.mark.parametrize("variant", LR_VARIANTS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_lowrank_linear(timed, shape, keep, tokens, variant):
    """On a GPU the calls rotate among enough weight sets to exceed 3x the L2 cache (a 4096² layer's
    factors at keep 0.4 are 13 MB, its dense weight 32 MB: both would otherwise be timed from L2)."""
    m, n = shape  # out, in
    r = rank_for(m, n, keep)
    g = _gen()
    dense = variant == "dense"
    flops = 2 * tokens * r * (m + n)
    nbytes = ELT * (tokens * n + r * n + m * r + tokens * m + m)
    if dense:
        flops = 2 * tokens * m * n
        nbytes = ELT * (tokens * n + m * n + tokens * m + m)
    sets = []
    for _ in range(n_sets(nbytes, DEVICE)):
        x = torch.randn(tokens, n, device=DEVICE, dtype=DTYPE, generator=g)
        b = torch.randn(m, device=DEVICE, dtype=DTYPE, generator=g)
        if dense:
            W = torch.randn(m, n, device=DEVICE, dtype=DTYPE, generator=g) * n**-0.5
            sets.append((x, W, b))
        else:
            U = torch.randn(m, r, device=DEVICE, dtype=DTYPE, generator=g) * r**-0.5
            V = torch.randn(r, n, device=DEVICE, dtype=DTYPE, generator=g) * n**-0.5
            sets.append((x, U, V, b))
    turn = itertools.cycle(sets)
    if variant.startswith("backend:"):
        backend = variant.split(":", 1)[1]
        _require("lowrank_linear", backend, DTYPE)
        fn = lambda: ops.lowrank_linear(*next(turn), backend=backend)  # noqa: E731
    elif variant == "baseline":  # two F.linear calls: the intermediate goes through memory
        def fn():
            x, U, V, b = next(turn)
            return F.linear(F.linear(x, V), U, b)
        nbytes += 2 * ELT * tokens * r
    else:  # the dense layer this replaces
        fn = lambda: F.linear(*next(turn))  # noqa: E731
    with torch.inference_mode():
        y = timed(
            fn,
            group=f"lowrank_linear {m}x{n} keep={keep} T={tokens}",
            op="lowrank_linear", variant=variant, m=m, n=n, rank=r, keep=keep, tokens=tokens,
            dtype=str(DTYPE), flops=flops, bytes=nbytes, weight_sets=len(sets),
        )
    assert y.shape == (tokens, m)


# =============================================================================================
# covariance_update (calibration)
# =============================================================================================
COV_VARIANTS = [f"backend:{b}" for b in _backends("covariance_update")] + ["baseline"]


@pytest.mark.parametrize("variant", COV_VARIANTS)
@pytest.mark.parametrize("cross", [False, True], ids=["gram", "gram+cross"])
@pytest.mark.parametrize("tokens", COV_TOKENS)
@pytest.mark.parametrize("d", COV_DIMS)
def test_covariance_update(timed, d, tokens, cross, variant):
    g = _gen()
    x = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE, generator=g)
    y = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE, generator=g) if cross else None
    G = torch.zeros(d, d, device=DEVICE, dtype=torch.float32)
    C = torch.zeros(d, d, device=DEVICE, dtype=torch.float32) if cross else None
    streams = 2 if cross else 1
    flops = 2 * tokens * d * d * streams
    nbytes = streams * (ELT * tokens * d + 2 * 4 * d * d)  # read x (and y), read+write G (and C)
    impl = None
    if variant.startswith("backend:"):
        backend = variant.split(":", 1)[1]
        _require("covariance_update", backend, DTYPE)
        fn = lambda: ops.covariance_update(G, x, C, y, backend=backend)  # noqa: E731
    else:  # the strongest plain torch: the product in x's dtype with an fp32 result (out_dtype on CUDA)
        impl, base = covariance_baseline(DEVICE, DTYPE)
        fn = lambda: base(G, x, C, y)  # noqa: E731

    with torch.inference_mode():
        timed(
            fn,
            group=f"covariance_update d={d} T={tokens} {'gram+cross' if cross else 'gram'}",
            op="covariance_update", variant=variant, d=d, tokens=tokens, cross=cross,
            dtype=str(DTYPE), flops=flops, bytes=nbytes, impl=impl,
        )
    assert torch.isfinite(G[0, 0])


# =============================================================================================
# stable rank (the Prehab regularizer, once per training step and layer)
# =============================================================================================


def _svd_baseline(W, L, kind):
    """Exact value and gradient from a full SVD of M = W L (the exact answer, not the same algorithm)."""
    M = W.float() @ L.float()
    Us, S, Vh = torch.linalg.svd(M, full_matrices=False)
    f2 = M.square().sum()
    if kind == "stable":
        s1 = S[0]
        value = f2 / s1**2
        gM = 2 * M / s1**2 - (2 * f2 / s1**3) * torch.outer(Us[:, 0], Vh[0])
    else:
        nuc = S.sum()
        value = nuc**2 / f2
        gM = (2 * nuc / f2) * (Us @ Vh) - (2 * nuc**2 / f2**2) * M
    return value, gM @ L.float().T


def _stable_rank_flops(m, n, kind, iters):
    flops = 2 * 2 * m * n * n  # M = W L and grad_M Lᵀ
    if kind == "stable":
        return flops + iters * 4 * m * n + 8 * m * n
    k, l = min(m, n), max(m, n)
    n_cubic = min(6, iters // 2)
    n_quintic = iters - n_cubic
    return flops + n_quintic * (4 * k * k * l + 2 * k**3) + n_cubic * 4 * k * k * l + 8 * m * n


SR_MODES = ("warm", "cold")
SR_CASES = [("stable", f"{b}:{mode}") for b in _backends("stable_rank") for mode in SR_MODES]
SR_CASES += [("stable", f"baseline:{mode}") for mode in SR_MODES] + [("stable", "baseline:svd")]
SR_CASES += [("nuclear", f"{b}") for b in _backends("stable_rank")]
SR_CASES += [("nuclear", "baseline"), ("nuclear", "baseline:svd")]


@pytest.mark.parametrize("kind,variant", SR_CASES, ids=[f"{k}-{v}" for k, v in SR_CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_stable_rank(timed, shape, kind, variant):
    """W and L in the weights' dtype (bf16 on the GPU: the kernels' 16-bit product path, not their
    TF32 path for an fp32 L). ``baseline`` is the same algorithm in the same precision in plain torch
    (bench/ratios.py: 16-bit M = W L with an fp32 result, TF32 for the rest); ``baseline:svd`` the
    exact value and gradient from a full SVD; the ``torch`` backend is the fp32 reference."""
    m, n = shape
    g = _gen()
    W = (torch.randn(m, n, device=DEVICE, dtype=torch.float32, generator=g) * n**-0.5).to(DTYPE)
    L = torch.tril(torch.randn(n, n, device=DEVICE, generator=g) * (0.3 / n**0.5), -1)
    L += torch.diag(torch.rand(n, device=DEVICE, generator=g) + 0.5)
    L = L.to(DTYPE)
    L32 = L.float()
    nbytes = ELT * (m * n + n * n) + 4 * m * n  # read W, L; write the fp32 gradient
    impl = None
    if variant == "baseline:svd":
        fn = lambda: _svd_baseline(W, L, kind)  # noqa: E731
        flops = None  # an SVD's work is not a fixed count; compare times
    elif variant.startswith("baseline"):
        mode = variant.partition(":")[2]
        impl, base = stable_rank_baseline(DEVICE, DTYPE)
        state = None
        if mode == "warm":
            state = ops.stable_rank(W, L, backend="torch")[2].unsqueeze(0)
        iters = (
            reference.NUCLEAR_ITERS
            if kind == "nuclear"
            else (reference.STABLE_ITERS_WARM if state is not None else reference.STABLE_ITERS_COLD)
        )
        fn = lambda: base(W.unsqueeze(0), L, L32, kind, state, iters)  # noqa: E731
        flops = _stable_rank_flops(m, n, kind, iters)
    else:
        backend, _, mode = variant.partition(":")
        _require("stable_rank", backend, DTYPE)
        state = None
        if mode == "warm":  # a training step: warm-started from the previous step's vector
            state = ops.stable_rank(W, L, backend=backend)[2]
        iters = (
            reference.NUCLEAR_ITERS
            if kind == "nuclear"
            else (reference.STABLE_ITERS_WARM if state is not None else reference.STABLE_ITERS_COLD)
        )
        fn = lambda: ops.stable_rank(W, L, kind=kind, state=state, backend=backend)  # noqa: E731
        flops = _stable_rank_flops(m, n, kind, iters)
    value, grad = timed(
        fn,
        group=f"stable_rank {kind} {m}x{n} whitened",
        op="stable_rank", variant=variant, kind=kind, m=m, n=n, dtype=str(DTYPE), flops=flops, bytes=nbytes,
        impl=impl,
    )[:2]
    assert torch.isfinite(value).all() and grad.shape[-2:] == (m, n)
