"""Benchmarks of whole compressions against their forward floor: ``prehab_svd.compress`` per method
and model, and the forwards it must make over the same calibration, alone
(:func:`prehab_svd.profiling.forward_floor`, one stream, aa-svd two), in the same module and run.

Each ``test_compress`` case times the floor first (a fresh model per round, one untimed batch through
the same path, then the timed floor), then ``compress`` (a fresh model per round, loaded outside the
timing), and stores in ``extra_info``: the median total (``report.seconds``), the median of each phase
(``CompressionReport.timings``), the median floor and ``ratio`` = total / floor, with every round's
numbers. ``test_forward_floor`` times the floor alone, as its own row. At the end of a timed run
bench/conftest.py prints them as one table (method, total, floor, ratio, phases).

Models (``PREHAB_BENCH_COMPRESS_MODELS``, comma-separated; default ``tiny``): ``tiny`` (a random
2-block LLaMA, seconds), ``minilm`` and ``smollm2`` (the real models with the default calibration of
scripts/compress_speed.py; each skips itself when its package is not installed; SmolLM2 takes minutes
a method on a CPU). Rounds: ``PREHAB_BENCH_COMPRESS_ROUNDS`` (default 3 for tiny, 1 for the others).
7B shapes on a GPU: ``python -m bench.scale.compress --preset 7b`` (the scale runner), which reports the
same floor and ratio. Examples::

    pytest bench/test_bench_compress.py --benchmark-disable          # smoke: each case once
    pytest bench/test_bench_compress.py --benchmark-json=compress.json
    PREHAB_BENCH_COMPRESS_MODELS=tiny,minilm,smollm2 pytest bench/test_bench_compress.py

Timings on a shared, loaded CPU mean little (OpenMP threads waiting for a busy core): time on a quiet
machine.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
for _p in (str(_ROOT), str(_ROOT / "scripts")):
    if _p not in sys.path:  # bench/ and scripts/ are not installed: import them from the checkout
        sys.path.insert(0, _p)

import compress_speed  # noqa: E402  (scripts/compress_speed.py: the models and their calibration)

from prehab_svd import compress  # noqa: E402
from prehab_svd.errors import PrehabError  # noqa: E402
from prehab_svd.methods import get as get_method  # noqa: E402
from prehab_svd.profiling import forward_floor  # noqa: E402

METHODS = ["svd", "svd-llm", "aa-svd", "asvd"]
KEEP = compress_speed.DEFAULT_KEEP
MODELS = [m.strip() for m in os.environ.get("PREHAB_BENCH_COMPRESS_MODELS", "tiny").split(",") if m.strip()]


def _device() -> torch.device:  # same rule as conftest.bench_device (not imported: name clash with tests/)
    forced = os.environ.get("PREHAB_BENCH_DEVICE")
    return torch.device(forced or ("cuda" if torch.cuda.is_available() else "cpu"))


DEVICE = _device()


def _rounds(model: str, disabled: bool) -> int:
    if disabled:
        return 1
    env = os.environ.get("PREHAB_BENCH_COMPRESS_ROUNDS")
    return int(env) if env else (3 if model == "tiny" else 1)


def _require(model: str) -> None:
    """Skip (with the reason) when a real model's package is not installed."""
    from prehab_svd import pretrained

    if model not in compress_speed.MODELS:
        pytest.fail(f"unknown model {model!r} in PREHAB_BENCH_COMPRESS_MODELS; use {compress_speed.MODELS}")
    try:
        if model == "minilm":
            pretrained.minilm_dir()
        elif model == "smollm2":
            pretrained.smollm2_gguf()
    except PrehabError as e:
        pytest.skip(str(e))


@functools.lru_cache(maxsize=None)
def _calibration(model: str):
    return compress_speed.calibration(model)


def _fresh(model: str):
    return compress_speed.load_model(model, DEVICE)


def _floor(model: str, batches, streams: int) -> float:
    """One floor measurement on a fresh model, after one untimed batch through the same path."""
    m = _fresh(model)
    forward_floor(m, batches[:1], streams=streams, check=False)
    return forward_floor(m, batches, streams=streams)


def _median_timings(reports) -> dict:
    keys = dict.fromkeys(k for r in reports for k in r.timings)
    return {k: statistics.median(r.timings.get(k, 0.0) for r in reports) for k in keys}


def _env_info() -> dict:
    return {"device": str(DEVICE), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": compress_speed.cpu_model()}


@pytest.mark.filterwarnings("ignore:.*wider than the .* calibration tokens")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", MODELS)
def test_compress(benchmark, model, method):
    _require(model)
    batches, desc = _calibration(model)
    streams = get_method(method).streams
    rounds = _rounds(model, getattr(benchmark, "disabled", False))
    floors = [_floor(model, batches, streams) for _ in range(rounds)]
    reports = []

    def setup():
        return (_fresh(model),), {}

    def run(m):
        report = compress(m, method, KEEP, batches)
        reports.append(report)
        return report

    benchmark.group = f"compress {model} keep {KEEP}"
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=0)
    seconds = statistics.median(r.seconds for r in reports)
    floor_s = statistics.median(floors)
    benchmark.extra_info.update(
        kind="compress", variant=method, model=model, method=method, keep=KEEP, streams=streams,
        floor_basis=compress_speed.floor_basis(method), calibration=desc,
        calibration_tokens=reports[0].calibration_tokens, seconds=seconds,
        timings=_median_timings(reports), floor_s=floor_s, ratio=seconds / floor_s,
        seconds_runs=[r.seconds for r in reports], floor_runs=floors, **_env_info())
    assert floor_s > 0 and seconds > 0
    assert reports[0].calibration_tokens > 0 and 0 < reports[0].kept_fraction < 1


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("model", MODELS)
def test_forward_floor(benchmark, model, streams):
    _require(model)
    batches, desc = _calibration(model)
    m = _fresh(model)
    forward_floor(m, batches[:1], streams=streams, check=False)  # warm-up, untimed
    rounds = _rounds(model, getattr(benchmark, "disabled", False))
    seconds = []

    def run():
        seconds.append(forward_floor(m, batches, streams=streams))

    benchmark.group = f"compress {model} keep {KEEP}"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0)
    benchmark.extra_info.update(kind="floor", variant=f"floor x{streams}", model=model, streams=streams,
                                calibration=desc, floor_s=statistics.median(seconds), floor_runs=seconds,
                                **_env_info())
    assert all(s > 0 for s in seconds)
