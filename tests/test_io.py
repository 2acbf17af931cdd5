"""compress -> save -> load gives bit-identical outputs; no pickle; atomic writes."""

import json
import os

import pytest
import torch

from prehab_svd import LowRankLinear, PrehabError, compress
from prehab_svd.io import META_FILE, WEIGHTS_FILE, load_compressed, save_compressed


def _out(model, batch):
    with torch.no_grad():
        o = model(**batch)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@pytest.mark.parametrize("kind,method", [("llama", "aa-svd"), ("mistral", "svd-llm"),
                                         ("qwen2", "asvd"), ("bert", "svd-llm")])
def test_round_trip_bit_exact(kind, method, tmp_path, make_model, make_batches):
    model = make_model(kind)
    batches = make_batches()
    report = compress(model, method, 0.5, batches)
    path = save_compressed(model, tmp_path / "out", report)
    assert sorted(os.listdir(path)) == sorted(["config.json", META_FILE, WEIGHTS_FILE])
    meta = json.loads((path / META_FILE).read_text())
    assert meta["method"] == method and meta["keep_ratio"] == 0.5
    assert meta["ranks"] == {lay.name: lay.rank for lay in report.layers}
    loaded = load_compressed(path)
    assert type(loaded) is type(model)
    for name, rank in meta["ranks"].items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, LowRankLinear) and mod.rank == rank
    for b in batches:
        assert torch.equal(_out(loaded, b), _out(model, b))
    # generation still works for causal LMs
    if hasattr(loaded, "generate"):
        ids = loaded.generate(batches[0]["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
        assert ids.shape == (1, 8)


def test_load_into_given_skeleton(tmp_path, make_model, make_batches):
    model = make_model("llama")
    compress(model, "svd", 0.5)
    save_compressed(model, tmp_path / "m")
    skeleton = make_model("llama", seed=123)  # different random weights: all must be overwritten
    loaded = load_compressed(tmp_path / "m", skeleton)
    b = make_batches()[0]
    assert torch.equal(_out(loaded, b), _out(model, b))


def test_existing_folder_is_not_clobbered(tmp_path, make_model):
    model = make_model("llama")
    compress(model, "svd", 0.5)
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(PrehabError, match="already exists"):
        save_compressed(model, dest)
    assert (dest / "keep.txt").read_text() == "mine"
    save_compressed(model, dest, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / WEIGHTS_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left


def test_failed_save_leaves_nothing(tmp_path, make_model, monkeypatch):
    model = make_model("llama")
    compress(model, "svd", 0.5)
    import prehab_svd.io as io

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_compressed(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(PrehabError, match="does not exist"):
        load_compressed(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(PrehabError, match="not saved by prehab-svd"):
        load_compressed(tmp_path / "x")


def test_no_pickle_in_package():
    import pathlib

    import prehab_svd

    root = pathlib.Path(prehab_svd.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, f
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (f, line)
