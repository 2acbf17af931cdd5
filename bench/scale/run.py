"""Run the scale benchmarks of a configuration, each measurement in its own process, within a budget.

    python -m bench.scale.run --config cpu --out results --prefix scale_cpu
    python -m bench.scale.run --config gpu --parts compress --out $OUT --prefix scale_gpu_compress --budget-s 480

Configurations (``--config``): ``cpu`` (the scaled-down shapes, a few runs each, medians), ``gpu`` (the
LLaMA-7B shapes on one GPU: a measured fraction of the blocks, extrapolated), ``tiny`` (seconds; the
smoke test). Parts (``--parts``): compress, factorize, layers, inference, profile.

Every job is a subprocess (so peak RSS is per run and a crash or a hang costs one row), killed with
its process group when it outlives its timeout or the remaining budget; jobs that no longer fit are
listed as skipped. Writes ``<prefix>.json``, ``<prefix>.md`` (rendered by :mod:`bench.scale.report`),
``<prefix>_layers.png`` with a layer sweep, and ``<prefix>.log`` (every job's output).
"""

from __future__ import annotations

from bench.scale import common  # first: sets the environment (offline hub, tokenizers) before they load

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.scale import report  # noqa: E402

PARTS = ("compress", "factorize", "layers", "inference", "profile")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Job:
    part: str
    label: str
    argv: list  # after "python -m"
    timeout_s: float
    repeat: int = 1
    json_flag: bool = True  # the module takes --json PATH (profile jobs print JSON instead)
    min_s: float = 0.0  # do not start with less budget left than this
    budget_flag: bool = False  # pass --budget-s (what is left, minus a margin)
    blocks_choices: tuple = ()  # compress: the most blocks (of these) that the estimate says still fit
    extra: dict = field(default_factory=dict)


def _compress(preset, method, blocks=None, repeat=1, timeout=600.0, min_s=0.0, extra=(), choices=()):
    argv = ["bench.scale.compress", "--preset", preset, "--method", method, *extra]
    if blocks:
        argv += ["--blocks", str(blocks)]
    label = f"compress {preset} {method}" + (f" blocks={blocks}" if blocks else "")
    return Job("compress", label, argv, timeout, repeat, min_s=min_s, blocks_choices=tuple(choices))


def estimate_compress_s(done: list, jobs: list, blocks: int) -> float | None:
    """Seconds a compress job of ``blocks`` blocks should take, from the runs so far: the largest
    per-block cost seen (the compress time less the capture, per block) times ``blocks``, plus the
    largest fixed cost (the job's wall time less its compress time: start-up, model build, save), with
    a 25% margin. None before any run."""
    if not done:
        return None
    per_block = max((r["compress_s"] - (r["timings"].get("capture") or 0.0)) / r["model"]["blocks_built"]
                    for r in done)
    fixed = max(j["seconds"] / max(j["runs"], 1) - r["compress_s"] for r, j in zip(done, jobs))
    return 1.25 * (per_block * blocks + max(fixed, 0.0))


def _choose_blocks(job: Job, res: dict, left: float) -> Job | None:
    """The job with --blocks set to the most of ``job.blocks_choices`` that fits in ``left`` seconds."""
    if not job.blocks_choices:
        return job
    jobs = [j for j in res["jobs"] if j["label"].startswith("compress") and j["runs"]]
    for b in sorted(job.blocks_choices, reverse=True):
        est = estimate_compress_s(res["compress"], jobs, b)
        if est is None or est <= min(job.timeout_s, left):
            label = job.label + f" blocks={b}"
            return Job(job.part, label, job.argv + ["--blocks", str(b)], job.timeout_s, job.repeat,
                       min_s=job.min_s)
    return None


def _profile(stage, trace_dir, args, timeout=300.0):
    trace = Path(trace_dir) / f"profile_{stage}.json"
    argv = ["prehab_svd.cli", "profile", stage, "--trace", str(trace), "--overwrite", "--json", "--top", "12",
            *args]
    return Job("profile", f"profile {stage}", argv, timeout, json_flag=False, extra={"trace": trace})


