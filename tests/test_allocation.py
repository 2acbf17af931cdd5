"""compress(..., allocation="zs") (zs-svd's ranks, another method's factors) and compress(..., ranks=...)
(ranks from a dict, a report, a saved folder or a JSON file)."""

import json

import pytest
import torch

from prehab_svd import PrehabError, compress, save_compressed
from prehab_svd.layers import LowRankLinear


def _ranks(model):
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("method", ["aa-svd", "svd-llm"])
def test_zs_allocation_uses_zs_ranks_and_the_methods_factors(make_model, make_batches, method):
    batches = make_batches(n=4, batch=2, tokens=32)
    zs = make_model("llama", hidden=48, intermediate=96)
    rep_zs = compress(zs, "zs-svd", 0.5, batches, grad_samples=8)
    mixed = make_model("llama", hidden=48, intermediate=96)
    rep = compress(mixed, method, 0.5, batches, allocation="zs", grad_samples=8)
    assert rep.ranks == rep_zs.ranks  # the same zero-sum selection, break-even accounting unchanged
    assert rep.details["allocation"] == "zs" and rep.details["budget"] == rep_zs.details["budget"]
    assert len(set(r for r in rep.ranks.values() if r)) > 1  # heterogeneous
    # the factors are the method's at those ranks: the same as passing the ranks explicitly
    given = make_model("llama", hidden=48, intermediate=96)
    rep_given = compress(given, method, 0.5, batches, ranks=rep_zs.ranks)
    assert rep_given.details["allocation"] == "given"
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        a, b = mixed(ids).logits, given(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ranks_from_report_folder_and_json(make_model, make_batches, tmp_path):
    batches = make_batches()
    first = make_model("llama")
    rep = compress(first, "svd-llm", 0.5, batches)
    ranks = dict(rep.ranks)
    name = next(iter(ranks))
    ranks[name] = 3
    ranks[sorted(ranks)[-1]] = None  # dense
    (tmp_path / "r.json").write_text(json.dumps(ranks))
    folder = tmp_path / "saved"
    m = make_model("llama")
    save_compressed(m, folder, compress(m, "svd-llm", 0.5, batches, ranks=ranks))
    for source in (ranks, tmp_path / "r.json", str(folder)):
        model = make_model("llama")
        compress(model, "aa-svd", 0.5, batches, ranks=source)
        expect = {k: v for k, v in ranks.items() if v is not None}
        assert _ranks(model) == expect


def test_ranks_errors(make_model, make_batches, tmp_path):
    batches = make_batches()
    with pytest.raises(PrehabError, match="not targets"):
        compress(make_model("llama"), "svd-llm", 0.5, batches, ranks={"no.such.layer": 2})
    with pytest.raises(PrehabError, match="positive integer"):
        compress(make_model("llama"), "svd-llm", 0.5, batches, ranks={"model.layers.0.mlp.up_proj": 0})
    with pytest.raises(PrehabError, match="cannot read"):
        compress(make_model("llama"), "svd-llm", 0.5, batches, ranks=tmp_path / "missing.json")
    with pytest.raises(PrehabError, match="zs-svd chooses"):
        compress(make_model("llama"), "zs-svd", 0.5, batches, ranks={})
    with pytest.raises(PrehabError, match="either ranks"):
        compress(make_model("llama"), "svd-llm", 0.5, batches, ranks={}, allocation="zs")
    with pytest.raises(PrehabError, match="unknown allocation"):
        compress(make_model("llama"), "svd-llm", 0.5, batches, allocation="greedy")
