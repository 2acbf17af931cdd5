"""Layer throughput against tokens: dense ``nn.Linear``, two-matmul low-rank, and the fused path.

For each layer shape W [m, n] (LLaMA-7B's 4096x4096, 11008x4096, 4096x11008 on a GPU; a quarter of
each side on a CPU) and keep ratio (rank ``floor(keep·m·n/(m+n))``), at each token count:

``dense``         ``F.linear(x, W)``: the layer the compression replaces
``two-matmul``    plain torch ``(x @ V.T) @ U.T``: what a user would write
``fused``         :class:`~prehab_svd.layers.LowRankLinear` forward (``ops.lowrank_linear``, backend
                  ``auto``: the library's choice for the device and dtype)
``fused-<b>``     the same op forced to each other backend that can run here (``triton``, ``cuda``)

Times are medians of ``--reps`` samples after warm-up (each sample long enough to time reliably);
achieved TFLOP/s and GB/s (minimum traffic: x, the weights, y) are compared with the device's
measured peaks (:func:`prehab_svd.profiling.measure_peaks`). ``--png`` plots tokens/s against tokens
at ``--plot-keep``.

Example: ``python -m bench.scale.layers --json out.json --png out.png``
"""

from __future__ import annotations

from bench.scale import common  # first: sets the environment (offline hub, tokenizers) before they load

import argparse  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "cpu": [(1024, 1024), (2752, 1024), (1024, 2752)],
    "tiny": [(64, 64), (160, 64)],
}
TOKENS = {"7b": [1, 16, 128, 2048, 8192], "cpu": [1, 16, 128, 512], "tiny": [1, 8]}


def run(args) -> dict:
    from prehab_svd import ops
    from prehab_svd.layers import LowRankLinear
    from prehab_svd.models import rank_for
    from prehab_svd.profiling import measure_peaks

    device = args.device or common.default_device()
    on_cuda = torch.device(device).type == "cuda"
    dtype = common.parse_dtype(args.dtype, device)
    sizes = args.sizes or ("7b" if on_cuda else "cpu")
    shapes = SHAPES[sizes]
    tokens = args.tokens or TOKENS[sizes]
    elt = torch.empty((), dtype=dtype).element_size()
    reps = args.reps or (7 if on_cuda else 5)
    min_sample = 0.005 if on_cuda else 0.02
    env = common.environment(device)
    peaks = measure_peaks(device, dtype)
    extra = [b for b in ops.available_backends("lowrank_linear", torch.device(device), dtype)
             if b != "torch"]
    deadline = common.Deadline(args.budget_s)
    rows, skipped = [], []
    g = torch.Generator(device="cpu").manual_seed(0)
    for m, n in shapes:
        W = (torch.randn(m, n, generator=g) / math.sqrt(n)).to(device, dtype)
        for keep in args.keeps:
            r = rank_for(m, n, keep)
            if r is None:
                continue
            layer = LowRankLinear(n, m, r, bias=False, device=device, dtype=dtype)
            U, V = layer.U.detach(), layer.V.detach()
            for T in tokens:
                if not deadline.allows(1.0):
                    skipped.append(f"{m}x{n} keep {keep} T={T}: budget")
                    continue
                x = torch.randn(T, n, generator=g).to(device, dtype)
                variants = {"two-matmul": lambda: (x @ V.T) @ U.T, "fused": lambda: layer(x)}
                for b in extra:
                    variants[f"fused-{b}"] = lambda b=b: ops.lowrank_linear(x, U, V, None, backend=b)
                if keep == args.keeps[0]:  # the dense layer once per shape and token count
                    variants = {"dense": lambda: F.linear(x, W), **variants}
                for name, fn in variants.items():
                    dense = name == "dense"
                    flops = 2 * T * (m * n if dense else r * (m + n))
                    nbytes = elt * (T * n + T * m + (m * n if dense else r * (m + n)))
                    if name == "two-matmul":
                        nbytes += 2 * elt * T * r  # the intermediate goes through memory
                    try:
                        with torch.inference_mode():
                            t = common.time_call(fn, device, reps=reps, warmup=2, min_sample_s=min_sample)
                    except Exception as e:  # one failing backend must not lose the sweep
                        rows.append({"m": m, "n": n, "keep_ratio": None if dense else keep, "rank": None if dense
                                     else r, "tokens": T, "variant": name, "error": f"{type(e).__name__}: {e}"})
                        continue
                    s = t["median_s"]
                    rows.append({
                        "m": m, "n": n, "keep_ratio": None if dense else keep, "rank": None if dense else r,
                        "tokens": T, "variant": name, "seconds": s, "samples_s": t["samples_s"],
                        "tokens_per_s": T / s, "tflops": flops / s / 1e12, "gbps": nbytes / s / 1e9,
                        "pct_peak_flops": 100 * flops / s / 1e12 / peaks["matmul_tflops"],
                        "pct_peak_bw": 100 * nbytes / s / 1e9 / peaks["copy_gbps"],
                    })
        common.free_device_memory()
    return {"kind": "layers", "schema": common.SCHEMA, "env": env, "device": device,
            "dtype": common.dtype_name(dtype), "sizes": sizes, "keeps": args.keeps, "tokens": tokens,
            "reps": reps, "peaks": peaks, "backends": ["auto"] + extra, "rows": rows, "skipped": skipped,
            "overhead": overhead(device, dtype, extra, reps)}


