"""Factorization micro-benchmark: the whitened low-rank closed form (SVD-LLM / AA-SVD) at LLaMA-7B shapes.

For W [m, n] and a gram [n, n] the library computes, in float64 (``prehab_svd.linalg``): the Cholesky
factor ``gram = R Rᵀ``, ``M = W R``, the truncated SVD of M at rank r, and ``V = Vh R⁻¹`` by a
triangular solve. A 7B block has 7 such problems (q, k, v, o: 4096x4096; gate, up: 11008x4096;
down: 4096x11008; grams of width 4096 and 11008), 224 in the model. This script times that path
against alternatives and measures each alternative's accuracy against it:

``fp64``          the library's path (whitening_factor, truncated_svd, right_solve), the reference
``fp64-gesvdj``   the same with cuSOLVER's Jacobi SVD (CUDA only)
``fp64-eigh``     fp64, but the SVD from the eigendecomposition of the smaller Gram MᵀM (or MMᵀ)
``fp32``          everything in float32 (Cholesky, product, SVD, solve)
``fp32-svd+rr64`` fp64 Cholesky and product, the SVD in float32, then one fp64 refinement: a power
                  step on the fp32 subspace, a QR, and a Rayleigh-Ritz SVD of the m x r projection
``fp64-batched``  the fp64 SVDs of same-shape problems in one batched call, against one call each
                  (q/k/v share a gram; gate/up too)

Accuracy (float64, against ``fp64``): ``rel_objective`` = (f(W') - f(W'_ref)) / f(W'_ref) with
f(W') = ||(W - W') R||_F^2 the objective every method minimizes, and ``rel_factor`` =
||W' - W'_ref||_F / ||W'_ref||_F.

The gram is synthetic but LLM-like: X [2n, n] standard normal times per-channel scales spanning
``--decades`` orders of magnitude, with a few outlier channels ``--outlier`` times larger (LLaMA
activations have such channels), so it is ill-conditioned the way real calibration grams are; the
table gives a lower bound of its condition number (from the Cholesky diagonal). Random W.

Example: ``python -m bench.scale.factorize --sizes reduced --json out.json``
"""

from __future__ import annotations

from bench.scale import common  # first: sets the environment (offline hub, tokenizers) before they load

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

SIZES = {
    "full": [(4096, 4096), (11008, 4096), (4096, 11008)],  # LLaMA-7B
    "reduced": [(1024, 1024), (2752, 1024), (1024, 2752)],  # the same ratios, for a CPU
    "tiny": [(48, 48), (120, 48), (48, 120)],
}
# per LLaMA-7B block: how many problems of each (m, n) role, and how many Choleskys of each width
PER_BLOCK = {"square": 4, "tall": 2, "wide": 1}
VARIANTS = ("fp64", "fp64-gesvdj", "fp64-eigh", "fp32", "fp32-svd+rr64", "fp64-batched")


def _role(m: int, n: int) -> str:
    return "square" if m == n else ("tall" if m > n else "wide")


