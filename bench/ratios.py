"""Speed ratios of the three ops' backends against the strongest plain-torch path, with each one's
relative error against float64, in one run (eager and CUDA graphs).

    python bench/ratios.py --sizes 7b --json ratios.json --md ratios.md     # the lent H100/H200
    python bench/ratios.py --sizes tiny --device cpu                        # seconds, any machine
    python bench/ratios.py --render ratios.json                             # the table of a (partial) run

What is compared, per op (``ratio`` = baseline seconds / variant seconds: above 1 is faster than the
baseline; nothing is asserted, the numbers are reported):

* ``lowrank_linear`` y = (x Vᵀ) Uᵀ + b at rank r = ``prehab_svd.models.rank_for(m, n, keep)``:
  baseline ``F.linear(F.linear(x, V), U, b)`` (cuBLAS(Lt) with the bias in the epilogue), and the dense
  layer ``F.linear(x, W, b)`` it replaces (``vs dense`` = dense seconds / variant seconds).
* ``covariance_update`` G += xᵀx (and C += xᵀy): baseline the product in the input dtype with an fp32
  result, ``torch.addmm(G, x.T, x, out_dtype=float32, out=G)`` or, where that overload refuses,
  ``G.add_(torch.mm(x.T, x, out_dtype=float32))`` (bf16 tensor cores, fp32 accumulation: the same
  precision as the kernels). The first form that gives the right answer on this device is used and
  named in the output (``baselines``). Where ``out_dtype`` does not exist (CPU) 16-bit x is upcast.
* ``stable_rank`` value and gradient of the rank surrogate of M = W L, W and L in the weights' dtype:
  baseline the same algorithm in the same precision as the kernels, in plain torch: M = W L as a
  16-bit product with an fp32 result (``out_dtype``), the power iteration / Newton–Schulz steps of
  :func:`prehab_svd.ops.reference.stable_rank` in fp32 with TF32 matmuls, grad = grad_M Lᵀ in TF32.
  The ``torch`` backend row is the library's reference (fp32 upcast, full-fp32 products).

Inputs are fresh random data (never zeros); each case rotates among enough input sets to exceed 3x
the L2 cache, so a memory-bound case is not timed from the cache. Times are medians of CUDA-event
(or host-clock) samples after warm-up; ``graph`` replays a CUDA graph that holds one call per input
set. Errors: ‖out − ref‖/‖ref‖ against the same computation in float64 (for stable_rank, the value and
the gradient from the same start vector; the larger is reported).

The JSON is rewritten after every case, so a run stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `prehab_svd` importable from the tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCHEMA = 1
OPS = ("lowrank_linear", "covariance_update", "stable_rank")

# (lowrank layer shapes (m out, n in), keeps, tokens, covariance widths, covariance tokens,
#  stable-rank batches (B, m, n))
SIZES = {
    # LLaMA-7B: q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008; batch-1 decode and a 4096-token
    # prefill; calibration batches of 8192 tokens; one block's same-shape matrices stacked
    "7b": dict(lr_shapes=[(4096, 4096), (11008, 4096), (4096, 11008)], keeps=[0.4, 0.6, 0.8],
               tokens=[1, 4096], cov_d=[4096, 11008], cov_tokens=[8192],
               sr_shapes=[(4, 4096, 4096), (2, 11008, 4096), (1, 4096, 11008)]),
    "small": dict(lr_shapes=[(512, 512), (1376, 512)], keeps=[0.4, 0.8], tokens=[1, 128],
                  cov_d=[512], cov_tokens=[1024], sr_shapes=[(2, 256, 256)]),
    # odd shapes (no multiple of a tile), seconds on a CPU: the smoke test
    "tiny": dict(lr_shapes=[(37, 29), (80, 48)], keeps=[0.4, 0.8], tokens=[1, 9], cov_d=[37],
                 cov_tokens=[101], sr_shapes=[(2, 37, 23), (1, 20, 45)]),
}
SR_KINDS = ("stable-warm", "stable-cold", "nuclear")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Median seconds of one call of ``step`` (which makes ``calls`` calls) after warm-up.

    Each sample repeats ``step`` enough times to last about ``sample_s``; ``samples`` samples, fewer
    when one step alone is slower than the measurement's share ``target_s``.
    """

    def __init__(self, device: torch.device, target_s: float, samples: int):
        self.device, self.target_s, self.samples = device, target_s, samples

    def _clock(self, fn, inner: int) -> float:
        if self.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return time.perf_counter() - t0

    def __call__(self, step, calls: int) -> dict:
        step()  # warm-up: compilation, handles, allocator
        _sync(self.device)
        one = max(self._clock(step, 1), 1e-7)
        samples = max(3, min(self.samples, int(self.target_s / one)))
        inner = max(1, min(1000, int(self.target_s / samples / one)))
        times = [self._clock(step, inner) / inner / calls for _ in range(samples)]
        return {"seconds": statistics.median(times), "samples": samples, "inner": inner,
                "spread": (max(times) - min(times)) / statistics.median(times)}


