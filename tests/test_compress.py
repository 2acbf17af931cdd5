"""compress(): every method on tiny Llama (GQA), Mistral, Qwen2 and BERT; reports; bad input."""

import copy
import math

import pytest
import torch
from torch import nn

import prehab_svd
from prehab_svd import LowRankLinear, NonFiniteActivationError, PrehabError, compress
from prehab_svd.models import plan_targets, rank_for

KINDS = ["llama", "mistral", "qwen2", "bert"]
METHODS = ["svd", "asvd", "svd-llm", "aa-svd"]


def _forward(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_compress_every_family(kind, method, make_model, make_batches):
    model = make_model(kind)
    ref = copy.deepcopy(model)
    batches = make_batches()
    keep = 0.6
    report = compress(model, method, keep, batches)
    targets = plan_targets(ref).targets
    assert [layer.name for layer in report.layers] == sorted(
        [layer.name for layer in report.layers], key=targets.index)
    assert {layer.name for layer in report.layers} == set(targets)
    for layer in report.layers:
        mod = model.get_submodule(layer.name)
        m, n = layer.out_features, layer.in_features
        assert layer.rank == math.floor(keep * m * n / (m + n))
        assert isinstance(mod, LowRankLinear) and mod.rank == layer.rank
        assert layer.params_kept == layer.rank * (m + n) + (0 if mod.bias is None else m)
        assert layer.rel_error_after is not None and 0 <= layer.rel_error_after < 1.5
    # embeddings and LM head untouched
    for name, mod in model.named_modules():
        if "embed" in name or name.endswith("lm_head"):
            assert not isinstance(mod, LowRankLinear)
    assert report.kept_fraction <= keep + 0.02
    assert report.calibration_tokens == 3 * 2 * 24
    out = _forward(model, batches[0])
    assert torch.isfinite(out).all()
    assert out.shape == _forward(ref, batches[0]).shape
    assert method in report.table()


def test_whitening_beats_plain_svd_on_calibration_error(make_model, make_batches):
    """SVD-LLM minimizes exactly the reported error on the same original activations, so per layer
    it can be no worse than SVD or ASVD."""
    batches = make_batches(n=4, tokens=32)
    reports = {}
    for method in ("svd", "asvd", "svd-llm"):
        model = make_model("llama", layers=2, hidden=48, intermediate=96)
        reports[method] = {lay.name: lay.rel_error_after for lay in compress(model, method, 0.4, batches).layers}
    for name, err in reports["svd-llm"].items():
        assert err <= reports["svd"][name] + 1e-6, name
        assert err <= reports["asvd"][name] + 1e-6, name
    assert sum(reports["svd-llm"].values()) < 0.9 * sum(reports["svd"].values())


def test_aa_svd_equals_svd_llm_where_no_upstream_shift(make_model, make_batches):
    """In block 0, q/k/v see unshifted inputs (x' = x), so AA-SVD's answer is SVD-LLM's."""
    batches = make_batches()
    a, b = make_model("llama"), make_model("llama")
    ra = compress(a, "aa-svd", 0.5, batches)
    compress(b, "svd-llm", 0.5, batches)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                 "model.layers.0.self_attn.v_proj"):
        wa, wb = a.get_submodule(name).weight.detach(), b.get_submodule(name).weight.detach()
        assert torch.allclose(wa, wb, rtol=1e-4, atol=1e-5 * float(wb.abs().max()))
    before = {lay.name: lay.rel_error_before for lay in ra.layers}
    # The reported error is √(tr(WGWᵀ) − 2tr(WCWᵀ) + tr(WG′Wᵀ)) / ‖xWᵀ‖ from fp32-accumulated
    # statistics: with x' = x it is fp32 rounding (≈1e-7) seen through a square root, ≈1e-4.
    assert before["model.layers.0.self_attn.q_proj"] < 1e-3
    # o_proj of block 0 sees the compressed q/k/v's output: a real upstream shift (here ≥ 0.1)
    assert before["model.layers.0.self_attn.o_proj"] > 5e-2
    assert before["model.layers.1.self_attn.q_proj"] > 5e-2


