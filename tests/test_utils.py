"""The shared helpers of prehab_svd.utils: one keep_ratio rule, one causal-LM test, set_submodule and
the atomic writers."""

import math
import os
import stat
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_model
from prehab_svd.errors import PrehabError
from prehab_svd.utils import (check_keep_ratio, is_causal_config, is_causal_model, keep_ratio_list,
                              new_folder_next_to, replace_folder, set_submodule, write_atomic)


@pytest.mark.parametrize("ok", [1, 1.0, 0.6, 1e-9])
def test_keep_ratio_in_zero_one_closed_at_one(ok):
    check_keep_ratio(ok)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, 2, math.nan, math.inf, True, None, "0.6"])
def test_keep_ratio_rejected(bad):
    with pytest.raises(PrehabError, match=r"keep_ratio must be in \(0, 1\]"):
        check_keep_ratio(bad)


def test_keep_ratio_message_names_the_flag_and_lists_are_checked():
    with pytest.raises(PrehabError, match=r"^--keep-ratio must be in"):
        check_keep_ratio(1.5, "--keep-ratio")
    assert keep_ratio_list(0.6) == [0.6] and keep_ratio_list((0.8, 0.4)) == [0.8, 0.4]
    with pytest.raises(PrehabError, match="got 0"):
        keep_ratio_list([0.6, 0])


def test_causal_lm_by_config_and_by_model():
    assert is_causal_config(SimpleNamespace(architectures=["LlamaForCausalLM"]))
    assert is_causal_config(SimpleNamespace(architectures=["GPT2LMHeadModel"]))
    assert not is_causal_config(SimpleNamespace(architectures=["BertModel"]))
    assert not is_causal_config(SimpleNamespace()) and not is_causal_config(None)
    assert is_causal_model(tiny_model("llama")) and not is_causal_model(tiny_model("bert"))
    # the base model of a causal LM (no LM head) is not one, although its config names one
    assert not is_causal_model(tiny_model("llama").model)


def test_set_submodule():
    model = tiny_model("llama")
    new = nn.Identity()
    set_submodule(model, "model.layers.1.mlp.up_proj", new)
    assert model.get_submodule("model.layers.1.mlp.up_proj") is new
    root = nn.Sequential(nn.Linear(2, 2))
    set_submodule(root, "0", new)
    assert root[0] is new


def test_write_atomic_text_bytes_and_function(tmp_path):
    p = tmp_path / "a.json"
    write_atomic(p, "{}\n")
    assert p.read_text() == "{}\n" and stat.S_IMODE(p.stat().st_mode) == 0o644
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    write_atomic(p, lambda tmp: torch.save({"x": 1}, tmp))
    assert torch.load(p) == {"x": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_write_atomic_failure_leaves_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, boom)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_new_folder_replaces_only_when_whole(tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with new_folder_next_to(dest) as tmp:
            assert tmp.name.startswith(".m.tmp-")
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert os.listdir(tmp_path) == ["m"] and os.listdir(dest) == ["old.txt"]
    with new_folder_next_to(dest) as tmp:
        (tmp / "new.txt").write_text("new")
        replace_folder(tmp, dest)
    assert os.listdir(tmp_path) == ["m"] and os.listdir(dest) == ["new.txt"]
