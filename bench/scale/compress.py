"""Compression-time benchmark: ``prehab_svd.compress`` on a random LLaMA-shaped model, end to end.

Builds the model of a preset (``7b``: hidden 4096, MLP 11008, 32 heads; ``7b-gqa``: 8 key/value heads;
``cpu-small``: the scaled-down CPU shape) with ``--blocks`` of its blocks (default: the preset's measured
fraction), random-token calibration data, compresses it with one method at ``--keep-ratio`` and writes
the output with ``prehab_svd.save_compressed``. Reports the total time, the library's breakdown
(``CompressionReport.timings``: capture, check, forward, covariance, factorize, load, write; a missing
key is shown as "-"), the time to write the output, peak GPU memory (``torch.cuda.max_memory_allocated``) and
peak CPU RSS (``ru_maxrss``, so run one configuration per process), the forward floor
(``prehab_svd.profiling.forward_floor``: the forwards the compression must make, for the method's
streams, timed alone on the same model and calibration just before compressing it, after one untimed
batch through the same path) with ``ratio`` = ``report.seconds`` / ``floor_s`` (both on the blocks
built; ``--no-floor`` skips it), and, when fewer blocks than the full model were built, an
extrapolation to the full model (labelled as such):

* per-block costs (forward, covariance, factorize, load, and the rest of the loop) scale with the
  number of blocks; capturing the first block's inputs happens once per model;
* writing scales with the bytes written;
* peak GPU memory: measured + (missing blocks) x (one dense block's bytes): an upper bound, since the
  measured peak already holds every per-block working set (activations of the calibration set,
  statistics, the factorization's temporaries);
* peak CPU RSS: measured + (missing blocks) x (one block's bytes as saved), an upper bound assuming
  the save holds the whole model's bytes in memory at once (on the CPU: one dense block's bytes).

Example: ``python -m bench.scale.compress --preset cpu-small --method aa-svd --json out.json``
"""

from __future__ import annotations

from bench.scale import common  # first: sets the environment (offline hub, tokenizers) before they load

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

TIMING_KEYS = ("capture", "check", "forward", "covariance", "factorize", "load", "write")
PER_MODEL_KEYS = ("capture",)  # happen once per model, not per block


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _block_bytes(model, keep_ratio: float | None = None) -> tuple[int, int]:
    """(bytes of one dense block, bytes of the same block after compression at keep_ratio)."""
    from prehab_svd.models import find_block_list, rank_for

    _, blocks = find_block_list(model)
    block = blocks[0]
    elt = next(block.parameters()).element_size()
    dense = sum(p.numel() for p in block.parameters()) * elt
    kept = dense
    if keep_ratio is not None:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                r = rank_for(m.out_features, m.in_features, keep_ratio)
                if r is not None:
                    kept -= (m.weight.numel() - r * (m.in_features + m.out_features)) * elt
    return dense, kept


def _warmup(device: str, dtype, method: str) -> None:
    """Initialize the GPU libraries (cuBLAS, cuSOLVER handles, kernels) on a tiny model, so the first
    measured block does not pay for it."""
    from prehab_svd import compress

    p = common.PRESETS["tiny"]
    model = common.build_llama(p, device, dtype, layers=1)
    compress(model, method, 0.6, common.token_batches(p.vocab, 2, 16, 2, device))
    del model
    common.free_device_memory()


