"""Seconds and phases of one compression of SmolLM2 (the default calibration: 64 windows x 256 tokens).

    python scripts/compress_timing.py [--method svd-llm] [--keep 0.8] [--stats-dtype float32|float64]

Prints one JSON line: ``report.seconds``, ``report.timings`` (capture, check, forward, covariance,
factorize) and the process's peak RSS. One configuration per process, so the runs do not share caches.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prehab_svd import compress, data, load_pretrained  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="svd-llm")
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--stats-dtype", choices=["float32", "float64"], default=None,
                    help="default: the library's")
    args = ap.parse_args()
    model, tok = load_pretrained("smollm2")
    calib = data.causal_lm_batches(tok, data.load_texts("builtin", "train"), num_samples=64, seq_len=256,
                                   batch_size=8, seed=0)
    kw = {} if args.stats_dtype is None else {"stats_dtype": getattr(torch, args.stats_dtype)}
    rep = compress(model, args.method, args.keep, calib, **kw)
    print(json.dumps({"method": args.method, "keep": args.keep, "stats_dtype": args.stats_dtype,
                      "seconds": round(rep.seconds, 1),
                      "timings": {k: round(v, 1) for k, v in rep.timings.items() if v},
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


if __name__ == "__main__":
    main()
