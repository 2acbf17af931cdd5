"""Call every op on every backend and kernel path once, at small odd shapes: the program that
``compute-sanitizer --tool memcheck`` runs over (bench/gpu_first.sh), so that each kernel of
prehab_svd/kernels/ and csrc/ is launched at least once under the memory checker.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python bench/sanitize_ops.py
    python bench/sanitize_ops.py --list          # the planned calls, nothing run
    TRITON_INTERPRET=1 python bench/sanitize_ops.py --device cpu   # the Triton paths in the interpreter

Shapes are not multiples of any tile (d = 37, 130, r = 13, T = 1, 9, 65, ...), plus a few that select
the other configurations (a covariance width with 128-tiles, a long ``in`` split over K with atomics,
token splits). Outputs the kernels must overwrite start as NaN (Triton: the launchers' ``_empty``;
CUDA: ``PREHAB_SVD_CUDA_NAN_WORKSPACES=1`` and ``out=`` pre-filled). Each call is checked for finite
output and a loose relative error against float64 (``--tol``: this program looks for memory errors;
the tests in tests/ hold the tolerances). The caching allocator should be off
(``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) so that an out-of-bounds access lands outside an allocation.

Prints one line per call and a last line ``sanitize_ops: N calls, F failed, S skipped``; exit status
1 when a call failed (the sanitizer's own findings set its --error-exitcode).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("PREHAB_SVD_CUDA_NAN_WORKSPACES", "1")

import torch  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _gen(*key):
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _nan_buffers():
    """Make the Triton launchers' output buffers start as NaN (as the tests do)."""
    try:
        from prehab_svd.kernels import lowrank_linear as lk
        from prehab_svd.kernels import stable_rank as sk
    except Exception:
        return
    lk._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    sk._empty = lambda *shape, device: torch.full(shape, float("nan"), device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# the calls: (name, fn) with fn() -> relative error against float64
# ---------------------------------------------------------------------------------------------


def cov_call(backend, T, d, dt, cross, dev):
    from prehab_svd import ops

    def fn():
        g = _gen("cov", T, d, cross)
        x = torch.randn(T, d, generator=g).to(dev, dt)
        y = torch.randn(T, d, generator=g).to(dev, dt) if cross else None
        G = torch.zeros(d, d, device=dev)
        C = torch.zeros(d, d, device=dev) if cross else None
        ops.covariance_update(G, x, C, y, backend=backend)
        x64 = x.double()
        err = _rel(G, x64.T @ x64)
        if cross:
            err = max(err, _rel(C, x64.T @ y.double()))
        return err

    return f"covariance {backend} {str(dt)[6:]} T={T} d={d}{' +C' if cross else ''}", fn, None


def lr_call(backend, T, K, N, R, dt, bias, dev, **kw):
    from prehab_svd import ops

    def fn():
        g = _gen("lr", T, K, N, R, bias)
        x = torch.randn(T, K, generator=g).to(dev, dt)
        V = (torch.randn(R, K, generator=g) / K ** 0.5).to(dev, dt)
        U = (torch.randn(N, R, generator=g) / R ** 0.5).to(dev, dt)
        b = torch.randn(N, generator=g).to(dev, dt) if bias else None
        if backend == "triton-path":
            from prehab_svd.kernels import lowrank_linear as lk

            y = lk.lowrank_linear(x, U, V, b, **kw)
        elif backend == "cuda-path":
            from prehab_svd.ops import _cuda

            mod = _cuda.load()
            out = torch.full((T, N), float("nan"), dtype=dt, device=dev)
            y = mod.lowrank_linear(x, U, V, b, mod.PATHS[kw["path"]], out)
        else:
            y = ops.lowrank_linear(x, U, V, b, backend=backend)
        ref = (x.double() @ V.double().T) @ U.double().T
        return _rel(y, ref if b is None else ref + b.double())

    extra = " ".join(f"{k}={v}" for k, v in kw.items())
    return f"lowrank {backend} {str(dt)[6:]} T={T} in={K} out={N} r={R}{' bias' if bias else ''} {extra}".rstrip(), fn, None


def sr_call(backend, kind, B, m, n, dt, whiten, dev):
    from prehab_svd import ops
    from prehab_svd.ops import reference

    def fn():
        g = _gen("sr", kind, B, m, n, whiten)
        W = (torch.randn(B, m, n, generator=g) / n ** 0.5).to(dev, dt)
        L = None
        if whiten != "none":
            Ls = torch.eye(n) + 0.1 * torch.randn(n, n, generator=g).tril(-1)
            L = (Ls if whiten == "shared" else torch.stack([Ls] * B)).to(dev, dt)
        iters = 8 if kind == "stable" else 12
        state = torch.randn(B, n, generator=g).to(dev) if kind == "stable" else None
        v, gr, _ = ops.stable_rank(W, L, kind=kind, state=state, iters=iters, backend=backend)
        v64, g64, _ = reference.stable_rank(W.double(), None if L is None else L.double(), kind,
                                            None if state is None else state.double(), iters)
        return max(_rel(v, v64), _rel(gr, g64))

    return f"stable_rank {backend} {kind} {str(dt)[6:]} B={B} {m}x{n} L={whiten}", fn, None


BACKENDS = ("triton", "cuda", "torch")


def plan(dev: torch.device, quick: bool = False, backends=BACKENDS):
    """[(name, fn or None, why-skipped)] for every backend that can run on ``dev``."""
    from prehab_svd import ops

    cuda = dev.type == "cuda"
    # bf16 (the 16-bit tensor-core paths) and fp32 (their fp32 / TF32 paths) in full; fp16 shares the
    # 16-bit code, so it gets the smaller stable-rank set. The library's kernels first, torch last: if
    # the sanitizer's slowdown runs the stage out of time, what is left out is the least interesting.
    dtypes = ["bf16", "fp32", "fp16"] if cuda else ["fp32", "fp16"]
    if quick:
        dtypes = dtypes[:1]
    calls = []

    def have(op, backend, dt):
        return backend in ops.available_backends(op, dev, DT[dt])

    for backend in [b for b in BACKENDS if b in backends]:
        for dt in dtypes:
            if not have("covariance_update", backend, dt):
                calls.append((f"{backend} {dt}", None, f"backend {backend!r} cannot run {dev.type}/{dt} here"))
                continue
            D = DT[dt]
            cov = [(1, 1, False), (77, 130, True), (33, 37, False)]
            if backend != "torch" and not quick:
                cov += [(5, 1937, False)] if cuda else []  # the 128-tile configuration
                cov += [(5000, 72, True)] if cuda else [(300, 40, True)]  # many tokens: token splits
            if backend == "torch" and dt != dtypes[0]:
                cov = cov[1:2]
            calls += [cov_call(backend, T, d, D, c, dev) for T, d, c in cov]

            lr = [(1, 37, 29, 13, True), (9, 37, 29, 13, False), (65, 64, 130, 24, True)]
            if backend != "torch" and not quick:
                lr += [(3, 2051, 33, 17, True)]  # long `in`: split over K (atomics)
            if backend == "torch" and dt != dtypes[0]:
                lr = lr[:1]
            calls += [lr_call(backend, *c[:4], D, c[4], dev) for c in lr]
            if backend == "triton":
                paths = [lr_call("triton-path", 3, 300, 29, 13, D, True, dev, path="decode", split_k=3),
                         lr_call("triton-path", 9, 37, 29, 13, D, True, dev, path="gemm")]
                if not quick:
                    paths += [lr_call("triton-path", 1, 37, 29, 13, D, True, dev, path="decode", block_t=1),
                              lr_call("triton-path", 9, 37, 29, 13, D, False, dev, path="decode", block_t=16)]
                calls += paths
            if backend == "cuda" and not quick:
                from prehab_svd.ops import _cuda

                mod = _cuda.load()
                for T in (1, 9, 65):
                    for path in getattr(mod, "PATHS", {}):
                        if path == "gemv" and T > mod.GEMV_MAX_T or path == "tensor_core" and dt == "fp32":
                            continue
                        calls.append(lr_call("cuda-path", T, 37, 29, 13, D, T != 9, dev, path=path))

            shapes = [(2, 37, 53), (1, 70, 30)]
            kinds = ("stable", "nuclear")
            whitens = ("none", "shared", "batched")
            if backend == "torch" or quick:
                shapes, whitens = shapes[:1], ("shared",)
            if quick and backend != "torch":
                shapes, whitens = [(1, 70, 30)], ("batched",)  # m > n: the transposed iteration
            if dt == "fp16" and backend != "torch":
                whitens = ("shared",)
            if backend == "torch" and dt != dtypes[0]:
                continue
            calls += [sr_call(backend, k, *s, D, w, dev) for s in shapes for k in kinds for w in whitens]
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/sanitize_ops.py", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--list", action="store_true", help="print the planned calls; run nothing")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (the CPU smoke test)")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                    help="only these (gpu_first.sh runs triton and torch while the CUDA extension builds)")
    ap.add_argument("--tol", type=float, default=5e-2, help="relative error that counts as a failure")
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _nan_buffers()
    calls = plan(dev, quick=args.quick, backends=args.backends)
    n_fail = n_skip = n_run = 0
    t0 = time.time()
    for name, fn, why in calls:
        if fn is None:
            n_skip += 1
            print(f"skip  {name}: {why}", flush=True)
            continue
        if args.list:
            print(f"call  {name}", flush=True)
            continue
        n_run += 1
        try:
            err = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            bad = not (err <= args.tol)  # NaN fails
            n_fail += bad
            print(f"{'FAIL' if bad else 'ok  '}  {name}: rel err {err:.1e}", flush=True)
        except Exception as e:
            n_fail += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
    planned = sum(fn is not None for _, fn, _ in calls)
    print(f"sanitize_ops: {planned if args.list else n_run} calls{' planned' if args.list else ''}, "
          f"{n_fail} failed, {n_skip} skipped ({time.time() - t0:.0f} s on {dev})", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