def run(args) -> dict:
    from prehab_svd import compress, save_compressed

    p = common.preset(args.preset)
    device = args.device or common.default_device()
    dtype = common.parse_dtype(args.dtype, device)
    blocks = args.blocks or p.blocks
    if not 1 <= blocks <= p.layers:
        raise SystemExit(f"--blocks must be in [1, {p.layers}] for preset {p.name}, got {blocks}")
    sequences = args.sequences or p.sequences
    seq_len = args.seq_len or p.seq_len
    batch_size = args.batch_size or p.batch_size
    on_cuda = torch.device(device).type == "cuda"
    if args.backend:
        os.environ["PREHAB_SVD_BACKEND"] = args.backend
    env = common.environment(device)

    if args.warmup if args.warmup is not None else on_cuda:
        _warmup(device, dtype, args.method)
    t0 = time.perf_counter()
    model = common.build_llama(p, device, dtype, layers=blocks, seed=args.seed)
    common.sync(device)
    build_s = time.perf_counter() - t0
    dense_block, kept_block = _block_bytes(model, args.keep_ratio)
    batches = common.token_batches(p.vocab, sequences, seq_len, batch_size, device, seed=args.seed + 1)
    floor_s = floor_streams = None
    if args.floor:
        from prehab_svd.methods import get as get_method
        from prehab_svd.profiling import forward_floor

        floor_streams = get_method(args.method).streams
        forward_floor(model, batches[:1], streams=floor_streams, check=False)  # warm-up, untimed
        floor_s = forward_floor(model, batches, streams=floor_streams)
        common.free_device_memory()  # the floor's hidden states out of the allocator's cache
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = common.peak_rss_gb()
    stats_dtype = torch.float64 if args.stats_dtype == "float64" else torch.float32

    t0 = time.perf_counter()
    report = compress(model, args.method, args.keep_ratio, batches, stats_dtype=stats_dtype)
    common.sync(device)
    compress_s = time.perf_counter() - t0
    peak_alloc = torch.cuda.max_memory_allocated() / 1e9 if on_cuda else None
    peak_reserved = torch.cuda.max_memory_reserved() / 1e9 if on_cuda else None

    write_s = out_bytes = None
    if not args.no_save:
        work = Path(tempfile.mkdtemp(prefix="prehab-scale-", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            save_compressed(model, work / "compressed", report)
            write_s = time.perf_counter() - t0
            out_bytes = _dir_bytes(work / "compressed")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    peak_rss = common.peak_rss_gb()

    timings = dict(getattr(report, "timings", None) or {})
    errors = [layer.rel_error_after for layer in report.layers if layer.rel_error_after is not None]
    result = {
        "kind": "compress", "schema": common.SCHEMA, "env": env,
        "preset": p.name, "method": args.method, "keep_ratio": args.keep_ratio,
        "device": device, "dtype": common.dtype_name(dtype), "stats_dtype": args.stats_dtype,
        "model": {"hidden": p.hidden, "intermediate": p.intermediate, "heads": p.heads,
                  "kv_heads": p.kv_heads, "vocab": p.vocab, "layers_full": p.layers, "blocks_built": blocks},
        "calibration": {"sequences": sequences, "seq_len": seq_len, "batch_size": batch_size,
                        "tokens": report.calibration_tokens},
        "build_s": build_s,
        "compress_s": compress_s,
        "report_seconds": report.seconds,
        "timings": {k: timings.get(k) for k in TIMING_KEYS},
        "timings_extra": {k: v for k, v in timings.items() if k not in TIMING_KEYS},
        "floor_s": floor_s,
        "floor_streams": floor_streams,
        "ratio": report.seconds / floor_s if floor_s else None,
        "write_s": write_s,
        "output_bytes": out_bytes,
        "total_s": compress_s + (write_s or 0.0),
        "peak_gpu_alloc_gb": peak_alloc,
        "peak_gpu_reserved_gb": peak_reserved,
        "rss_before_compress_gb": rss_before,
        "peak_rss_gb": peak_rss,
        "layers_compressed": sum(layer.rank is not None for layer in report.layers),
        "params_dense": report.params_dense,
        "params_kept": report.params_kept,
        "kept_fraction": report.kept_fraction,
        "rel_error_after_mean": sum(errors) / len(errors) if errors else None,
        "rel_error_after_max": max(errors) if errors else None,
        "block_bytes_dense": dense_block,
        "block_bytes_kept": kept_block,
    }
    result["extrapolated"] = extrapolate(result)
    return result


def extrapolate(r: dict) -> dict:
    """The full model's numbers from a run on a fraction of its blocks (see the module docstring)."""
    full, built = r["model"]["layers_full"], r["model"]["blocks_built"]
    scale = full / built
    timings = {k: v for k, v in r["timings"].items() if v is not None}
    once = sum(v for k, v in timings.items() if k in PER_MODEL_KEYS)
    if timings:
        breakdown = {k: (v if k in PER_MODEL_KEYS else v * scale) for k, v in timings.items()}
        rest = max(r["compress_s"] - sum(timings.values()), 0.0)
        breakdown["other"] = rest * scale
        compress_s = sum(breakdown.values())
        basis = "per-block timings x blocks; capture once"
    else:
        breakdown = {}
        compress_s = r["compress_s"] * scale
        basis = "no CompressionReport.timings: the whole compress time x blocks (an upper bound)"
        once = 0.0
    missing = full - built
    write_s = out_bytes = None
    if r["write_s"] is not None and r["output_bytes"]:
        out_bytes = r["output_bytes"] + missing * r["block_bytes_kept"]
        write_s = r["write_s"] * out_bytes / r["output_bytes"]
    on_cuda = r["peak_gpu_alloc_gb"] is not None
    per_block_ram = r["block_bytes_kept"] if on_cuda else r["block_bytes_dense"]
    return {
        "measured_blocks": built, "full_blocks": full, "scale": scale, "exact": built == full,
        "basis": basis, "compress_s": compress_s, "once_s": once, "breakdown": breakdown,
        "write_s": write_s, "output_bytes": out_bytes,
        "total_s": compress_s + (write_s or 0.0),
        "peak_gpu_gb_upper": (r["peak_gpu_alloc_gb"] + missing * r["block_bytes_dense"] / 1e9) if on_cuda
        else None,
        "peak_rss_gb_upper": r["peak_rss_gb"] + missing * per_block_ram / 1e9,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.scale.compress", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-small", choices=sorted(common.PRESETS))
    ap.add_argument("--method", default="aa-svd", choices=["svd", "asvd", "svd-llm", "aa-svd"])
    ap.add_argument("--keep-ratio", type=float, default=0.6)
    ap.add_argument("--blocks", type=int, default=None, help="blocks to build and compress (default: preset)")
    ap.add_argument("--sequences", type=int, default=None, help="calibration sequences (default: preset)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: preset)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--dtype", default=None, choices=sorted(common.DTYPES), help="default: bf16 GPU, fp32 CPU")
    ap.add_argument("--stats-dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--backend", default=None, choices=["torch", "triton", "cuda"],
                    help="force the ops' backend (PREHAB_SVD_BACKEND); default: the library's choice")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                    help="initialize GPU libraries on a tiny model first (default: on for cuda)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="time the forward floor before compressing (default: on)")
    ap.add_argument("--no-save", action="store_true", help="skip writing the output")
    ap.add_argument("--workdir", default=None, help="where the output is written (then deleted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here (atomically)")
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    result = run(args)
    if args.json:
        common.write_json(args.json, result)
    ex = result["extrapolated"]
    print(f"{result['preset']} {result['method']} keep {result['keep_ratio']}: {result['model']['blocks_built']}/"
          f"{result['model']['layers_full']} blocks, {result['calibration']['tokens']:,} tokens: compress "
          f"{result['compress_s']:.1f} s"
          + (f" (forward floor {result['floor_s']:.2f} s, ratio {result['ratio']:.1f})"
             if result["floor_s"] else "")
          + f", write {result['write_s'] or 0:.1f} s; full model "
          f"{'measured' if ex['exact'] else 'extrapolated'} {ex['total_s']:.1f} s; peak RSS "
          f"{result['peak_rss_gb']:.2f} GB" + (f", peak GPU {result['peak_gpu_alloc_gb']:.2f} GB"
                                              if result['peak_gpu_alloc_gb'] is not None else ""))
    return result


if __name__ == "__main__":
    main()