def overhead(device, dtype, backends, reps) -> list:
    """Microseconds per call at a tiny shape (64x64, rank 16, 1 token), where the arithmetic is
    negligible: what each path costs the host per layer per call (an eager decode step of a 7B model
    makes 224 such calls)."""
    from prehab_svd import ops
    from prehab_svd.layers import LowRankLinear

    torch.manual_seed(0)
    layer = LowRankLinear(64, 64, 16, bias=False, device=device, dtype=dtype)
    dense = torch.nn.Linear(64, 64, bias=False, device=device, dtype=dtype)
    U, V = layer.U.detach(), layer.V.detach()
    x = torch.randn(1, 64, device=device, dtype=dtype)
    variants = {"dense": lambda: dense(x), "two-matmul": lambda: (x @ V.T) @ U.T, "fused": lambda: layer(x)}
    for b in backends:
        variants[f"fused-{b}"] = lambda b=b: ops.lowrank_linear(x, U, V, None, backend=b)
    out = []
    with torch.inference_mode():
        for name, fn in variants.items():
            t = common.time_call(fn, device, reps=reps, warmup=20, min_sample_s=0.02)
            out.append({"variant": name, "us_per_call": 1e6 * t["median_s"]})
    return out


def plot(result: dict, path, keep: float) -> None:
    from prehab_svd.plots import plot_throughput

    rows = [r for r in result["rows"] if r["variant"] == "dense" or r.get("keep_ratio") == keep]
    env = result["env"]
    plot_throughput(rows, path, title=f"{env['device']}, {result['dtype']}, keep_ratio {keep} "
                                      f"(torch {env['torch']}; median of {result['reps']})")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.scale.layers", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, choices=sorted(SHAPES), help="default: 7b on cuda, cpu on cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.6, 0.4, 0.8],
                    help="keep ratios (the dense row is measured with the first)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=sorted(common.DTYPES))
    ap.add_argument("--reps", type=int, default=None, help="default: 7 on cuda, 5 on cpu (median)")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="plot of tokens/s against tokens")
    ap.add_argument("--plot-keep", type=float, default=0.6)
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    result = run(args)
    if args.json:
        common.write_json(args.json, result)
    if args.png:
        plot(result, args.png, args.plot_keep)
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['m']}x{r['n']} T={r['tokens']} {r['variant']}: ERROR {r['error']}")
        else:
            print(f"{r['m']}x{r['n']} keep {r['keep_ratio']} T={r['tokens']:>5} {r['variant']:>12}: "
                  f"{r['tokens_per_s']:>12,.0f} tok/s  {r['tflops']:.3g} TFLOP/s  {r['gbps']:.3g} GB/s")
    return result


if __name__ == "__main__":
    main()