def plan(config: str, trace_dir: str) -> list:
    """The jobs of a configuration, most important first within each part."""
    if config == "tiny":
        return [
            _compress("tiny", "svd-llm", timeout=300),
            _compress("tiny", "aa-svd", blocks=1, repeat=2, timeout=300),
            Job("factorize", "factorize tiny", ["bench.scale.factorize", "--sizes", "tiny", "--reps", "1"], 300),
            Job("layers", "layers tiny", ["bench.scale.layers", "--sizes", "tiny", "--keeps", "0.6", "--reps",
                                          "2"], 300),
            Job("inference", "inference tiny", ["bench.scale.inference", "--preset", "tiny", "--keep-ratios",
                                                "1.0", "0.6", "--batches", "1", "2", "--reps", "1"], 300),
            _profile("lowrank", trace_dir, ["--in-features", "64", "--out-features", "96", "--tokens", "4",
                                            "--steps", "1", "--warmup", "1"]),
        ]
    if config == "cpu":
        return [
            _compress("cpu-small", "aa-svd", repeat=3),
            _compress("cpu-small", "svd-llm", repeat=3),
            _compress("cpu-small-gqa", "aa-svd", repeat=3),
            # the extrapolation checked against the measurement above: 1 of the 4 blocks
            _compress("cpu-small", "aa-svd", blocks=1, repeat=3),
            Job("factorize", "factorize reduced", ["bench.scale.factorize", "--sizes", "reduced"], 900),
            Job("factorize", "factorize reduced, LLM-like conditioning",
                ["bench.scale.factorize", "--sizes", "reduced", "--decades", "3", "--outlier", "30",
                 "--variants", "fp64", "fp32", "fp32-svd+rr64", "--reps", "1"], 600),
            Job("layers", "layers cpu", ["bench.scale.layers", "--sizes", "cpu"], 900),
            Job("inference", "inference cpu-medium",
                ["bench.scale.inference", "--preset", "cpu-medium", "--modes", "eager", "compile",
                 "--compile-keeps", "1.0", "0.6", "--batches", "1", "16"], 2400),
            _profile("calibration", trace_dir, []),
            _profile("lowrank", trace_dir, ["--in-features", "1024", "--out-features", "2752", "--tokens", "16"]),
            _profile("decode", trace_dir, ["--hidden", "1024", "--intermediate", "2752", "--layers", "8",
                                           "--heads", "16", "--kv-heads", "16", "--vocab", "4096"]),
        ]
    if config == "gpu":
        seven = ["--hidden", "4096", "--intermediate", "11008", "--heads", "32", "--vocab", "32000"]
        return [
            # 1 block first (certain to fit), then as many as the first run says still fit; a second
            # aa-svd run with 2 blocks gives the marginal cost of a block without the fixed costs
            _compress("7b", "aa-svd", blocks=1, timeout=300, min_s=120),
            _compress("7b", "svd-llm", timeout=240, min_s=60, choices=(2, 1)),
            _compress("7b-gqa", "aa-svd", timeout=200, min_s=60, choices=(1,)),
            _compress("7b", "aa-svd", timeout=300, min_s=60, choices=(2,)),
            # kernels part: the short, bounded jobs first; the factorizations take what is left
            Job("layers", "layers 7b", ["bench.scale.layers", "--sizes", "7b"], 120, min_s=30, budget_flag=True),
            _profile("lowrank", trace_dir, ["--device", "cuda", "--in-features", "4096", "--out-features",
                                            "11008", "--tokens", "16"], timeout=120),
            _profile("calibration", trace_dir, ["--device", "cuda", *seven, "--layers", "1", "--kv-heads", "32",
                                                "--batch-size", "2", "--seq-len", "2048", "--steps", "2"],
                     timeout=150),
            _profile("decode", trace_dir, ["--device", "cuda", *seven, "--layers", "4", "--kv-heads", "32",
                                           "--seq-len", "512"], timeout=150),
            # one run per variant: large GPU factorizations time consistently, and more variants fit
            Job("factorize", "factorize full", ["bench.scale.factorize", "--sizes", "full", "--reps", "1"], 400,
                min_s=60, budget_flag=True),
            Job("inference", "inference 7b",
                ["bench.scale.inference", "--preset", "7b", "--modes", "eager", "cudagraphs", "compile",
                 "--compile-keeps", "1.0", "0.6", "--backends", "auto", "triton", "--batches", "1", "16"],
                560, min_s=120, budget_flag=True),
        ]
    raise SystemExit(f"unknown config {config!r}")


# a part's share of the budget left when it starts, relative to the parts still to come
PART_WEIGHTS = {"compress": 0.35, "factorize": 0.15, "layers": 0.07, "profile": 0.08, "inference": 0.35}