def graph_step(step, device: torch.device):
    """A CUDA graph of ``step`` (captured after warm-up on a side stream); returns its replay."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    _sync(device)
    return g.replay, g


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20)
    return 32 << 20


def n_sets(set_bytes: int, device: torch.device, cap: int = 16) -> int:
    """Input sets to rotate among so that they exceed 3x the L2 cache (1 on a CPU: no rotation)."""
    if device.type != "cuda":
        return 1
    return max(1, min(cap, math.ceil(3 * l2_bytes(device) / max(set_bytes, 1))))


# ---------------------------------------------------------------------------------------------
# the strongest plain-torch baselines
# ---------------------------------------------------------------------------------------------


def _probe(fn) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False


def covariance_baseline(device: torch.device, dtype: torch.dtype):
    """(name, fn(G, x, C, y)) of the fastest correct plain-torch ``G += xᵀx`` (``C += xᵀy``) here."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(19, 13, generator=g).to(device, dtype)
    G0 = torch.randn(13, 13, generator=g).to(device)
    ref = G0.double() + x.double().T @ x.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2

    def ok(fn):
        G = G0.clone()
        fn(G, x, G.clone().zero_(), x)
        return rel(G, ref) <= tol

    cands = []
    if dtype == torch.float32:
        cands.append(("G.addmm_(x.T, x)", lambda G, x, C, y: (G.addmm_(x.T, x),
                                                              C is not None and C.addmm_(x.T, y))))
    else:
        f32 = torch.float32
        cands.append(("torch.addmm(G, x.T, x, out_dtype=float32, out=G)",
                      lambda G, x, C, y: (torch.addmm(G, x.T, x, out_dtype=f32, out=G),
                                          C is not None and torch.addmm(C, x.T, y, out_dtype=f32, out=C))))
        cands.append(("G.add_(torch.mm(x.T, x, out_dtype=float32))",
                      lambda G, x, C, y: (G.add_(torch.mm(x.T, x, out_dtype=f32)),
                                          C is not None and C.add_(torch.mm(x.T, y, out_dtype=f32)))))
        cands.append(("upcast: G.addmm_(x.float().T, x.float())  [no out_dtype here]",
                      lambda G, x, C, y: (G.addmm_(x.float().T, x.float()),
                                          C is not None and C.addmm_(x.float().T, y.float()))))
    for name, fn in cands:
        if _probe(lambda: ok(fn)):
            return name, fn
    raise RuntimeError("no plain-torch covariance baseline works here")


def product_f32(device: torch.device, dtype: torch.dtype):
    """(name, fn(A [B, m, k], Bm [k, n] or [B, k, n]) -> fp32 [B, m, n]): a 16-bit product with an fp32
    result where ``out_dtype`` exists, else an upcast product."""
    f32 = torch.float32

    def native(A, Bm):
        if Bm.dim() == 2:
            Bt, m, k = A.shape
            return torch.mm(A.reshape(Bt * m, k), Bm, out_dtype=f32).view(Bt, m, Bm.shape[1])
        return torch.bmm(A, Bm, out_dtype=f32)

    def upcast(A, Bm):
        return torch.matmul(A.float(), Bm.float())

    if dtype != torch.float32:
        g = torch.Generator().manual_seed(2)
        A = torch.randn(2, 5, 7, generator=g).to(device, dtype)
        Bm = torch.randn(7, 3, generator=g).to(device, dtype)
        if _probe(lambda: rel(native(A, Bm), A.double() @ Bm.double()) < 1e-2
                  and rel(native(A, Bm.expand(2, 7, 3).contiguous()), A.double() @ Bm.double()) < 1e-2):
            return "torch.mm/bmm(out_dtype=float32)", native
    return "upcast to float32", upcast


