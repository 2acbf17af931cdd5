"""`prehab-svd profile` (prehab_svd/profiling.py) and the scale benchmarks (bench/scale/) at tiny sizes.

No timing thresholds: the tests check that each stage and script runs, writes well-formed output with
every field, and that the work it attributes (FLOPs, bytes, parameter counts) is the right arithmetic.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from _triton_env import DEV, cannot_run  # sets up the Triton interpreter where there is no GPU

from prehab_svd import cli
from prehab_svd.errors import PrehabError
from prehab_svd.models import rank_for
from prehab_svd.profiling import _work, forward_floor, measure_peaks, profile_stage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed: import it from the checkout
    sys.path.insert(0, str(ROOT))

TINY_MODEL = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2",
              "--vocab", "64"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _trace_names(path: Path) -> set:
    trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    assert events, "the trace has no events"
    return {e.get("name") for e in events}


def _result(stdout: str) -> dict:
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


# ---------------------------------------------------------------------------------------------
# prehab-svd profile


def test_profile_lowrank_writes_trace_and_counts_flops(tmp_path, capsys):
    trace = tmp_path / "lr.json"
    T, n_in, n_out, r = 4, 48, 80, 12
    code, out, _ = run(["profile", "lowrank", "--trace", trace, "--in-features", n_in, "--out-features", n_out,
                        "--rank", r, "--tokens", T, "--steps", 2, "--warmup", 1, "--backend", "torch", "--json"],
                       capsys)
    assert code == 0
    names = _trace_names(trace)
    # the torch backend: the layer calls its two GEMMs directly (no custom-op dispatch in the trace)
    assert "aten::linear" in names and "aten::mm" in names and "prehab_svd::lowrank_linear" not in names
    assert "stage lowrank" in out and "TFLOP/s" in out and "GB/s" in out and "aten::mm" in out
    res = _result(out)
    mms = [op for op in res["ops"] if op["name"] == "aten::mm"]
    # the two products of 2 steps: 2·T·r·(in + out) FLOPs per step, counted once (not also on the op)
    assert sum(op["flops"] for op in mms) == 2 * 2 * T * r * (n_in + n_out)
    assert res["peaks"]["matmul_tflops"] > 0 and res["peaks"]["copy_gbps"] > 0
    assert res["total_us"] == pytest.approx(sum(op["self_us"] for op in res["ops"]))


@cannot_run
def test_profile_lowrank_through_the_custom_op_counts_its_flops(tmp_path, capsys):
    """A backend with its own kernels (Triton; the interpreter on a CPU) runs through the custom op,
    whose row carries the layer's FLOPs from its shapes."""
    trace = tmp_path / "tr.json"
    T, n_in, n_out, r = 4, 48, 80, 12
    code, out, _ = run(["profile", "lowrank", "--trace", trace, "--in-features", n_in, "--out-features", n_out,
                        "--rank", r, "--tokens", T, "--steps", 2, "--warmup", 1, "--backend", "triton",
                        "--device", DEV, "--dtype", "float32", "--json"], capsys)
    assert code == 0
    assert "prehab_svd::lowrank_linear" in _trace_names(trace)
    custom = [op for op in _result(out)["ops"] if op["name"] == "prehab_svd::lowrank_linear"]
    assert len(custom) == 1 and custom[0]["calls"] == 2
    assert custom[0]["flops"] == 2 * 2 * T * r * (n_in + n_out)


def test_profile_calibration_counts_every_covariance(tmp_path, capsys):
    trace = tmp_path / "cal.json"
    code, out, _ = run(["profile", "calibration", "--trace", trace, *TINY_MODEL, "--batch-size", 2,
                        "--seq-len", 16, "--steps", 1, "--warmup", 0, "--json"], capsys)
    assert code == 0
    assert "prehab_svd::covariance_update" in _trace_names(trace)
    assert "addmm" in out
    res = _result(out)
    # one block: q/k/v share one input (d=32), o (32), gate/up share one (32), down (64); 32 tokens
    tokens = 2 * 16
    want = 2 * tokens * (3 * 32 * 32 + 64 * 64)
    got = sum(op["flops"] for op in res["ops"] if op["name"] == "aten::addmm_")
    assert got == want