def part_share(deadline: common.Deadline, part: str, parts: list, started: list) -> common.Deadline:
    """The deadline of ``part``: its weight's share of what is left, against the parts not started yet
    (what a part leaves unused flows to the later ones). Without a budget, no limit."""
    left = deadline.left()
    if left == float("inf"):
        return deadline
    later = {p for p in parts if p not in started}
    total = PART_WEIGHTS[part] + sum(PART_WEIGHTS[p] for p in later)
    return common.Deadline(left * PART_WEIGHTS[part] / total)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_job(job: Job, deadline: common.Deadline, log, workdir: Path) -> tuple[list, str | None]:
    """Run a job ``repeat`` times; returns (results, error or None)."""
    results = []
    for i in range(job.repeat):
        left = deadline.left()
        if left < max(job.min_s, 5.0):
            return results, f"skipped ({left:.0f} s of the budget left)" if not results else None
        timeout = min(job.timeout_s, left)
        out_json = workdir / f"job-{time.monotonic_ns()}.json"
        cmd = [sys.executable, "-m", *job.argv]
        if job.budget_flag:
            cmd += ["--budget-s", f"{max(timeout - 20, 10):.0f}"]
        if job.json_flag:
            cmd += ["--json", str(out_json)]
        log.write(f"\n### {job.label} (run {i + 1}/{job.repeat}, timeout {timeout:.0f} s)\n$ {' '.join(cmd)}\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            output, _ = proc.communicate()
            log.write(output or "")
            return results, f"timed out after {timeout:.0f} s (run {i + 1})"
        log.write(output or "")
        log.write(f"[exit {proc.returncode} after {time.perf_counter() - t0:.1f} s]\n")
        log.flush()
        if proc.returncode != 0:
            tail = " | ".join((output or "").strip().splitlines()[-3:])
            return results, f"exit status {proc.returncode}: {tail[-400:]}"
        if job.json_flag:
            results.append(json.loads(out_json.read_text()))
        else:  # profile: the table is printed, then one JSON line
            lines = (output or "").strip().splitlines()
            data = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
            table = "\n".join(line for line in lines if not line.startswith("{") and "USDT:" not in line)
            results.append({"stage": data["stage"], "command": "prehab-svd " + " ".join(job.argv[1:]),
                            "table": table, "result": data})
    return results, None


def median_result(results: list):
    """Per-field medians of repeated runs (peaks: the maximum; strings and lists: the first run's)."""
    if len(results) == 1:
        return {**results[0], "runs": 1}

    def merge(values, key=""):
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v.get(k) for v in values], k) for k in first}
        if isinstance(first, bool) or not isinstance(first, (int, float)):
            return first
        nums = [v for v in values if isinstance(v, (int, float))]
        if all(v == nums[0] for v in nums):
            return nums[0]  # e.g. block and token counts: keep them exact (and ints)
        return max(nums) if "peak" in key else statistics.median(nums)

    out = merge(results)
    out["runs"] = len(results)
    out["compress_s_runs"] = [r["compress_s"] for r in results]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.scale.run", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, choices=["cpu", "gpu", "tiny"])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--prefix", default=None, help="file name prefix (default scale_<config>)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run")
    ap.add_argument("--traces", default=None, help="folder for the profiles' Chrome traces (default: a "
                                                   "temporary folder, deleted)")
    ap.add_argument("--gpu-placeholder", action="store_true",
                    help="add the empty GPU tables and the commands that fill them to the Markdown")
    ap.add_argument("--note", action="append", default=[], help="a line for the results file")
    args = ap.parse_args(argv)
    deadline = common.Deadline(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / (args.prefix or f"scale_{args.config}")
    device = "cuda" if args.config == "gpu" else "cpu"
    with tempfile.TemporaryDirectory(prefix="prehab-scale-") as tmp:
        trace_dir = args.traces or tmp
        jobs = [j for j in plan(args.config, trace_dir) if j.part in args.parts]
        res = {"schema": common.SCHEMA, "config": args.config, "parts": args.parts,
               "meta": {"env": common.environment(device),
                        "commands": [shlex.join(["python", "-m", "bench.scale.run", *(argv or sys.argv[1:])])],
                        "notes": list(args.note)},
               "compress": [], "factorize": [], "layers": None, "inference": None, "profile": [],
               "failures": [], "skipped": [], "jobs": []}
        log_path = prefix.with_name(prefix.name + ".log")
        with open(log_path, "w") as log:
            started: list = []
            part_deadline = deadline
            for job in jobs:
                t0 = time.perf_counter()
                if job.part not in started:  # a new part: its share of what is left
                    started.append(job.part)
                    part_deadline = part_share(deadline, job.part, [j.part for j in jobs], started)
                chosen = _choose_blocks(job, res, part_deadline.left())
                if chosen is None:
                    res["skipped"].append(f"{job.label}: no block count of {list(job.blocks_choices)} fits the "
                                          f"{part_deadline.left():.0f} s left (estimated from the runs so far)")
                    print(f"[{time.strftime('%H:%M:%S')}] {res['skipped'][-1]}", flush=True)
                    continue
                job = chosen
                results, error = run_job(job, part_deadline, log, Path(tmp))
                res["jobs"].append({"label": job.label, "seconds": time.perf_counter() - t0, "runs": len(results),
                                    "error": error})
                left = f" ({deadline.left():.0f} s of the budget left)" if args.budget_s else ""
                print(f"[{time.strftime('%H:%M:%S')}] {job.label}: {len(results)} run(s)"
                      + (f"; {error}" if error else "") + left, flush=True)
                if error:
                    (res["skipped"] if error.startswith("skipped") else res["failures"]).append(
                        f"{job.label}: {error}")
                if not results:
                    continue
                if job.part == "compress":
                    res["compress"].append({**median_result(results), "label": job.label})
                elif job.part == "factorize":
                    res["factorize"].append({**results[0], "label": job.label})
                elif job.part in ("layers", "inference"):
                    res[job.part] = results[0]
                else:
                    res["profile"] += results
        res["meta"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        title = {"cpu": "Scale benchmarks, scaled-down CPU configuration",
                 "gpu": "Scale benchmarks on the GPU (LLaMA-7B shapes)", "tiny": "Scale benchmarks (smoke run)"}
        paths = report.write_outputs(res, prefix, title=title[args.config], gpu_placeholder=args.gpu_placeholder)
    for k, v in paths.items():
        print(f"wrote {v}")
    print(f"wrote {log_path}")
    return res


if __name__ == "__main__":
    main()
