"""Compression time against its forward floor, per method, on one model (CPU or GPU).

For each method, in a fresh (just loaded) model: the forward floor of the method's streams
(:func:`prehab_svd.profiling.forward_floor`: the forwards the compression must make over the
calibration tokens, alone, after one untimed batch through the same path), then
``prehab_svd.compress`` on the same model and calibration; one JSON line per method is appended to
``--out`` (a ``.jsonl``): model, method, keep, seconds, timings (the library's phases), floor_s,
ratio (seconds / floor_s), torch version, threads, CPU model, date and the command line.

    python scripts/compress_speed.py smollm2 --out results/compress_speed.jsonl
    python scripts/compress_speed.py minilm --out results/compress_speed.jsonl --methods svd-llm aa-svd
    python scripts/compress_speed.py --table results/compress_speed.jsonl > results/compress_speed.md

Models and their default calibration:

* ``smollm2``: SmolLM2-135M-Instruct (``prehab_svd.load_pretrained``), 64 windows of 256 tokens of the
  built-in corpus in batches of 8, seed 0 (as scripts/compress_timing.py and the SmolLM2 tables);
* ``minilm``: all-MiniLM-L6-v2, the MiniLM demo's calibration: the first 256 built-in training
  sentences, batches of 32, at most 128 tokens (``prehab_svd.demo_encoder.run_demo``);
* ``tiny``: a random 2-block LLaMA (hidden 64), 4 batches of 2 x 32 random tokens: seconds, for tests.

The floor of aa-svd is two streams (the original and the compressed model on the same tokens), of
svd, asvd and svd-llm one. zs-svd is measured against the one-stream floor too, and says so in its
row: it makes two one-stream block passes (its spectra, then its factors) plus forward and backward
passes for its task gradients, so its own floor is above twice that one.

Timings on a shared machine mean little: run on a quiet one, one model per process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.scale.common import cpu_model  # noqa: E402  (the scale benchmarks' CPU name)

MODELS = ("tiny", "minilm", "smollm2")
DEFAULT_METHODS = ("svd-llm", "aa-svd", "svd", "asvd")
DEFAULT_KEEP = 0.8
PHASES = ("forward", "covariance", "factorize", "check")  # the table's columns; the rest is "other"

TINY = dict(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=128)


# --------------------------------------------------------------------------------------------------
# models and their calibration


def calibration(name: str) -> tuple[list, str]:
    """(the default calibration batches of model ``name``, a description of them)."""
    from prehab_svd import data
    from prehab_svd.pretrained import load_tokenizer, resolve_model_path

    if name == "tiny":
        g = torch.Generator().manual_seed(1)
        return ([torch.randint(0, TINY["vocab"], (2, 32), generator=g) for _ in range(4)],
                "4 batches of 2 x 32 random tokens")
    tok = load_tokenizer(resolve_model_path(name))
    if name == "smollm2":
        return (data.causal_lm_batches(tok, data.load_texts("builtin", "train"), num_samples=64, seq_len=256,
                                       batch_size=8, seed=0),
                "64 windows x 256 tokens of the built-in corpus, batches of 8, seed 0")
    if name == "minilm":
        texts = data.load_texts("builtin", "train")[:256]
        return (data.sentence_batches(tok, texts, batch_size=32, max_length=128),
                "the first 256 built-in training sentences, batches of 32, at most 128 tokens")
    raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def load_model(name: str, device=None):
    """A fresh copy of model ``name`` (eval mode), on ``device`` when given."""
    if name == "tiny":
        from prehab_svd.profiling import small_llama

        return small_llama(**TINY, device=device or "cpu", seed=0)
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    from prehab_svd import load_pretrained

    model, _tok = load_pretrained(name, device=device)
    return model.eval()


def floor_basis(method: str) -> str:
    """What the ratio of ``method`` is measured against."""
    from prehab_svd.methods import get

    streams = get(method).streams
    if method == "zs-svd":
        return ("the one-stream floor; zs-svd makes two one-stream block passes (spectra, factors) plus "
                "forward and backward passes for its task gradients, so its own floor is above twice this one")
    return "the two-stream floor" if streams == 2 else "the one-stream floor"


# --------------------------------------------------------------------------------------------------
# measuring


def _tokens(batches) -> int:
    n = 0
    for b in batches:
        if isinstance(b, torch.Tensor):
            n += b.numel()
        elif isinstance(b.get("attention_mask"), torch.Tensor):
            n += int(b["attention_mask"].sum())
        else:
            n += b["input_ids"].numel()
    return n


def measure(model_name: str, method: str, keep: float, batches, *, device=None, warmup: bool = True,
            command: str = "", calib_desc: str = "", pause_forwards: bool = False) -> dict:
    """One row: a fresh model, its forward floor for the method's streams, then its compression."""
    import transformers

    from prehab_svd import compress
    from prehab_svd.methods import get
    from prehab_svd.profiling import forward_floor

    streams = get(method).streams
    model = load_model(model_name, device)
    dev = next(model.parameters()).device
    if warmup:
        forward_floor(model, batches[:1], streams=streams, check=False)
    floor_s = forward_floor(model, batches, streams=streams)
    report = compress(model, method, keep, batches, pause_forwards=pause_forwards)
    del model
    import resource
    return {
        "model": model_name, "method": method, "keep": keep,
        "seconds": report.seconds, "timings": dict(report.timings),
        "floor_s": floor_s, "floor_streams": streams, "floor_basis": floor_basis(method),
        "ratio": report.seconds / floor_s,
        "kept_fraction": report.kept_fraction, "calibration_tokens": report.calibration_tokens,
        "calibration": calib_desc or f"{len(batches)} batches, {_tokens(batches)} tokens",
        "warmup": warmup,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "code": code_version(),
        "pause_forwards": pause_forwards,
        # the process's peak so far (ru_maxrss): one method per process to attribute it
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def code_version() -> str:
    """The library's git commit (``+changes`` when its files differ from it), or "-" outside a checkout."""
    import subprocess

    pkg = Path(sys.modules["prehab_svd"].__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return head + ("+changes" if dirty else "")


def append_row(path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# the table


def read_rows(path) -> list:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise SystemExit(f"{path}:{i}: not a JSON line ({e})") from None
    return rows


def _s(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def other_seconds(row: dict) -> float:
    """The part of ``seconds`` outside the table's phases: capture, zs-svd's gradients, the driver."""
    t = row.get("timings") or {}
    return row["seconds"] - sum(t.get(k) or 0.0 for k in PHASES)


def render_table(rows: list) -> str:
    """Markdown: one table per (model, keep, device), the rows in file order."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["keep"], r.get("device", "cpu")), []).append(r)
    out = []
    head = ["method", "code", "total s", "floor s", "ratio", "forward", "covariance", "factorize", "check", "other"]
    for (model, keep, device), rs in groups.items():
        envs = sorted({(r.get("cpu"), r.get("threads"), r.get("torch")) for r in rs}, key=str)
        dates = sorted(r.get("date", "") for r in rs)
        out += [f"### {model}, keep {keep}", ""]
        out.append(f"- calibration: {rs[0].get('calibration', '-')} ({rs[0].get('calibration_tokens', '-')} tokens)")
        for cpu, threads, tv in envs:
            out.append(f"- device {device}; CPU {cpu}, {threads} torch threads; torch {tv}")
        out.append(f"- measured {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""))
        for cmd in dict.fromkeys(r.get("command") for r in rs if r.get("command")):
            out.append(f"- command: `{cmd}`")
        out += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        notes = []
        for r in rs:
            t = r.get("timings") or {}
            name = r["method"] + (" (pause_forwards)" if r.get("pause_forwards") else "")
            if ";" in r.get("floor_basis", ""):  # measured against a floor below its own (zs-svd)
                notes.append(f"{r['method']}: ratio to the {r['floor_basis']}")
                name += " *"
            out.append("| " + " | ".join([name, r.get("code", "-"), _s(r["seconds"]), _s(r["floor_s"]), f"{r['ratio']:.1f}",
                                          *(_s(t.get(k)) for k in PHASES), _s(other_seconds(r))]) + " |")
        out += ["", "Seconds. `floor s`: the forwards the method must make over the calibration tokens, alone "
                "(`prehab_svd.profiling.forward_floor`; one stream, aa-svd two), timed in the same run just "
                "before the compression; `ratio` = total / floor. The phases are `CompressionReport.timings` "
                "(`forward` excludes covariance and factorize; `check` is the forward that verifies the block "
                "chain); `other` is the rest of the total (capturing the first block's inputs, zs-svd's "
                "gradients, the driver). `code`: the library's git commit."]
        out += [f"* {n}." for n in dict.fromkeys(notes)]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from prehab_svd import METHODS

    ap = argparse.ArgumentParser(prog="python scripts/compress_speed.py", description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", choices=MODELS, help="the model to compress (not with --table)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--keep", type=float, default=DEFAULT_KEEP, help="keep_ratio (default %(default)s)")
    ap.add_argument("--out", help="the .jsonl file the rows are appended to")
    ap.add_argument("--device", default=None, help="default: where the model loads (the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed batch before the floor")
    ap.add_argument("--pause-forwards", action="store_true",
                    help="compress(pause_forwards=True): aa-svd's forwards run once each, paused per group")
    ap.add_argument("--table", metavar="JSONL", help="print the Markdown table of a .jsonl's rows, and exit")
    return ap


def main(argv=None) -> list:
    args = parser().parse_args(argv)
    if args.table:
        if args.model:
            raise SystemExit("--table renders an existing file: give no model with it")
        print(render_table(read_rows(args.table)), end="")
        return []
    if not args.model or not args.out:
        raise SystemExit("give a model and --out (or --table FILE)")
    from prehab_svd.utils import check_keep_ratio

    check_keep_ratio(args.keep)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python", "scripts/compress_speed.py",
                        *(sys.argv[1:] if argv is None else [str(a) for a in argv])])
    batches, desc = calibration(args.model)
    rows = []
    for method in args.methods:
        t0 = time.perf_counter()
        row = measure(args.model, method, args.keep, batches, device=args.device, warmup=args.warmup,
                      pause_forwards=args.pause_forwards,
                      command=command, calib_desc=desc)
        append_row(args.out, row)
        rows.append(row)
        print(f"{args.model} {method} keep {args.keep}: {row['seconds']:.2f} s, forward floor "
              f"{row['floor_s']:.2f} s ({row['floor_streams']} stream{'s' if row['floor_streams'] > 1 else ''}), "
              f"ratio {row['ratio']:.1f} (row {time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


if __name__ == "__main__":
    main()