class _TF32:
    """TF32 matmuls inside (torch's public switch), restored after."""

    def __enter__(self):
        self.prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.prev)


def stable_rank_baseline(device: torch.device, dtype: torch.dtype):
    """fn(W, L, L32, kind, state, iters) -> (value, grad): the reference's algorithm in the kernels'
    precision, plain torch (see the module docstring)."""
    from prehab_svd.ops import reference

    name, prod = product_f32(device, dtype)
    tf32 = device.type == "cuda"

    def fn(W, L, L32, kind, state, iters):
        M = prod(W, L)
        if tf32:
            with _TF32():
                value, gM, _ = reference.stable_rank(M, None, kind, state, iters)
                grad = torch.matmul(gM, L32.mT)
        else:
            value, gM, _ = reference.stable_rank(M, None, kind, state, iters)
            grad = torch.matmul(gM, L32.mT)
        return value, grad

    return f"M = W L by {name}; reference iteration in fp32{' with TF32 matmuls' if tf32 else ''}", fn


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


class ContextLost(RuntimeError):
    pass


class Run:
    def __init__(self, args):
        from bench.scale import common

        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        default = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = DTYPES[args.dtype or default]
        self.modes = [m for m in args.modes if m != "graph" or self.device.type == "cuda"]
        self.timer = Timer(self.device, args.target_s, args.samples)
        self.t_end = None if args.budget_s is None else time.monotonic() + args.budget_s
        self.gen = torch.Generator(device=self.device).manual_seed(args.seed)  # inputs drawn where they live
        self.result = {
            "kind": "ratios", "schema": SCHEMA, "env": common.environment(str(self.device)),
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "sizes": args.sizes, "modes": self.modes, "args": {k: v for k, v in vars(args).items()
                                                               if k not in ("render",)},
            "baselines": {}, "backends": {}, "rows": [], "skipped": [], "errors": [], "complete": False,
        }
        if "graph" in args.modes and "graph" not in self.modes:
            self.result["skipped"].append("graph mode: CUDA graphs need a CUDA device")
        self.common = common

    # -- helpers --------------------------------------------------------------------------------
    def left(self) -> float:
        return float("inf") if self.t_end is None else self.t_end - time.monotonic()

    def randn(self, *shape, scale=1.0, dtype=None):
        t = torch.randn(*shape, generator=self.gen, device=self.device) * scale
        return t.to(dtype or self.dtype)

    def save(self):
        if self.args.json:
            self.common.write_json(self.args.json, self.result)

    def backends(self, op: str) -> list[str]:
        from prehab_svd import ops

        names = ops.available_backends(op, self.device, self.dtype)
        self.result["backends"][op] = names
        return names

    def measure(self, op, case, variant, calls_fn, err, extra=None, graph_ok=True):
        """Time ``calls_fn`` (a list of zero-argument calls, one per input set) in every mode."""
        rows = []
        for mode in self.modes:
            row = {"op": op, "case": case, "variant": variant, "mode": mode, "rel_err": err, **(extra or {})}
            if mode == "graph" and not graph_ok:
                row["na"] = "not captured: the cold start draws its vector with a fresh generator"
                rows.append(row)
                continue
            try:
                def step():
                    for c in calls_fn:
                        c()
                if mode == "graph":
                    replay, keep = graph_step(step, self.device)
                    t = self.timer(replay, len(calls_fn))
                    del keep
                else:
                    t = self.timer(step, len(calls_fn))
                row.update(t)
            except Exception as e:  # one failing variant or mode must not lose the rest
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                self.check_context(f"{op} {case} {variant} {mode}")
            rows.append(row)
        return rows

    def check_context(self, what: str) -> None:
        """After a failure: an illegal memory access poisons the CUDA context for the whole process, and
        every later measurement would fail too. Stop this op then (``--isolate`` runs each op in its own
        process, so the others still run)."""
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception as e:
            raise ContextLost(f"the CUDA context is lost after {what}: {type(e).__name__}: {str(e)[:200]}") from e

    def finish_case(self, rows, flops=None, nbytes=None):
        """Ratios against the case's baseline (and dense) in the same mode, then record."""
        by = {(r["variant"], r["mode"]): r for r in rows}
        for r in rows:
            if "seconds" not in r:
                continue
            base = by.get(("baseline", r["mode"]))
            if base and "seconds" in base:
                r["ratio"] = base["seconds"] / r["seconds"]
            dense = by.get(("dense", r["mode"]))
            if dense and "seconds" in dense and r["variant"] != "dense":
                r["vs_dense"] = dense["seconds"] / r["seconds"]
            if flops and r["variant"] != "dense":
                r["tflops"] = flops / r["seconds"] / 1e12
            if nbytes and r["variant"] != "dense":
                r["gbps"] = nbytes / r["seconds"] / 1e9
        self.result["rows"] += rows
        self.save()

    def fits(self, what: str, need_s: float = 1.0) -> bool:
        if self.left() < need_s:
            self.result["skipped"].append(f"{what}: budget")
            return False
        return True

    def call_errors(self, what, fn):
        try:
            return fn()
        except Exception as e:
            self.result["errors"].append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
            self.check_context(what)
            return None

    # -- lowrank_linear -------------------------------------------------------------------------
    def lowrank(self):
        from prehab_svd import ops
        from prehab_svd.models import rank_for

        a = self.args
        backends = self.backends("lowrank_linear")
        self.result["baselines"]["lowrank_linear"] = ("F.linear(F.linear(x, V), U, b); dense: F.linear(x, W, b)")
        elt = torch.empty((), dtype=self.dtype).element_size()
        for m, n in a.lr_shapes:
            for T in a.tokens:
                dense_rows = None
                for keep in a.keeps:
                    r = rank_for(m, n, keep)
                    case = f"{m}x{n} keep={keep} r={r} T={T}"
                    if r is None:
                        self.result["skipped"].append(f"lowrank {case}: above break-even (stays dense)")
                        continue
                    if not self.fits(f"lowrank {case}"):
                        continue
                    K = n_sets(elt * (r * (m + n) + T * (m + n)), self.device)
                    sets = [(self.randn(T, n), self.randn(m, r, scale=r ** -0.5), self.randn(r, n, scale=n ** -0.5),
                             self.randn(m)) for _ in range(K)]
                    x, U, V, b = sets[0]
                    ref = (x.double() @ V.double().T) @ U.double().T + b.double()
                    rows = []
                    with torch.inference_mode():
                        base = [lambda s=s: F.linear(F.linear(s[0], s[2]), s[1], s[3]) for s in sets]
                        rows += self.measure("lowrank_linear", case, "baseline", base, rel(base[0](), ref))
                        for be in backends:
                            calls = [lambda s=s, be=be: ops.lowrank_linear(*s, backend=be) for s in sets]
                            err = self.call_errors(f"lowrank {case} {be}", lambda: rel(calls[0](), ref))
                            rows += self.measure("lowrank_linear", case, be, calls, err)
                        if dense_rows is None:  # the dense layer once per shape and token count
                            Kd = n_sets(elt * (m * n + T * (m + n)), self.device)
                            dsets = [(self.randn(T, n), self.randn(m, n, scale=n ** -0.5), self.randn(m))
                                     for _ in range(Kd)]
                            dref = dsets[0][0].double() @ dsets[0][1].double().T + dsets[0][2].double()
                            dcalls = [lambda s=s: F.linear(*s) for s in dsets]
                            dense_rows = self.measure("lowrank_linear", case, "dense", dcalls, rel(dcalls[0](), dref))
                            dsets = dcalls = None
                        rows += [dict(d, case=case) for d in dense_rows]
                    flops = 2 * T * r * (m + n)
                    nbytes = elt * (T * n + r * (m + n) + T * m + m)
                    self.finish_case(rows, flops, nbytes)
                    sets = ref = None  # free before the next case
                self.common.free_device_memory()

    # -- covariance_update ----------------------------------------------------------------------
    def covariance(self):
        from prehab_svd import ops

        a = self.args
        backends = self.backends("covariance_update")
        name, base_fn = covariance_baseline(self.device, self.dtype)
        self.result["baselines"]["covariance_update"] = name
        elt = torch.empty((), dtype=self.dtype).element_size()
        for d in a.cov_d:
            for T in a.cov_tokens:
                for cross in (False, True):
                    case = f"d={d} T={T} {'G+C' if cross else 'G'}"
                    if not self.fits(f"covariance {case}"):
                        continue
                    streams = 2 if cross else 1
                    K = n_sets(streams * (elt * T * d + 4 * d * d), self.device, cap=4)
                    sets = [(self.randn(T, d), self.randn(T, d) if cross else None) for _ in range(K)]
                    acc = [(torch.zeros(d, d, device=self.device), torch.zeros(d, d, device=self.device)
                            if cross else None) for _ in range(K)]
                    x64 = sets[0][0].double()
                    refG = x64.T @ x64
                    refC = x64.T @ sets[0][1].double() if cross else None
                    del x64

                    def err_of(call):
                        G, C = acc[0]
                        G.zero_()
                        if C is not None:
                            C.zero_()
                        call()
                        e = rel(G, refG)
                        return max(e, rel(C, refC)) if cross else e

                    rows = []
                    with torch.inference_mode():
                        base = [lambda s=s, g=g: base_fn(g[0], s[0], g[1], s[1]) for s, g in zip(sets, acc)]
                        rows += self.measure("covariance_update", case, "baseline", base, err_of(base[0]))
                        for be in backends:
                            calls = [lambda s=s, g=g, be=be: ops.covariance_update(g[0], s[0], g[1], s[1], backend=be)
                                     for s, g in zip(sets, acc)]
                            err = self.call_errors(f"covariance {case} {be}", lambda: err_of(calls[0]))
                            rows += self.measure("covariance_update", case, be, calls, err)
                    flops = 2 * T * d * d * streams
                    nbytes = streams * (elt * T * d + 2 * 4 * d * d)
                    self.finish_case(rows, flops, nbytes)
                    sets = acc = refG = refC = None
                    self.common.free_device_memory()

    # -- stable_rank ----------------------------------------------------------------------------
    def stable_rank(self):
        from prehab_svd import ops
        from prehab_svd.ops import reference

        a = self.args
        backends = self.backends("stable_rank")
        name, base_fn = stable_rank_baseline(self.device, self.dtype)
        self.result["baselines"]["stable_rank"] = name
        elt = torch.empty((), dtype=self.dtype).element_size()
        for B, m, n in a.sr_shapes:
            if not self.fits(f"stable_rank {B}x{m}x{n}", 3.0):
                continue
            K = n_sets(elt * B * m * n + 4 * B * m * n, self.device, cap=4)
            # W with a decaying spectrum (a gap for the power iteration), L a well-conditioned lower
            # triangle (a Cholesky factor of a covariance), both in the weights' dtype; L shared by the
            # batch, as q/k/v (and gate/up) share their input's covariance
            Ws = [self.randn(B, m, n, scale=n ** -0.5) for _ in range(K)]
            L32 = torch.eye(n, device=self.device) + self.randn(n, n, dtype=torch.float32).tril(-1) * (0.3 / n ** 0.5)
            L = L32.to(self.dtype)
            L32 = L.float()  # the same rounded factor for every variant and the oracle
            with torch.no_grad():
                state0 = reference.stable_rank(Ws[0].float(), L32, "stable", None, 6)[2]  # a previous step's vector
            for kind in a.sr_kinds:
                case = f"{kind} B={B} {m}x{n}"
                if not self.fits(f"stable_rank {case}", 2.0):
                    continue
                k = "nuclear" if kind == "nuclear" else "stable"
                state = state0 if kind == "stable-warm" else None
                iters = {"stable-warm": reference.STABLE_ITERS_WARM, "stable-cold": reference.STABLE_ITERS_COLD,
                         "nuclear": reference.NUCLEAR_ITERS}[kind]
                # the oracle starts from the same vector: the reference's fixed-seed fp32 draw when cold
                start = state if k != "stable" or state is not None else \
                    reference.power_start(None, B, n, self.device, torch.float32, iters)[0]
                with torch.no_grad():
                    v64, g64, _ = reference.stable_rank(Ws[0].double(), L32.double(), k,
                                                        None if start is None else start.double(), iters)

                def err_of(out):
                    return max(rel(out[0], v64), rel(out[1], g64))

                rows = []
                with torch.no_grad():
                    # a cold start draws its vector from a new generator each call: not capturable
                    graph_ok = kind != "stable-cold"
                    base = [lambda W=W: base_fn(W, L, L32, k, state, iters) for W in Ws]
                    rows += self.measure("stable_rank", case, "baseline", base, err_of(base[0]()), graph_ok=graph_ok)
                    for be in backends:
                        calls = [lambda W=W, be=be: ops.stable_rank(W, L, kind=k, state=state, iters=iters, backend=be)
                                 for W in Ws]
                        err = self.call_errors(f"stable_rank {case} {be}", lambda: err_of(calls[0]()))
                        rows += self.measure("stable_rank", case, be, calls, err, graph_ok=graph_ok)
                self.finish_case(rows)
            Ws = L = L32 = None
            self.common.free_device_memory()

    def run(self):
        try:  # the device's measured ceilings, for reading the rows' TFLOP/s and GB/s
            from prehab_svd.profiling import measure_peaks

            self.result["peaks"] = measure_peaks(self.device, self.dtype if self.device.type == "cuda" else None)
        except Exception as e:
            self.result["errors"].append(f"peaks: {type(e).__name__}: {str(e)[:200]}")
        for i, op in enumerate(self.args.ops):
            if os.environ.get(ABORT_ENV) == op:  # the tests' stand-in for a kernel that kills the process
                os._exit(3)
            try:
                {"lowrank_linear": self.lowrank, "covariance_update": self.covariance,
                 "stable_rank": self.stable_rank}[op]()
            except ContextLost as e:
                self.result["errors"].append(f"{op}: {e}")
                self.result["skipped"] += [f"{o}: the CUDA context was lost" for o in self.args.ops[i + 1:]]
                break
            except Exception as e:  # keep the other ops
                self.result["errors"].append(f"{op}: {type(e).__name__}: {str(e)[:500]}")
        self.result["complete"] = not self.result["skipped"] or all(
            s.endswith("(stays dense)") or s.startswith("graph mode") for s in self.result["skipped"])
        self.save()
        return self.result


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


