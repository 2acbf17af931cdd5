"""Fixtures and reporting for the op benchmarks (pytest-benchmark).

Run (not part of CI's ``pytest tests``)::

    pytest bench                         # time everything, print the table and achieved rates
    pytest bench --benchmark-disable     # smoke run: every case once, no timing (fast on CPU)
    pytest bench --benchmark-json=out.json --benchmark-columns=median,iqr,rounds
    PREHAB_BENCH_DEVICE=cpu pytest bench # force the CPU shapes on a GPU machine

Each case stores ``extra_info`` with ``flops`` and ``bytes`` (the minimum memory traffic of that
variant). At the end of a timed run this file prints achieved GFLOP/s and GB/s per case, against the
device's measured peaks (a large matmul and a large copy, measured once per session); the peaks are
also written into the JSON's ``machine_info["prehab_peaks"]``. The compression benchmarks
(test_bench_compress.py, ``extra_info["kind"]`` "compress" or "floor") get their own table instead:
total seconds, forward floor, ratio and phases per model and method.
"""

from __future__ import annotations

import os
import sys

# A smoke run (--benchmark-disable) only checks that every case runs. On a shared, oversubscribed CPU,
# OpenMP threads spin-waiting at barriers made one LAPACK SVD 40x slower (measured on the 2-core dev
# machine under load: 24 s instead of 0.5 s for 1024x1024 with 2 threads); passive waiting avoids it.
# It must be set before torch loads its OpenMP runtime. Timed runs keep the defaults: set
# OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1) yourself when timing on a busy machine.
if "--benchmark-disable" in sys.argv and "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


def bench_device() -> torch.device:
    forced = os.environ.get("PREHAB_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture
def timed(benchmark, device):
    """``timed(fn, group=..., **extra_info)``: benchmark fn after one warm-up call, so that the time
    covers the kernels, not just their launch.

    CPU: every call is timed on its own. CUDA: a host synchronization after every call would add its
    own ~10 µs to each one and squeeze the ratios of short calls (batch-1 decode) toward 1, so each
    round makes ``iterations`` calls (enough for about a millisecond) and synchronizes once, after
    the last; pytest-benchmark divides the round's time by the calls.
    """

    def run(fn, *, group: str, **info):
        benchmark.group = group
        benchmark.extra_info.update({"device": str(device), **info})

        def call():
            out = fn()
            synchronize(device)
            return out

        if getattr(benchmark, "disabled", False):
            return benchmark(call)
        call()  # warm-up: lazy init, cuBLAS handles, allocator
        if device.type != "cuda":
            return benchmark(call)
        import math
        import time

        t0 = time.perf_counter()
        call()
        one = max(time.perf_counter() - t0, 1e-6)
        iterations = max(1, min(1000, math.ceil(1e-3 / one)))
        rounds = max(5, min(100, int(0.5 / (iterations * one))))
        count = [0]

        def batched():  # the last call of each round synchronizes: the round's time covers its kernels
            count[0] += 1
            out = fn()
            if count[0] % iterations == 0:
                synchronize(device)
            return out

        benchmark.extra_info.update(iterations=iterations, rounds=rounds)
        return benchmark.pedantic(batched, rounds=rounds, iterations=iterations, warmup_rounds=1)

    return run


# ---------------------------------------------------------------------------------------------
# device peaks and the achieved-rate report
# ---------------------------------------------------------------------------------------------

def measure_peaks(device: torch.device) -> dict:
    """Achievable matmul FLOP/s and copy bandwidth on this device (the library's measurement, cached
    per process), with the keys the tables below use."""
    from prehab_svd.profiling import measure_peaks as _measure

    peaks = dict(_measure(device))
    peaks["matmul_gflops"] = peaks["matmul_tflops"] * 1e3
    peaks.update(torch=torch.__version__, threads=torch.get_num_threads())
    return peaks


def _timed_benchmarks(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or getattr(session, "disabled", False):
        return []
    return [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None) is not None]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    if _timed_benchmarks(config):
        machine_info["prehab_peaks"] = measure_peaks(bench_device())


_COMPRESS_KINDS = ("compress", "floor")


def _compress_summary(tr, benches) -> None:
    rows = [b for b in benches if b.extra_info.get("kind") == "compress"]
    floors = [b for b in benches if b.extra_info.get("kind") == "floor"]
    if not rows and not floors:
        return
    tr.section("prehab-svd compression against its forward floor (medians, seconds)")
    phases = ("forward", "covariance", "factorize", "check")
    tr.write_line(f"{'model':<10} {'method':<10} {'total':>9} {'floor':>9} {'ratio':>7} "
                  + " ".join(f"{p:>10}" for p in phases) + f" {'other':>9}")
    for b in sorted(rows, key=lambda b: (b.extra_info["model"], b.extra_info["method"])):
        i, t = b.extra_info, b.extra_info.get("timings", {})
        other = i["seconds"] - sum(t.get(p, 0.0) for p in phases)
        tr.write_line(f"{i['model'][:10]:<10} {i['method'][:10]:<10} {i['seconds']:>9.3f} {i['floor_s']:>9.3f} "
                      f"{i['ratio']:>7.1f} " + " ".join(f"{t.get(p, 0.0):>10.3f}" for p in phases)
                      + f" {other:>9.3f}")
    for b in sorted(floors, key=lambda b: (b.extra_info["model"], b.extra_info["streams"])):
        i = b.extra_info
        tr.write_line(f"{i['model'][:10]:<10} {'floor x' + str(i['streams']):<10} {'':>9} {i['floor_s']:>9.3f}")
    tr.write_line("floor: the forwards alone (prehab_svd.profiling.forward_floor; aa-svd: 2 streams); "
                  "other: total - the phases shown (capture, the driver)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    benches = _timed_benchmarks(config)
    _compress_summary(terminalreporter, benches)
    benches = [b for b in benches if b.extra_info.get("kind") not in _COMPRESS_KINDS]
    if not benches:
        return
    peaks = measure_peaks(bench_device())
    tr = terminalreporter
    tr.section("prehab-svd achieved rates (median time)")
    tr.write_line(
        f"device {peaks['device']}: measured peaks {peaks['matmul_gflops']:.0f} GFLOP/s "
        f"({peaks['matmul_dtype']} matmul), {peaks['copy_gbps']:.0f} GB/s (copy); torch {peaks['torch']}"
    )
    tr.write_line(f"{'group':<44} {'variant':<16} {'median':>10} {'GFLOP/s':>9} {'%pk':>5} {'GB/s':>8} {'%pk':>5}")
    rows = sorted(benches, key=lambda b: (b.group or "", b.extra_info.get("variant", "")))
    for b in rows:
        med = b.stats.median
        info = b.extra_info
        flops, nbytes = info.get("flops"), info.get("bytes")
        gf = flops / med / 1e9 if flops else None
        gb = nbytes / med / 1e9 if nbytes else None
        cells = [
            f"{(b.group or '')[:44]:<44}",
            f"{info.get('variant', b.name)[:16]:<16}",
            f"{med * 1e3:>8.3f}ms",
            f"{gf:>9.1f}" if gf is not None else f"{'-':>9}",
            f"{100 * gf / peaks['matmul_gflops']:>5.0f}" if gf is not None else f"{'-':>5}",
            f"{gb:>8.1f}" if gb is not None else f"{'-':>8}",
            f"{100 * gb / peaks['copy_gbps']:>5.0f}" if gb is not None else f"{'-':>5}",
        ]
        tr.write_line(" ".join(cells))
