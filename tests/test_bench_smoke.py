"""The GPU check's pieces on a CPU, at tiny sizes: bench/ratios.py (the op ratios), bench/sanitize_ops.py
(the compute-sanitizer driver) and bench/gpu_first.sh (the one command for the lent GPU, in its
--dry-run mode). No timing thresholds: the tests check that every case and stage runs and reports
complete, well-formed results, that the baselines are the right computations, and that the errors
against float64 are small.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed: import it from the checkout
    sys.path.insert(0, str(ROOT))

from bench import ratios  # noqa: E402

TINY = ratios.SIZES["tiny"]
STAGES = ("env", "install", "triton", "sanitize", "build", "cuda", "sanitize-cuda", "ratios")  # as recorded


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PREHAB_SVD_BACKEND", "OUT")}
    env.update(OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _expected_cases(sizes: dict) -> dict:
    from prehab_svd.models import rank_for

    lr = [f"{m}x{n} keep={k} r={rank_for(m, n, k)} T={T}" for m, n in sizes["lr_shapes"] for T in sizes["tokens"]
          for k in sizes["keeps"] if rank_for(m, n, k) is not None]
    cov = [f"d={d} T={T} {c}" for d in sizes["cov_d"] for T in sizes["cov_tokens"] for c in ("G", "G+C")]
    sr = [f"{kind} B={B} {m}x{n}" for B, m, n in sizes["sr_shapes"] for kind in sizes.get("sr_kinds", ratios.SR_KINDS)]
    return {"lowrank_linear": lr, "covariance_update": cov, "stable_rank": sr}


def check_result(res: dict, sizes: dict, variants: dict, tol: float) -> None:
    """Every expected (op, case, variant) measured in eager mode, with a ratio and a small error."""
    assert res["complete"] is True, (res["skipped"], res["errors"])
    assert not res["errors"], res["errors"]
    assert set(res["baselines"]) == set(ratios.OPS)
    for op, cases in _expected_cases(sizes).items():
        rows = {(r["case"], r["variant"]): r for r in res["rows"] if r["op"] == op and r["mode"] == "eager"}
        assert {c for c, _ in rows} == set(cases), op
        for case in cases:
            for v in variants[op]:
                r = rows.get((case, v))
                assert r is not None, (op, case, v)
                assert "error" not in r, r
                assert r["seconds"] > 0 and r["ratio"] > 0, r
                assert r["rel_err"] <= tol, r
            assert rows[(case, "baseline")]["ratio"] == pytest.approx(1.0)
            if op == "lowrank_linear":
                assert all(rows[(case, v)]["vs_dense"] > 0 for v in variants[op] if v != "dense")


# ---------------------------------------------------------------------------------------------
# bench/gpu_first.sh --dry-run (and, through it, bench/ratios.py with the torch backend)
# ---------------------------------------------------------------------------------------------


def test_gpu_first_scripts_parse():
    for script in ("bench/gpu_first.sh", "bench/gpu_lib.sh", "bench/scale/run_gpu.sh"):
        out = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)


def test_gpu_first_dry_run(tmp_path):
    """Every stage is wired and reports ok on a CPU; at most 8 files come back, each with a name the
    device tool returns; the console ends with the ratio table; summary.md has the environment, the
    stage table and a complete ratio table."""
    out = subprocess.run(["bash", "bench/gpu_first.sh", "--dry-run"], cwd=ROOT, env={**_env(False), "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {"summary.md", "ratios.json", "gpu_first.log", "build.log", "sanitizer.log"} <= set(files), files
    summary = (tmp_path / "summary.md").read_text()
    table = [line.split("|")[1].strip() for line in summary.splitlines() if re.match(r"^\| [a-z-]+ \| ok \| \d+ \|", line)]
    assert table == list(STAGES), summary[:3000]  # every stage, ok, in this order
    assert "part 2: the CUDA extension" in (tmp_path / "sanitizer.log").read_text()
    assert "python:" in summary and "torch:" in summary and "nvidia-smi" in summary
    for op in ratios.OPS:
        assert f"### {op}" in summary
    # printed last: the compact ratio table after the stage table, then the closing line
    stdout = out.stdout
    assert stdout.rindex("| ratios | ok |") < stdout.rindex("### stable_rank") < stdout.rindex("complete: True")
    assert stdout.rstrip().splitlines()[-1].startswith("gpu_first: all stages ok")
    res = json.loads((tmp_path / "ratios.json").read_text())
    variants = {"lowrank_linear": ["baseline", "torch", "dense"], "covariance_update": ["baseline", "torch"],
                "stable_rank": ["baseline", "torch"]}
    check_result(res, TINY, variants, tol=1e-5)
    assert res["modes"] == ["eager"] and any("graph" in s for s in res["skipped"])
    assert res["env"]["torch"] == torch.__version__


def test_gpu_first_records_a_failing_stage(tmp_path):
    """A stage that fails is recorded as FAILED, the later stages still run, and the run's status is 1."""
    env = {**_env(False), "OUT": str(tmp_path), "GPU_FIRST_STAGES": "sanitize ratios", "PYTHON": "false"}
    out = subprocess.run(["bash", "bench/gpu_first.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert re.search(r"^\| sanitize \| FAILED \(rc 1\) \|", summary, re.M), summary
    assert re.search(r"^\| ratios \| FAILED \(rc 1\) \|", summary, re.M), summary
    assert "SOME STAGES FAILED" in out.stdout


# ---------------------------------------------------------------------------------------------
# bench/ratios.py with the Triton interpreter, and its pieces
# ---------------------------------------------------------------------------------------------


def test_ratios_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    sizes = dict(TINY, lr_shapes=[(37, 29)], keeps=[0.4], cov_d=[37], sr_shapes=[(2, 37, 23)],
                 sr_kinds=["stable-warm"])
    js = tmp_path / "r.json"
    argv = [sys.executable, "bench/ratios.py", "--sizes", "tiny", "--device", "cpu", "--lr-shapes", "37x29",
            "--keeps", "0.4", "--cov-d", "37", "--sr-shapes", "2x37x23", "--sr-kinds", "stable-warm",
            "--target-s", "0.001", "--samples", "3", "--json", str(js), "--md", str(tmp_path / "r.md")]
    out = subprocess.run(argv, cwd=ROOT, env=_env(True), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(js.read_text())
    assert all("triton" in res["backends"][op] for op in ratios.OPS), res["backends"]
    variants = {"lowrank_linear": ["baseline", "torch", "triton", "dense"],
                "covariance_update": ["baseline", "torch", "triton"], "stable_rank": ["baseline", "torch", "triton"]}
    check_result(res, sizes, variants, tol=1e-5)
    md = (tmp_path / "r.md").read_text()
    assert md == ratios.render(res) + "\n"


def test_ratios_isolated_op_that_dies_loses_only_itself(tmp_path):
    """--isolate: an op whose process dies (as after an illegal memory access) is reported, and the
    other ops' rows are all there."""
    js = tmp_path / "r.json"
    argv = [sys.executable, "bench/ratios.py", "--sizes", "tiny", "--device", "cpu", "--isolate",
            "--sr-shapes", "1x20x45", "--sr-kinds", "stable-warm", "--target-s", "0.001", "--samples", "3",
            "--json", str(js)]
    env = {**_env(False), ratios.ABORT_ENV: "covariance_update"}
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["complete"] is False
    assert any(e.startswith("covariance_update: the process ended with status 3") for e in res["errors"]), res["errors"]
    ops_seen = {r["op"] for r in res["rows"]}
    assert ops_seen == {"lowrank_linear", "stable_rank"}
    n_lr = len(_expected_cases(TINY)["lowrank_linear"])
    assert len([r for r in res["rows"] if r["op"] == "lowrank_linear" and r["variant"] == "baseline"]) == n_lr
    assert "complete: False" in out.stdout and "the process ended with status 3" in out.stdout


def test_sanitize_driver_runs_every_path_it_plans():
    out = subprocess.run([sys.executable, "bench/sanitize_ops.py", "--quick", "--device", "cpu"], cwd=ROOT,
                         env=_env(True), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    ok = [x for x in lines if x.startswith("ok ")]
    m = re.fullmatch(r"sanitize_ops: (\d+) calls, 0 failed, \d+ skipped .*", lines[-1])
    assert m and int(m.group(1)) == len(ok) > 0, lines[-1]
    for what in ("covariance torch", "covariance triton", "lowrank torch", "lowrank triton", "lowrank triton-path",
                 "stable_rank torch", "stable_rank triton"):
        assert any(x.split(None, 1)[1].startswith(what) for x in ok), what
    assert any("cuda" in x and x.startswith("skip") for x in lines)  # no GPU here: said, not hidden


def test_covariance_baseline_is_exact_and_named():
    for dtype, want in ((torch.float32, "G.addmm_"), (torch.bfloat16, "upcast")):  # CPU: no out_dtype
        name, fn = ratios.covariance_baseline(torch.device("cpu"), dtype)
        assert name.startswith(want), name
        g = torch.Generator().manual_seed(3)
        x, y = (torch.randn(41, 9, generator=g).to(dtype) for _ in range(2))
        G, C = torch.randn(9, 9, generator=g), torch.zeros(9, 9)
        G0 = G.clone()
        fn(G, x, C, y)
        assert ratios.rel(G, G0.double() + x.double().T @ x.double()) < 1e-6
        assert ratios.rel(C, x.double().T @ y.double()) < 1e-6


@pytest.mark.parametrize("kind", ["stable", "nuclear"])
def test_stable_rank_baseline_matches_the_reference(kind):
    from prehab_svd.ops import reference

    name, fn = ratios.stable_rank_baseline(torch.device("cpu"), torch.float32)
    assert "reference iteration" in name
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 20, 14, generator=g)
    L = torch.eye(14) + 0.1 * torch.randn(14, 14, generator=g).tril(-1)
    state = torch.randn(3, 14, generator=g) if kind == "stable" else None
    v, gr = fn(W, L, L, kind, state, 6)
    v64, g64, _ = reference.stable_rank(W.double(), L.double(), kind, None if state is None else state.double(), 6)
    assert ratios.rel(v, v64) < 1e-5 and ratios.rel(gr, g64) < 1e-5


def test_render_shows_failures_and_partial_runs():
    res = {"device": "cpu", "dtype": "float32", "env": {}, "baselines": {"covariance_update": "x"},
           "rows": [{"op": "covariance_update", "case": "d=5", "variant": "baseline", "mode": "eager",
                     "seconds": 1e-3, "ratio": 1.0, "rel_err": 1e-7},
                    {"op": "covariance_update", "case": "d=5", "variant": "triton", "mode": "eager",
                     "error": "RuntimeError: boom", "rel_err": None},
                    {"op": "covariance_update", "case": "d=5", "variant": "baseline", "mode": "graph",
                     "seconds": 5e-4, "ratio": 1.0, "rel_err": 1e-7},
                    {"op": "covariance_update", "case": "d=5", "variant": "triton", "mode": "graph",
                     "na": "not captured", "rel_err": None}],
           "skipped": ["covariance d=9: budget"], "errors": [], "complete": False}
    for compact in (False, True):
        text = ratios.render(res, compact=compact)
        assert "ERR" in text and "boom" in text and "budget" in text and text.endswith("complete: False")
        assert "n/a" in text and "not captured" not in text  # not measured by design, not a failure
    assert "| d=5 | 1.000 | ERR/n/a | - |" in ratios.render(res, compact=True)  # worst of the backends


def test_timer_reports_seconds_per_call():
    import time

    timer = ratios.Timer(torch.device("cpu"), target_s=0.02, samples=3)
    t = timer(lambda: (time.sleep(0.002), time.sleep(0.002)), calls=2)
    assert t["seconds"] >= 0.002 and t["samples"] >= 3 and t["inner"] >= 1