def test_aa_svd_is_better_anchored_than_svd_llm(make_model, make_batches):
    """Measured against the original model's outputs, the compressed model from AA-SVD is closer."""
    batches = make_batches(n=4, tokens=32, seed=1)
    ref = make_model("llama", layers=3, hidden=48, intermediate=96)
    errs = {}
    for method in ("svd-llm", "aa-svd"):
        model = copy.deepcopy(ref)
        compress(model, method, 0.5, batches)
        e = 0.0
        for b in batches:
            with torch.no_grad():
                h_ref = ref.model(**b).last_hidden_state
                h = model.model(**b).last_hidden_state
            e += ((h - h_ref).norm() / h_ref.norm()).item()
        errs[method] = e
    assert errs["aa-svd"] < errs["svd-llm"], errs


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_padding_never_enters_covariance(kind, make_model, make_batches):
    """A padded batch gives the same factors as the same real tokens without padding."""
    padded = make_batches(n=2, tokens=24, pad_last=8)
    unpadded = [padded[0],
                {"input_ids": padded[1]["input_ids"][:1], "attention_mask": padded[1]["attention_mask"][:1]},
                {"input_ids": padded[1]["input_ids"][1:, :16], "attention_mask": padded[1]["attention_mask"][1:, :16]}]
    a, b = make_model(kind), make_model(kind)
    ra = compress(a, "svd-llm", 0.5, padded)
    rb = compress(b, "svd-llm", 0.5, unpadded)
    assert ra.calibration_tokens == rb.calibration_tokens == 2 * 2 * 24 - 8
    # The reported errors are computed from each run's own statistics, so padded tokens leaking into
    # a covariance would show up here. (Weights are not compared: near-tied singular values make
    # the optimal factors of tiny random models non-unique.)
    for la, lb in zip(ra.layers, rb.layers):
        assert la.name == lb.name
        assert la.rel_error_after == pytest.approx(lb.rel_error_after, rel=1e-4, abs=2e-5), la.name
    q = ra.layers[0].name
    assert torch.allclose(a.get_submodule(q).weight, b.get_submodule(q).weight, atol=1e-5)


def test_nan_activation_names_the_layer(make_model, make_batches):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        compress(model, "svd-llm", 0.5, make_batches())


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_keep_ratio(bad, make_model, make_batches):
    with pytest.raises(PrehabError, match="keep_ratio"):
        compress(make_model("llama"), "svd-llm", bad, make_batches())


def test_bad_inputs(make_model, make_batches):
    with pytest.raises(PrehabError, match="no linear layers"):
        compress(nn.Sequential(nn.ModuleList([nn.ReLU()])), "svd", 0.5)
    with pytest.raises(PrehabError, match="unknown method"):
        compress(make_model("llama"), "svd-xl", 0.5, make_batches())
    with pytest.raises(PrehabError, match="empty"):
        compress(make_model("llama"), "svd-llm", 0.5, [])
    with pytest.raises(PrehabError, match="needs calibration"):
        compress(make_model("llama"), "aa-svd", 0.5, None)
    with pytest.raises(PrehabError, match="rank 0"):
        compress(make_model("llama"), "svd", 0.01)
    with pytest.raises(PrehabError, match="no nn.Linear layer matches"):
        compress(make_model("llama"), "svd", 0.5, targets=["*.nothing"])
    with pytest.raises(PrehabError, match="dict of model inputs"):
        compress(make_model("llama"), "svd-llm", 0.5, [[1, 2, 3]])


def test_svd_without_calibration_and_token_tensor_batches(make_model, make_batches):
    model = make_model("llama")
    report = compress(model, "svd", 0.5)
    assert all(lay.rel_error_after is None for lay in report.layers)
    model2 = make_model("llama")
    ids = [b["input_ids"] for b in make_batches()]
    report2 = compress(model2, "svd-llm", 0.5, ids)
    assert report2.calibration_tokens == 3 * 2 * 24


def test_break_even_layers_stay_dense(make_model, make_batches):
    """At keep_ratio 1, square layers (m·n/(m+n) an integer) reach break-even and stay dense."""
    model = make_model("llama")
    report = compress(model, "svd-llm", 1.0, make_batches())
    for lay in report.layers:
        mod = model.get_submodule(lay.name)
        if lay.out_features == lay.in_features:
            assert lay.rank is None and isinstance(mod, nn.Linear) and lay.params_kept == lay.params_dense
        else:
            assert lay.rank == rank_for(lay.out_features, lay.in_features, 1.0)
            assert isinstance(mod, LowRankLinear)
    assert report.kept_fraction <= 1.0