def test_profile_decode_of_a_compressed_model(tmp_path, capsys):
    trace = tmp_path / "dec.json"
    code, out, _ = run(["profile", "decode", "--trace", trace, *TINY_MODEL, "--keep-ratio", 0.5, "--seq-len", 8,
                        "--steps", 2, "--warmup", 1], capsys)
    assert code == 0
    assert "aten::linear" in _trace_names(trace)  # the layers' direct GEMMs (torch backend)
    assert "7 LowRankLinear layers" in out and "one decode step" in out
    assert "aten::mm" in out or "aten::addmm" in out


def test_profile_refuses_to_overwrite_and_bad_input(tmp_path, capsys):
    trace = tmp_path / "t.json"
    trace.write_text("keep me")
    code, _, err = run(["profile", "lowrank", "--trace", trace, "--in-features", 8, "--out-features", 8,
                        "--tokens", 1], capsys)
    assert code == 2 and "already exists" in err and trace.read_text() == "keep me"
    code, _, err = run(["profile", "lowrank", "--trace", tmp_path / "u.json", "--keep-ratio", 0], capsys)
    assert code == 2 and "--keep-ratio" in err
    with pytest.raises(PrehabError, match="unknown stage"):
        profile_stage("training", tmp_path / "v.json")
    with pytest.raises(PrehabError, match="rank must be a positive integer"):
        profile_stage("lowrank", tmp_path / "v.json", rank=0, in_features=8, out_features=8)
    with pytest.raises(PrehabError, match="break-even"):
        profile_stage("lowrank", tmp_path / "v.json", keep_ratio=1.0, in_features=8, out_features=8)
    assert not (tmp_path / "v.json").exists()


def test_work_arithmetic():
    f, b = _work("aten::mm", [((4, 8), 2), ((8, 3), 2)], 0)
    assert f == 2 * 4 * 8 * 3 and b == 2 * (32 + 24 + 12)
    f, b = _work("aten::addmm_", [((8, 8), 4), ((8, 5), 4), ((5, 8), 4)], 0)
    assert f == 2 * 8 * 5 * 8 and b == 4 * (64 + 40 + 40) + 4 * 64  # G read and written
    f, b = _work("aten::_scaled_dot_product_flash_attention", [((1, 4, 2, 8), 2), ((1, 4, 6, 8), 2),
                                                                  ((1, 4, 6, 8), 2)], 0)
    assert f == 4 * 4 * 2 * 6 * 8
    assert _work("aten::view", [((4, 8), 4)], 0) == (None, None)


def test_measure_peaks_is_cached():
    a = measure_peaks("cpu")
    assert a["matmul_tflops"] > 0 and a["copy_gbps"] > 0 and a["matmul_dtype"] == "float32"
    assert measure_peaks("cpu") is a


# ---------------------------------------------------------------------------------------------
# forward_floor: the forwards a compression must make, timed alone


def _count_block_calls(blocks):
    """Forward hooks counting the calls of each block; returns (counts, handles)."""
    counts = [0] * len(blocks)

    def make(i):
        def hook(_m, _args, _out):
            counts[i] += 1
        return hook

    return counts, [b.register_forward_hook(make(i)) for i, b in enumerate(blocks)]


@pytest.mark.parametrize("streams", [1, 2])
def test_forward_floor_runs_each_block_once_per_stream_and_batch(make_model, make_batches, streams):
    model = make_model("llama", layers=3)
    batches = make_batches(n=3)
    blocks = list(model.model.layers)
    counts, handles = _count_block_calls(blocks)
    try:
        t = forward_floor(model, batches, streams=streams, check=False)
        assert isinstance(t, float) and t > 0
        assert counts == [streams * 3] * 3
        # targets only up to block 1: block 2 is never run
        counts[:] = [0, 0, 0]
        forward_floor(model, batches, streams=streams, targets=[r"re:model\.layers\.[01]\..*"], check=False)
        assert counts == [streams * 3, streams * 3, 0]
        # excluding block 2's layers does the same
        counts[:] = [0, 0, 0]
        forward_floor(model, batches, streams=streams, exclude=[r"re:model\.layers\.2\..*"], check=False)
        assert counts == [streams * 3, streams * 3, 0]
        # the chain check: one untimed forward over the first batch, every block once
        counts[:] = [0, 0, 0]
        forward_floor(model, batches, streams=streams)
        assert counts == [streams * 3 + 1] * 3
    finally:
        for h in handles:
            h.remove()
    assert not model.model.layers[0]._forward_hooks and not model.model.layers[0]._forward_pre_hooks