class _Clock:
    def __init__(self, device):
        self.device = device
        self.t = {}

    def __call__(self, key):
        clock = self

        class _Ctx:
            def __enter__(self):
                common.sync(clock.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                common.sync(clock.device)
                clock.t[key] = clock.t.get(key, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


def make_problem(m: int, n: int, device, *, decades: float, outlier: float, seed: int = 0):
    """(W [m, n] fp64, gram [n, n] fp64) on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = (torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)).to(device)
    scales = torch.logspace(0, -decades, n, dtype=torch.float32)[torch.randperm(n, generator=g)]
    n_out = max(1, n // 200)
    scales[torch.randperm(n, generator=g)[:n_out]] *= outlier
    T = 2 * n
    X = torch.randn(T, n, generator=g, dtype=torch.float32).to(device) * scales.to(device)
    G = (X.T @ X).to(torch.float64) / T
    G = 0.5 * (G + G.T)
    return W, G


def _variant_fp64(W, G, r, clock, driver=None):
    from prehab_svd import linalg

    with clock("cholesky"):
        F = linalg.whitening_factor(G)
    with clock("other"):
        M = W @ F.R
    with clock("svd"):
        if driver is None:
            U, S, Vh = linalg.truncated_svd(M, r)
        else:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False, driver=driver)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
    with clock("other"):
        B = F.right_solve(Vh)
        A = U * S
    return A, B, F.kind


def _variant_eigh(W, G, r, clock):
    from prehab_svd import linalg

    with clock("cholesky"):
        F = linalg.whitening_factor(G)
    with clock("other"):
        M = W @ F.R
    with clock("svd"):
        m, n = M.shape
        if m >= n:  # right singular vectors from MᵀM [n, n]
            evals, evecs = torch.linalg.eigh(M.T @ M)
            V = evecs[:, -r:].flip(1)
            A = M @ V  # = U S
            Vh = V.T
        else:  # left singular vectors from MMᵀ [m, m]
            evals, evecs = torch.linalg.eigh(M @ M.T)
            U = evecs[:, -r:].flip(1)
            SVh = U.T @ M  # = S Vh
            A, Vh = U, SVh  # W' = U (S Vh) R⁻¹
    with clock("other"):
        B = F.right_solve(Vh)
    return A, B, F.kind


def _variant_fp32(W, G, r, clock):
    with clock("cholesky"):
        L, info = torch.linalg.cholesky_ex(G.float())
        if int(info) != 0:
            return None, None, f"fp32 Cholesky failed (not positive definite in fp32 at column {int(info)})"
    with clock("other"):
        M = W.float() @ L
    with clock("svd"):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    with clock("other"):
        B = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)
        A = U * S
    return A.double(), B.double(), "cholesky"


def _variant_rr(W, G, r, clock):
    from prehab_svd import linalg

    with clock("cholesky"):
        F = linalg.whitening_factor(G)
    with clock("other"):
        M = W @ F.R
    with clock("svd"):
        _, _, Vh32 = torch.linalg.svd(M.float(), full_matrices=False)
    with clock("refine"):
        V0 = Vh32[:r].T.double()
        Q, _ = torch.linalg.qr(M.T @ (M @ V0))  # one power step: squares the gap ratio
        Uz, S, Vzh = torch.linalg.svd(M @ Q, full_matrices=False)  # Rayleigh-Ritz, m x r
        Vh = Vzh @ Q.T
    with clock("other"):
        B = F.right_solve(Vh)
        A = Uz * S
    return A, B, F.kind


def _objective(W, A, B, G) -> float:
    D = W - A @ B
    return float(((D @ G) * D).sum())


def _run_variant(name, W, G, r, device, reps):
    fn = {"fp64": _variant_fp64, "fp64-gesvdj": lambda *a: _variant_fp64(*a, driver="gesvdj"),
          "fp64-eigh": _variant_eigh, "fp32": _variant_fp32, "fp32-svd+rr64": _variant_rr}[name]
    times, parts = [], []
    A = B = None
    note = None
    for _ in range(reps):
        clock = _Clock(device)
        t0 = time.perf_counter()
        A, B, note = fn(W, G, r, clock)
        common.sync(device)
        times.append(time.perf_counter() - t0)
        parts.append(clock.t)
        if A is None:
            break
    med = statistics.median(times)
    keys = sorted({k for p in parts for k in p})
    breakdown = {k: statistics.median([p.get(k, 0.0) for p in parts]) for k in keys}
    return A, B, note, {"seconds": med, "samples_s": times, "breakdown": breakdown}


def _batched(W, G, r, device, batch, reps, seed):
    """fp64 SVDs of ``batch`` whitened matrices sharing one gram: one batched call vs a loop."""
    from prehab_svd import linalg

    F = linalg.whitening_factor(G)
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    Ws = [W] + [(torch.randn(W.shape, generator=g, dtype=torch.float64) / math.sqrt(W.shape[1])).to(device)
                for _ in range(batch - 1)]
    Ms = torch.stack([w @ F.R for w in Ws])
    loop_t, batch_t = [], []
    for _ in range(reps):
        common.sync(device)
        t0 = time.perf_counter()
        loop = [torch.linalg.svd(Ms[i], full_matrices=False) for i in range(batch)]
        common.sync(device)
        loop_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        Ub, Sb, Vhb = torch.linalg.svd(Ms, full_matrices=False)
        common.sync(device)
        batch_t.append(time.perf_counter() - t0)
    err = max(float((Sb[i] - loop[i][1]).abs().max() / loop[i][1][0]) for i in range(batch))
    prod_err = max(float(torch.linalg.norm((Ub[i, :, :r] * Sb[i, :r]) @ Vhb[i, :r]
                                           - (loop[i][0][:, :r] * loop[i][1][:r]) @ loop[i][2][:r])
                         / torch.linalg.norm((loop[i][0][:, :r] * loop[i][1][:r]) @ loop[i][2][:r]))
                   for i in range(batch))
    return {"batch": batch, "loop_s": statistics.median(loop_t), "batched_s": statistics.median(batch_t),
            "speedup": statistics.median(loop_t) / statistics.median(batch_t),
            "max_rel_singular_value_diff": err, "rel_factor": prod_err}


def _warmup(device):
    """cuSOLVER / LAPACK handles and workspaces, on a small problem."""
    W, G = make_problem(64, 64, device, decades=1, outlier=1)
    for name in ("fp64", "fp64-eigh", "fp32", "fp32-svd+rr64") + (("fp64-gesvdj",)
                                                                 if torch.device(device).type == "cuda" else ()):
        _run_variant(name, W, G, 16, device, 1)


def run(args) -> dict:
    from prehab_svd.models import rank_for

    device = args.device or common.default_device()
    on_cuda = torch.device(device).type == "cuda"
    deadline = common.Deadline(args.budget_s)
    sizes = SIZES[args.sizes]
    reps = args.reps or (2 if on_cuda else 3)
    variants = [v for v in (args.variants or VARIANTS) if on_cuda or v != "fp64-gesvdj"]
    env = common.environment(device)
    _warmup(device)
    # every problem first, then the variants in order across all of them: when the budget runs out,
    # the variants measured so far have all three shapes (what the per-block estimate needs)
    cases, problems = [], []
    for m, n in sizes:
        t0 = time.perf_counter()
        W, G = make_problem(m, n, device, decades=args.decades, outlier=args.outlier, seed=args.seed)
        common.sync(device)
        cases.append({"m": m, "n": n, "rank": rank_for(m, n, args.keep_ratio), "role": _role(m, n),
                      "variants": {}, "skipped": [], "setup_s": time.perf_counter() - t0,
                      "cond_lower_bound": _cond_bound(G)})
        problems.append((W, G))
    refs = [None] * len(cases)  # (W' of fp64, its objective, its seconds)
    for name in ["fp64"] + [v for v in variants if v != "fp64"]:
        for i, (case, (W, G)) in enumerate(zip(cases, problems)):
            r, ref = case["rank"], refs[i]
            if name == "fp64-batched":
                if case["role"] == "wide":
                    continue  # one down_proj per block: nothing to batch
                batch = PER_BLOCK[case["role"]]
                if not deadline.allows(2 * batch * reps * ref[2]):  # loop + batched, each `batch` SVDs
                    case["skipped"].append(f"{name}: budget ({deadline.left():.0f} s left)")
                    continue
                case["batched"] = _batched(W, G, r, device, batch, reps, args.seed)
                continue
            if name != "fp64" and not deadline.allows(3 * reps * ref[2]):  # no variant costs 3x fp64
                case["skipped"].append(f"{name}: budget ({deadline.left():.0f} s left)")
                continue
            A, B, note, t = _run_variant(name, W, G, r, device, reps)
            row = {**t, "note": note}
            if A is not None:
                obj = _objective(W, A, B, G)
                if ref is None:
                    ref = refs[i] = (A @ B, obj, t["seconds"])
                    case["objective_fp64"] = obj
                row["rel_objective"] = (obj - ref[1]) / ref[1] if ref[1] else 0.0
                row["rel_factor"] = float(torch.linalg.norm(A @ B - ref[0]) / torch.linalg.norm(ref[0]))
            case["variants"][name] = row
    del problems, refs
    common.free_device_memory()
    result = {"kind": "factorize", "schema": common.SCHEMA, "env": env, "device": device,
              "sizes": args.sizes, "keep_ratio": args.keep_ratio, "reps": reps, "decades": args.decades,
              "outlier": args.outlier, "cases": cases}
    result["per_block"] = per_block_estimate(cases) if args.sizes == "full" else None
    return result


def _cond_bound(G) -> float:
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return float("inf")
    d2 = torch.diagonal(L).square()
    return float(d2.max() / d2.min())


def per_block_estimate(cases) -> dict:
    """Seconds of the factorizations of one LLaMA-7B block and of all 32, per variant: 4 square, 2 tall,
    1 wide problems; Choleskys shared within a group (q/k/v, gate/up), so counted once per gram:
    3 of width 4096 (q/k/v, o, gate/up) and 1 of width 11008 (down)."""
    by_role = {c["role"]: c for c in cases}
    if set(by_role) != set(PER_BLOCK):
        return {}
    out = {}
    names = set.intersection(*(set(c["variants"]) for c in cases))
    for name in sorted(names):
        rows = {role: by_role[role]["variants"][name] for role in PER_BLOCK}
        if any(r.get("note", "").startswith("fp32 Cholesky failed") for r in rows.values() if r.get("note")):
            continue
        block = 0.0
        for role, count in PER_BLOCK.items():
            chol = rows[role]["breakdown"].get("cholesky", 0.0)
            block += count * (rows[role]["seconds"] - chol)
        block += 3 * rows["square"]["breakdown"].get("cholesky", 0.0)
        block += rows["wide"]["breakdown"].get("cholesky", 0.0)
        out[name] = {"block_s": block, "model_s": 32 * block}
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.scale.factorize", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, choices=sorted(SIZES), help="default: full on cuda, reduced on cpu")
    ap.add_argument("--device", default=None)
    ap.add_argument("--keep-ratio", type=float, default=0.6)
    ap.add_argument("--variants", nargs="*", default=None, choices=VARIANTS)
    ap.add_argument("--reps", type=int, default=None, help="default: 2 on cuda, 3 on cpu (median)")
    ap.add_argument("--decades", type=float, default=2.0, help="spread of the channel scales (10^x)")
    ap.add_argument("--outlier", type=float, default=10.0, help="factor of the outlier channels")
    ap.add_argument("--budget-s", type=float, default=None, help="skip variants that would not fit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.sizes is None:
        args.sizes = "full" if (args.device or common.default_device()).startswith("cuda") else "reduced"
    result = run(args)
    if args.json:
        common.write_json(args.json, result)
    for c in result["cases"]:
        cells = []
        for name, v in c["variants"].items():
            acc = f", obj {v['rel_objective']:+.1e}" if "rel_objective" in v else f" ({v['note']})"
            cells.append(f"{name} {v['seconds']:.3f} s{acc}")
        print(f"{c['m']}x{c['n']} r={c['rank']}: " + "; ".join(cells))
    return result


if __name__ == "__main__":
    main()