def test_rank_for():
    assert rank_for(4096, 4096, 0.6) == math.floor(0.6 * 4096 * 4096 / 8192)
    assert rank_for(11008, 4096, 0.4) == math.floor(0.4 * 11008 * 4096 / (11008 + 4096))
    assert rank_for(10, 10, 1.0) is None  # reaches break-even: stays dense
    assert rank_for(10, 10, 0.5) == 2


class TinyNet(nn.Module):
    """A non-Hugging-Face model: embedding, a list of residual MLP blocks, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(96, 24)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24)) for _ in range(3))
        self.head = nn.Linear(24, 96)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


@pytest.mark.parametrize("method", METHODS)
def test_generic_module_and_explicit_head(method, make_batches):
    net = TinyNet()
    report = compress(net, method, 0.5, make_batches(), targets=["blocks.*"])
    assert len(report.layers) == 6 and not isinstance(net.head, LowRankLinear)
    # asking for the head (outside the blocks) compresses the whole model as one stage
    net2 = TinyNet()
    report2 = compress(net2, method, 0.5, make_batches(), targets=["blocks.*", "head"])
    assert isinstance(net2.head, LowRankLinear) and len(report2.layers) == 7
    assert torch.isfinite(net2(make_batches()[0]["input_ids"])).all()
    if method in ("svd-llm", "aa-svd"):
        # same activations, same statistics, same answer for the block layers
        for lay in report.layers:
            assert torch.allclose(net.get_submodule(lay.name).weight, net2.get_submodule(lay.name).weight,
                                  atol=1e-4)


def test_public_api_names():
    for name in ("LowRankLinear", "compress", "linalg", "ops"):
        assert hasattr(prehab_svd, name)
    assert callable(prehab_svd.linalg.whitened_lowrank) and callable(prehab_svd.linalg.anchored_lowrank)


def test_oas_shrinkage_is_chosen_and_reported_per_group(make_model, make_batches):
    """compress(shrinkage="oas"): an intensity per layer group (its first layer's name), in [0, 1];
    a bad value is a clear error."""
    model = make_model("llama")
    report = compress(model, "svd-llm", 0.5, make_batches(), shrinkage="oas")
    got = report.details["shrinkage"]
    groups = {la.group for la in report.layers}
    assert set(got) == groups and all(0 <= a <= 1 for a in got.values())
    assert any(a > 0 for a in got.values())
    with pytest.raises(PrehabError, match="'oas'"):
        compress(make_model("llama"), "svd-llm", 0.5, make_batches(), shrinkage="ledoit")


def test_options_the_method_does_not_take_are_refused_with_the_valid_ones(make_model, make_batches):
    model = make_model("llama")
    with pytest.raises(PrehabError, match=r"svd-llm takes no option alpha; its options are: damping, shrinkage"):
        compress(model, "svd-llm", 0.5, make_batches(), alpha=0.3)
    with pytest.raises(PrehabError, match=r"aa-svd takes no option correction"):
        compress(model, "aa-svd", 0.5, make_batches(), correction=True)
    with pytest.raises(PrehabError, match="damping must be a finite number >= 0"):  # before any pass
        compress(model, "aa-svd", 0.5, None, damping=-1.0)
    with pytest.raises(PrehabError, match=r"svd takes no option shrinkage; its options are: \(none\)"):
        compress(model, "svd", 0.5, None, shrinkage=0.0)
    with pytest.raises(PrehabError, match=r"svd-llm takes no option anchor"):
        compress(model, "svd-llm", 0.5, None, anchor=0.5)
    with pytest.raises(PrehabError, match=r"anchor must be a number in \[0, 1\]"):  # before any pass
        compress(model, "aa-svd", 0.5, None, anchor=2.0)
    # the zs allocation adds its own options to the method's
    from prehab_svd.compression import method_options

    assert method_options("aa-svd", "zs") == ["damping", "shrinkage", "anchor", "task", "grad_samples",
                                              "min_rank_fraction"]
    assert method_options("zs-svd")[:4] == ["damping", "shrinkage", "correction", "correction_grads"]
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_aa_svd_anchor_moves_the_factors_between_full_anchoring_and_shifted_whitening(make_model,
                                                                                      make_batches):
    """compress(aa-svd, anchor=β): β = 1 fits the original outputs, β = 0 the partly compressed model's
    own outputs, the default lies between (the first group has no upstream compression, so every β
    gives it the same factors); linalg's tests check each β's closed form against its optimum."""
    from prehab_svd.methods.aa_svd import DEFAULT_ANCHOR, AnchoredOptions

    assert AnchoredOptions().anchor == DEFAULT_ANCHOR and 0 < DEFAULT_ANCHOR < 1
    batches = make_batches()
    outs = {}
    for beta in (1.0, DEFAULT_ANCHOR, 0.0):
        model = make_model("llama")
        compress(model, "aa-svd", 0.5, batches, anchor=beta)
        outs[beta] = {n: m.U @ m.V for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    first_group = [n for n in outs[1.0] if ".0.self_attn." in n and not n.endswith("o_proj")]
    assert first_group
    for n in first_group:  # no upstream compression yet: x' = x
        assert torch.allclose(outs[1.0][n], outs[0.0][n], atol=1e-5)
    later = [n for n in outs[1.0] if n not in first_group]
    assert all(not torch.allclose(outs[1.0][n], outs[0.0][n], atol=1e-4) for n in later)
    # the default is the blend: its factors are neither end's
    assert all(not torch.allclose(outs[DEFAULT_ANCHOR][n], outs[e][n], atol=1e-4) for n in later
               for e in (0.0, 1.0))


def test_a_new_method_is_one_class(make_model, make_batches, monkeypatch):
    """A method registered from outside the package runs through the same driver: it is asked for
    what it needs (one stream, no covariance) and factorizes each layer."""
    from dataclasses import dataclass

    from prehab_svd.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @dataclass
    class HalfOptions:
        scale: float = 0.5

    calls = []

    @base.register
    class Half(base.Method):
        name = "half-svd"
        Options = HalfOptions
        uses_covariance = False

        def factorize(self, W, stats, rank, factor=None, *, extra=None):
            calls.append(W.shape)
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            return (U[:, :rank] * S[:rank] * self.options.scale).to(W.dtype), Vh[:rank].to(W.dtype)

    model = make_model("llama")
    report = compress(model, "half-svd", 0.5, make_batches(), scale=1.0)
    assert len(calls) == len(report.layers) > 0
    assert all(isinstance(model.get_submodule(layer.name), LowRankLinear) for layer in report.layers)


@pytest.mark.parametrize("method", ["svd-llm", "aa-svd"])
def test_no_forward_beyond_the_last_targeted_block(make_model, make_batches, method):
    """Targets in block 0 only: the later blocks run once (the check that the blocks chain), never
    for the statistics, and the factors are those of a run over every block."""
    model = make_model("llama", layers=3)
    calls = [0, 0, 0]
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    batches = make_batches(n=3)
    rep = compress(model, method, 0.5, batches, targets=["model.layers.0.*"])
    assert calls[1] == calls[2] == 1 and calls[0] > 3
    ref = make_model("llama", layers=3)
    compress(ref, method, 0.5, batches, targets=["model.layers.0.*", "model.layers.2.mlp.down_proj"],
             ranks={layer.name: layer.rank for layer in rep.layers})
    for layer in rep.layers:
        a, b = model.get_submodule(layer.name), ref.get_submodule(layer.name)
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)


def test_chain_check_runs_on_a_short_input(make_model, make_batches):
    """The chain check is structural: it runs on 32 tokens of the first sequence, and stops after the
    last block (the head's logits are never computed)."""
    from prehab_svd.calibration import CHECK_TOKENS, check_chain, short_batch

    batch = make_batches(n=1, batch=3, tokens=40)[0]
    short = short_batch(batch)
    assert short["input_ids"].shape == short["attention_mask"].shape == (1, CHECK_TOKENS)
    assert torch.equal(short["input_ids"], batch["input_ids"][:1, :CHECK_TOKENS])
    model = make_model("llama")
    seen = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
    model.lm_head.register_forward_hook(lambda m, a, o: seen.append("head"))
    assert check_chain(model, list(model.model.layers), batch)
    assert seen == [(1, CHECK_TOKENS)] * len(model.model.layers)