def test_forward_floor_whole_model_when_a_target_is_outside_the_blocks(make_model, make_batches):
    model = make_model("llama", layers=2)
    model.train()
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    counts, handles = _count_block_calls(list(model.model.layers))
    try:
        # lm_head outside the blocks: compress treats the model as one stage, run whole per batch
        forward_floor(model, make_batches(n=2), streams=2, targets=["*_proj", "lm_head"])
    finally:
        handle.remove()
        for h in handles:
            h.remove()
    assert len(calls) == 2 * 2 and counts == [4, 4]
    assert model.training  # eval mode only inside


def test_forward_floor_rejects_bad_input(make_model, make_batches):
    model = make_model("llama", layers=1)
    for bad in (0, 3, True, 1.5, "2"):
        with pytest.raises(PrehabError, match="streams must be 1 .* or 2"):
            forward_floor(model, make_batches(n=1), streams=bad)
    with pytest.raises(PrehabError, match="calibration data is empty"):
        forward_floor(model, [])
    with pytest.raises(PrehabError, match="no nn.Linear layer matches"):
        forward_floor(model, make_batches(n=1), targets=["nothing_here"])


# ---------------------------------------------------------------------------------------------
# bench/scale at tiny sizes


@pytest.mark.filterwarnings("ignore:.*wider than the .* calibration tokens")
def test_compress_benchmark_extrapolates_a_fraction(tmp_path):
    from bench.scale import compress

    out = tmp_path / "c.json"
    compress.main(["--preset", "tiny", "--method", "aa-svd", "--blocks", "1", "--json", str(out),
                   "--workdir", str(tmp_path)])
    r = json.loads(out.read_text())
    assert r["kind"] == "compress" and r["method"] == "aa-svd" and r["model"]["blocks_built"] == 1
    assert set(compress.TIMING_KEYS) <= set(r["timings"])
    assert r["calibration"]["tokens"] == 4 * 32
    assert r["compress_s"] > 0 and r["write_s"] > 0 and r["output_bytes"] > 0 and r["peak_rss_gb"] > 0
    assert r["floor_streams"] == 2 and r["floor_s"] > 0  # aa-svd: two streams
    assert r["ratio"] == pytest.approx(r["report_seconds"] / r["floor_s"])
    assert r["peak_gpu_alloc_gb"] is None  # CPU
    assert r["layers_compressed"] == 7 and 0 < r["kept_fraction"] < 1
    assert r["block_bytes_kept"] < r["block_bytes_dense"]
    x = r["extrapolated"]
    assert x["scale"] == 2 and not x["exact"]
    # one more block: its bytes are added to what is written, its per-block times doubled
    assert x["output_bytes"] == r["output_bytes"] + r["block_bytes_kept"]
    per_block = sum(v for k, v in r["timings"].items() if v is not None and k != "capture")
    assert x["compress_s"] == pytest.approx(r["compress_s"] + per_block
                                            + max(r["compress_s"] - sum(v for v in r["timings"].values()
                                                                        if v is not None), 0.0))
    assert x["peak_rss_gb_upper"] == pytest.approx(r["peak_rss_gb"] + r["block_bytes_dense"] / 1e9)
    assert not list(tmp_path.glob("prehab-scale-*"))  # the written output was removed