def _fmt_ratio(r) -> str:
    if r is None:
        return "-"
    if "na" in r:
        return "n/a"
    if "error" in r:
        return "ERR"
    return f"{r['ratio']:.3g}x" if "ratio" in r else "-"


def _short(variant: str) -> str:
    return {"baseline": "base"}.get(variant, variant)


def _err(e) -> str:
    return f"{e:.1e}" if isinstance(e, float) else "-"


def _achieved(rows: list, peaks) -> str:
    """The fastest measured variant's achieved rates, against the measured peaks."""
    timed = [r for r in rows if "seconds" in r]
    if not timed:
        return "-"
    r = min(timed, key=lambda r: r["seconds"])
    cells = []
    if r.get("tflops") is not None:
        pct = f" ({100 * r['tflops'] / peaks['matmul_tflops']:.0f}%)" if peaks else ""
        cells.append(f"{r['tflops']:.3g}{pct}")
    if r.get("gbps") is not None:
        pct = f" ({100 * r['gbps'] / peaks['copy_gbps']:.0f}%)" if peaks else ""
        cells.append(f"{r['gbps']:.4g}{pct}")
    return f"{_short(r['variant'])}: " + (", ".join(cells) if cells else "-")


def render(result: dict, compact: bool = False) -> str:
    """Markdown. Full: one line per (op, case, mode): the baseline's time, each backend's ratio, the
    dense layer's time and the best ratio to it (lowrank), and each variant's relative error against
    float64. ``compact``: one line per case, ratios as eager/graph, the largest backend error."""
    rows = result.get("rows", [])
    env = result.get("env", {})
    out = [f"ratios on {env.get('device', result.get('device'))} ({result.get('dtype')}; torch {env.get('torch')}, "
           f"triton {env.get('triton')}, CUDA {env.get('cuda')}): ratio = baseline time / variant time "
           "(>1: faster than the strongest plain-torch path)" + ("; cells eager/graph" if compact else "")
           + "; err = rel. error vs float64"]
    pk = result.get("peaks")
    if pk:
        out.append(f"- measured peaks: {pk['matmul_tflops']:.3g} TFLOP/s ({pk['matmul_dtype']} matmul {pk['matmul_size']}³), "
                   f"{pk['copy_gbps']:.3g} GB/s (copy, read + write)")
    if not compact:
        out += [f"- baseline {op}: {name}" for op, name in result.get("baselines", {}).items()]
    for op in OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        variants = [v for v in dict.fromkeys(r["variant"] for r in op_rows) if v not in ("baseline", "dense")]
        dense = any(r["variant"] == "dense" for r in op_rows)
        if compact:
            head = ["case", "base ms"] + variants + (["best/dense"] if dense else []) + ["worst err"]
        else:
            head = ["case", "mode", "baseline ms"] + variants + (["dense ms, best x"] if dense else []) \
                + ["fastest: TFLOP/s, GB/s (% of peak)", "err"]
        out += ["", f"### {op}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cases = list(dict.fromkeys(r["case"] for r in op_rows))
        for case in cases:
            modes = list(dict.fromkeys(r["mode"] for r in op_rows if r["case"] == case))
            by = {(r["variant"], r["mode"]): r for r in op_rows if r["case"] == case}
            if compact:
                b = by.get(("baseline", modes[0]), {})
                cells = [case, f"{b['seconds'] * 1e3:.3f}" if "seconds" in b else "ERR"]
                cells += ["/".join(_fmt_ratio(by.get((v, m))) for m in modes) for v in variants]
                if dense:
                    best = [max((by[(v, m)].get("vs_dense", 0) for v in variants if (v, m) in by), default=0)
                            for m in modes]
                    cells.append("/".join(f"{x:.3g}x" for x in best))
                errs = [by[(v, modes[0])].get("rel_err") for v in variants if (v, modes[0]) in by]
                errs = [e for e in errs if isinstance(e, float)]
                cells.append(_err(max(errs, key=lambda e: (e != e, e))) if errs else "-")  # NaN counts as worst
                out.append("| " + " | ".join(cells) + " |")
                continue
            for mode in modes:
                b = by.get(("baseline", mode), {})
                cells = [case, mode, f"{b['seconds'] * 1e3:.3f}" if "seconds" in b else b.get("error", "-")[:40]]
                cells += [_fmt_ratio(by.get((v, mode))) for v in variants]
                if dense:
                    d = by.get(("dense", mode), {})
                    best = max((by[(v, mode)].get("vs_dense", 0) for v in variants if (v, mode) in by), default=0)
                    cells.append(f"{d['seconds'] * 1e3:.3f}, {best:.3g}x" if "seconds" in d else "-")
                cells.append(_achieved([by[(v, mode)] for v in ["baseline"] + variants if (v, mode) in by], pk))
                cells.append(", ".join(f"{_short(v)} {_err(by[(v, mode)].get('rel_err'))}"
                                       for v in ["baseline"] + variants if (v, mode) in by))
                out.append("| " + " | ".join(cells) + " |")
    failures = sorted({f"{r['op']} {r['variant']} {r['mode']}: {r['error']}" for r in rows if "error" in r})
    for what, items in (("failed measurements", failures), ("errors", result.get("errors", [])),
                        ("skipped", result.get("skipped", []))):
        if items:
            shown = items[:6] if compact else items[:40]
            out += ["", f"{what} ({len(items)}): " + "; ".join(x[:160] for x in shown)
                    + (" ..." if len(items) > len(shown) else "")]
    out += ["", f"complete: {result.get('complete')}"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _pair(s: str):
    return tuple(int(v) for v in s.lower().split("x"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python bench/ratios.py", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, choices=sorted(SIZES), help="default: 7b on cuda, small on cpu")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--lr-shapes", nargs="+", type=_pair, default=None, help="MxN (out x in) of the layers")
    ap.add_argument("--keeps", nargs="+", type=float, default=None)
    ap.add_argument("--tokens", nargs="+", type=int, default=None, help="lowrank tokens")
    ap.add_argument("--cov-d", nargs="+", type=int, default=None)
    ap.add_argument("--cov-tokens", nargs="+", type=int, default=None)
    ap.add_argument("--sr-shapes", nargs="+", type=_pair, default=None, help="BxMxN stable-rank batches")
    ap.add_argument("--sr-kinds", nargs="+", default=list(SR_KINDS), choices=SR_KINDS)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    ap.add_argument("--target-s", type=float, default=None, help="seconds per measurement (default 0.06 cuda, 0.02 cpu)")
    ap.add_argument("--samples", type=int, default=9)
    ap.add_argument("--budget-s", type=float, default=None, help="skip cases that no longer fit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--isolate", action="store_true",
                    help="each op in its own process (a poisoned CUDA context loses one op, not the run)")
    ap.add_argument("--render", default=None, metavar="JSON", help="print the table of a result file and exit")
    ap.add_argument("--compact", action="store_true", help="with --render: one line per case (eager/graph)")
    return ap


ABORT_ENV = "PREHAB_BENCH_RATIOS_ABORT_IN"  # tests only: the process dies when it reaches this op
OP_SHARE = {"lowrank_linear": 0.35, "covariance_update": 0.2, "stable_rank": 0.45}  # of the budget, measured need


def _child_argv(args, op: str, json_path: str, budget) -> list:
    argv = [sys.executable, str(Path(__file__).resolve()), "--sizes", args.sizes, "--ops", op,
            "--modes", *args.modes, "--target-s", str(args.target_s), "--samples", str(args.samples),
            "--seed", str(args.seed), "--json", json_path, "--sr-kinds", *args.sr_kinds,
            "--lr-shapes", *[f"{m}x{n}" for m, n in args.lr_shapes], "--keeps", *map(str, args.keeps),
            "--tokens", *map(str, args.tokens), "--cov-d", *map(str, args.cov_d),
            "--cov-tokens", *map(str, args.cov_tokens), "--sr-shapes", *[f"{b}x{m}x{n}" for b, m, n in args.sr_shapes]]
    if args.device:
        argv += ["--device", args.device]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if budget is not None:
        argv += ["--budget-s", f"{max(budget, 1.0):.0f}"]
    return argv


def isolated(args) -> dict:
    """Each op in its own process, one merged result: a kernel that poisons the CUDA context (an
    illegal address, say) loses the rest of its op, not the run. The budget is shared out by
    ``OP_SHARE``; what an op leaves unused goes to the next. The merged JSON is written after each op."""
    import subprocess
    import tempfile

    from bench.scale import common

    t_end = None if args.budget_s is None else time.monotonic() + args.budget_s
    merged = None
    for i, op in enumerate(args.ops):
        left = None if t_end is None else t_end - time.monotonic()
        share = None if left is None else left * OP_SHARE[op] / sum(OP_SHARE[o] for o in args.ops[i:])
        with tempfile.TemporaryDirectory() as tmp:
            js = os.path.join(tmp, f"{op}.json")
            note = None
            try:  # the child's budget stops new cases; a case in flight gets a grace period
                proc = subprocess.run(_child_argv(args, op, js, share), capture_output=True, text=True,
                                      timeout=None if left is None else max(left - 5, 10))
                sys.stderr.write(proc.stderr[-3000:])  # its table is in the merged one printed below
                if proc.returncode != 0:
                    note = f"{op}: the process ended with status {proc.returncode}: {proc.stderr.strip()[-300:]}"
            except subprocess.TimeoutExpired:
                note = f"{op}: the process outlived the budget and was stopped"
            part = json.loads(Path(js).read_text()) if os.path.isfile(js) else None
        if part is None:
            part = {"rows": [], "skipped": [], "errors": [], "baselines": {}, "backends": {}, "complete": False}
        if merged is None:
            merged = {**part, "rows": [], "skipped": [], "errors": [], "baselines": {}, "backends": {},
                      "ops": list(args.ops), "isolated": True, "complete": True}
            merged["args"] = {k: v for k, v in vars(args).items() if k != "render"}
        for key in ("rows", "skipped", "errors"):
            merged[key] += [x for x in part.get(key, []) if key == "rows" or x not in merged[key]]
        for key in ("baselines", "backends"):
            merged[key].update(part.get(key, {}))
        merged.setdefault("peaks", part.get("peaks"))
        if note:
            merged["errors"].append(note)
        merged["complete"] = merged["complete"] and bool(part.get("complete")) and note is None
        if args.json:
            common.write_json(args.json, merged)
    return merged


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    # the tests' NaN-filled workspaces of the CUDA extension add fill kernels to every call: never timed
    os.environ.pop("PREHAB_SVD_CUDA_NAN_WORKSPACES", None)
    if args.render:
        text = render(json.loads(Path(args.render).read_text()), compact=args.compact)
        print(text)
        return {}
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    sizes = SIZES[args.sizes or ("7b" if on_cuda else "small")]
    args.sizes = args.sizes or ("7b" if on_cuda else "small")
    for k, v in sizes.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.target_s is None:
        args.target_s = 0.06 if on_cuda else 0.02
    result = isolated(args) if args.isolate and len(args.ops) > 1 else Run(args).run()
    text = render(result)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
