"""Models by name and GGUF files: the conversion (on a tiny GGUF file this test writes with the ``gguf``
package), save/load of a converted model, the CLI path, and the real SmolLM2 at a small size."""

import json

import pytest
import torch

import prehab_svd
from prehab_svd import PrehabError, cli, data, evaluate, pretrained

from _tiny_gguf import write_tiny_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package is a dependency of prehab-svd; install it")


@pytest.fixture
def tiny_gguf(tmp_path):
    (tmp_path / "src").mkdir()
    return write_tiny_gguf(tmp_path / "src" / "tiny-llama.gguf")


def test_convert_gguf_gives_an_ordinary_dense_llama(tiny_gguf, tmp_path):
    import transformers

    cache = tmp_path / "cache"
    folder = pretrained.convert_gguf(tiny_gguf, cache=cache, verbose=False)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-llama-")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (folder / "model.safetensors").is_file()
    model, tok = pretrained.load_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model, "hf_quantizer", None) is None
    # the conversion is faithful: the same logits as transformers' own GGUF loading
    direct = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                                dtype=torch.float32).eval()
    ids = tok("the cat in the hat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # reused, not converted again (the cached folder is untouched)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained.convert_gguf(tiny_gguf, cache=cache, verbose=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_converted_model_compresses_saves_loads_and_generates(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PREHAB_SVD_CACHE", str(tmp_path / "cache"))
    model, tok = pretrained.load_pretrained(tiny_gguf)  # a .gguf path: converted into the cache
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    report = prehab_svd.compress(model, "aa-svd", 0.6, [ids, ids.flip(1)])
    out = prehab_svd.save_compressed(model, tmp_path / "out", report, tokenizer=tok)
    again = prehab_svd.load_compressed(out)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    text = evaluate.generate_text(again, tok, "the cat", max_new_tokens=5)
    assert isinstance(text, str)


def test_cli_compress_and_eval_a_gguf_path(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREHAB_SVD_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(f"the cat {i} sat in the hat and ran" for i in range(400)))
    out = tmp_path / "compressed"
    code = cli.main(["compress", str(tiny_gguf), "--method", "svd-llm", "--keep-ratio", "0.6", "--out", str(out),
                     "--data", str(corpus), "--num-samples", "8", "--seq-len", "32", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "converting tiny-llama.gguf" in capsys.readouterr().err  # said once, where it goes
    code = cli.main(["eval", str(out), "--data", str(corpus), "--seq-len", "32", "--max-tokens", "256",
                     "--quiet", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and res["tokens"] == 8 * 31 and res["reference"]["model"] == "dense original"


def test_gguf_errors(tmp_path):
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(PrehabError, match="not a GGUF file"):
        pretrained.convert_gguf(bad, cache=tmp_path)
    with pytest.raises(PrehabError, match="does not exist"):
        pretrained.resolve_model_path(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(PrehabError, match="is a file"):
        pretrained.resolve_model_path(tmp_path / "weights.bin")


# --------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, converted once into the user's cache)


@pytest.fixture(scope="module")
def smollm2():
    try:
        pretrained.smollm2_gguf()
    except PrehabError as e:
        pytest.skip(str(e))
    return pretrained.load_pretrained("smollm2")


def test_smollm2_perplexity_and_generation(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    batches = data.eval_lm_batches(tok, data.load_texts("builtin", "test"), seq_len=256, batch_size=4,
                                   max_batches=1)
    res = evaluate.perplexity(model, batches)
    assert res.tokens == 4 * 255 and 5 < res.ppl < 100, res.ppl  # ~40 measured (dense, 256-token windows)
    assert "Paris" in evaluate.generate_text(model, tok, "What is the capital of France?", max_new_tokens=12)


def test_causal_demo_rows_on_smollm2(smollm2):
    """The quick start's causal demo, at a tiny size: the dense row first, every row measured."""
    from prehab_svd.demo_causal import format_causal_demo, parse_causal_method, run_causal_demo

    rows = run_causal_demo(["svd-llm"], 0.8, calib_windows=2, calib_len=64, eval_len=128, eval_tokens=256,
                           max_new_tokens=4, progress=False, targets=["model.layers.0.mlp.*"])
    assert [r["method"] for r in rows] == ["dense", "svd-llm"]
    dense, comp = rows
    assert dense["tokens_builtin"] == comp["tokens_builtin"] == 2 * 127
    assert comp["ppl_builtin"] != dense["ppl_builtin"] and dense["ppl_builtin"] > 1
    assert 0.79 < comp["kept_fraction"] <= 0.8 and comp["params_dense"] == 3 * 576 * 1536
    assert "svd-llm" in format_causal_demo(rows) and "ppl licenses" in format_causal_demo(rows)
    assert parse_causal_method("zs-ranks+aa-svd+rehab") == ("aa-svd", {"allocation": "zs", "grad_samples": 32,
                                                                        "min_rank_fraction": 0.3},
                                                            True)
    with pytest.raises(PrehabError, match="unknown demo method"):
        parse_causal_method("prehab+svd")