def test_fsdp_memory_benchmark_counts_each_ranks_shards(tmp_path):
    """One process against FSDP2 on 2 gloo ranks (a meta-built model): each rank holds half of the
    parameters, gradients and AdamW state (to the rows of odd splits), and the table has every run."""
    from bench.scale import fsdp_memory

    out, md = tmp_path / "runs", tmp_path / "m.md"
    fsdp_memory.main(["--preset", "tiny", "--runs", "single:stable", "fsdp-meta:stable", "--out", str(out),
                      "--md", str(md)])
    rows = json.loads(md.with_suffix(".json").read_text())["rows"]
    single = next(r for r in rows if r["mode"] == "single")
    ranks = [r for r in rows if r["mode"] == "fsdp-meta"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    for key in ("params_mb", "grads_mb", "optimizer_mb"):
        assert single[key] > 0
        assert sum(r[key] for r in ranks) == pytest.approx(single[key], rel=1e-9), key
        for r in ranks:
            assert r[key] == pytest.approx(single[key] / 2, rel=0.05), key
    assert all(r["model_params"] == single["model_params"] for r in ranks)
    text = md.read_text()
    assert "| fsdp-meta | stable | 1/2 |" in text and "| single | stable | 0/1 |" in text


def test_factorize_benchmark_accuracy_columns(tmp_path):
    from bench.scale import factorize

    out = tmp_path / "f.json"
    factorize.main(["--sizes", "tiny", "--reps", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert [(c["m"], c["n"]) for c in r["cases"]] == factorize.SIZES["tiny"]
    for c in r["cases"]:
        assert c["rank"] == rank_for(c["m"], c["n"], 0.6)
        v = c["variants"]
        assert set(v) == {"fp64", "fp64-eigh", "fp32", "fp32-svd+rr64"}  # no gesvdj on the CPU
        assert v["fp64"]["rel_objective"] == 0 and v["fp64"]["rel_factor"] == 0
        assert v["fp64-eigh"]["rel_factor"] < 1e-9  # the same optimum, another algorithm
        assert 0 < v["fp32"]["rel_factor"] < 1e-3  # single precision: close, not exact
        assert v["fp32-svd+rr64"]["rel_factor"] < v["fp32"]["rel_factor"]  # the refinement helps
        assert abs(v["fp32"]["rel_objective"]) < 1e-6
        assert {"cholesky", "svd", "other"} <= set(v["fp64"]["breakdown"])
        assert c["cond_lower_bound"] > 1
        if c["role"] != "wide":
            assert c["batched"]["rel_factor"] < 1e-12 and c["batched"]["batch"] in (2, 4)


def test_layers_benchmark_and_plot(tmp_path):
    from bench.scale import layers

    out, png = tmp_path / "l.json", tmp_path / "l.png"
    layers.main(["--sizes", "tiny", "--keeps", "0.6", "--tokens", "1", "4", "--reps", "1", "--json", str(out),
                 "--png", str(png)])
    r = json.loads(out.read_text())
    got = {(row["m"], row["n"], row["tokens"], row["variant"]) for row in r["rows"]}
    want = {(m, n, t, v) for m, n in layers.SHAPES["tiny"] for t in (1, 4) for v in ("dense", "two-matmul", "fused")}
    assert want <= got
    for row in r["rows"]:
        assert row["tokens_per_s"] > 0 and row["gbps"] > 0
        if row["variant"] != "dense":
            assert row["rank"] == rank_for(row["m"], row["n"], 0.6)
            assert row["tflops"] == pytest.approx(2 * row["tokens"] * row["rank"] * (row["m"] + row["n"])
                                                  / row["seconds"] / 1e12)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {o["variant"] for o in r["overhead"]} >= {"dense", "two-matmul", "fused"}
    assert all(o["us_per_call"] > 0 for o in r["overhead"])


def test_inference_benchmark_rows(tmp_path):
    from bench.scale import inference

    out = tmp_path / "i.json"
    inference.main(["--preset", "tiny", "--keep-ratios", "1.0", "0.5", "--batches", "1", "2", "--reps", "1",
                    "--new-tokens", "16", "--json", str(out)])
    r = json.loads(out.read_text())
    kinds = {(row["keep_ratio"], row["kind"], row.get("batch")) for row in r["rows"]}
    assert kinds == {(k, "prefill", None) for k in (1.0, 0.5)} | {(k, "decode", b) for k in (1.0, 0.5)
                                                                  for b in (1, 2)}
    dense = [row for row in r["rows"] if row["keep_ratio"] == 1.0]
    low = [row for row in r["rows"] if row["keep_ratio"] == 0.5]
    assert all(row["speedup_vs_dense"] == pytest.approx(1.0) for row in dense)
    assert all(row["backend"] == "auto" and row["speedup_vs_dense"] > 0 for row in low)
    assert low[0]["target_params"] < dense[0]["target_params"]
    for row in r["rows"]:
        assert row["tokens_per_s"] > 0 and row["mode"] == "eager"


def test_inference_keep_ratios_must_decrease():
    from bench.scale import common, inference

    p = common.PRESETS["tiny"]
    model = common.build_llama(p, "cpu", torch.float32)
    shapes = inference.target_shapes(model)
    n = inference.set_keep(model, shapes, 0.5, "auto", "cpu", torch.float32)
    assert n == sum(rank_for(o, i, 0.5) * (i + o) for i, o, _ in shapes.values())
    with pytest.raises(SystemExit, match="decreasing"):
        inference.set_keep(model, shapes, 1.0, "auto", "cpu", torch.float32)


def test_median_of_repeated_runs_and_report():
    from bench.scale import report, run

    a = {"compress_s": 1.0, "peak_rss_gb": 2.0, "model": {"blocks_built": 1}, "method": "aa-svd"}
    b = {"compress_s": 3.0, "peak_rss_gb": 5.0, "model": {"blocks_built": 1}, "method": "aa-svd"}
    c = {"compress_s": 2.0, "peak_rss_gb": 1.0, "model": {"blocks_built": 1}, "method": "aa-svd"}
    m = run.median_result([a, b, c])
    assert m["compress_s"] == 2.0 and m["peak_rss_gb"] == 5.0 and m["runs"] == 3
    assert m["model"]["blocks_built"] == 1 and isinstance(m["model"]["blocks_built"], int)
    md = report.render({"meta": {"env": {"date": "2026-11-23", "device": "CPU: x", "device_type": "cpu"}}},
                       gpu_placeholder=True)
    assert "## GPU (one H100): not measured yet" in md and "bash bench/scale/run_gpu.sh compress" in md
    assert "| 7b | aa-svd | 1/32 |" in md and "| floor s | ratio |" in md
    row = {"preset": "tiny", "method": "svd", "model": {"blocks_built": 2, "layers_full": 2},
           "calibration": {"tokens": 128}, "compress_s": 3.0, "report_seconds": 3.0, "floor_s": 0.5,
           "ratio": 6.0, "timings": {}, "write_s": None, "peak_gpu_alloc_gb": None, "peak_rss_gb": 1.0,
           "rel_error_after_mean": None,
           "extrapolated": {"measured_blocks": 2, "full_blocks": 2, "exact": True, "total_s": 3.0,
                            "write_s": None, "peak_gpu_gb_upper": None, "peak_rss_gb_upper": 1.0,
                            "basis": "x"}}
    assert "| tiny | svd | 2/2 | 128 | 3.00 | 0.50 | 6.0 |" in "\n".join(report.compress_section([row]))
    old = {k: v for k, v in row.items() if k not in ("floor_s", "ratio")}  # results from before the floor
    assert "| tiny | svd | 2/2 | 128 | 3.00 | - | - |" in "\n".join(report.compress_section([old]))
    merged = report.merge([{"compress": [1], "meta": {"commands": ["x"]}},
                           {"compress": [2], "inference": {"rows": []}, "meta": {"commands": ["y"]}}])
    assert merged["compress"] == [1, 2] and merged["meta"]["commands"] == ["x", "y"]
    assert merged["inference"] == {"rows": []}


def test_orchestrator_estimates_block_counts():
    from bench.scale import run

    job = run._compress("7b", "svd-llm", timeout=240, choices=(2, 1))
    res = {"jobs": [], "compress": []}
    assert run._choose_blocks(job, res, 400).argv[-2:] == ["--blocks", "2"]  # nothing measured yet
    res["compress"].append({"compress_s": 100.0, "timings": {"capture": 2.0}, "model": {"blocks_built": 1}})
    res["jobs"].append({"label": "compress 7b aa-svd blocks=1", "seconds": 140.0, "runs": 1})
    # 1.25 x (98 s per block x b + 40 s fixed): 2 blocks 295 s > 240 s timeout; 1 block 172.5 s fits
    assert run._choose_blocks(job, res, 400).argv[-1] == "1"
    assert run._choose_blocks(job, res, 150) is None
    assert math.isclose(run.estimate_compress_s(res["compress"], res["jobs"], 1), 172.5)


def test_orchestrator_budget_shares():
    from bench.scale import common, run

    parts = ["compress", "compress", "layers", "inference"]
    d = common.Deadline(100.0)
    share = run.part_share(d, "compress", parts, ["compress"])
    assert share.left() == pytest.approx(100.0 * 0.35 / (0.35 + 0.07 + 0.35), abs=0.5)
    last = run.part_share(d, "inference", parts, ["compress", "layers", "inference"])
    assert last.left() == pytest.approx(100.0, abs=0.5)  # the last part gets whatever is left
    assert run.part_share(common.Deadline(None), "layers", parts, ["layers"]).left() == float("inf")
