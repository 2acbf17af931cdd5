"""Low-Rank Prehab, the task losses, and LoRA rehab, on tiny models (fast; the real-model runs live in
scripts/methods_minilm.py)."""

import copy
import math

import pytest
import torch

from prehab_svd import LowRankLinear, PrehabError, compress, prehab, rehab
from prehab_svd.models import plan_targets
from prehab_svd.training.prehab import lambda_schedule
from prehab_svd.training.surrogates import CompressedTask
from prehab_svd.training.targets import WhitenedTargets, stable_rank_of
from prehab_svd.training.whitening import layer_input_grams
from prehab_svd.tasks import (ContrastiveLoss, EmbeddingDistillation, LogitDistillation, causal_lm_loss,
                              default_task)


# ---------------------------------------------------------------------------------------------
# task losses


def test_causal_lm_loss_matches_transformers_labels(make_model, make_batches):
    model = make_model("llama")
    batch = make_batches(n=1, batch=3, pad_last=5)[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ref = model(**batch, labels=labels).loss
    assert causal_lm_loss(model, batch).item() == pytest.approx(ref.item(), rel=1e-5)


def test_distillation_is_zero_at_the_reference_and_positive_after_a_change(make_model, make_batches):
    model = make_model("bert")
    batch = make_batches(n=1, batch=4, pad_last=6)[0]
    loss = EmbeddingDistillation.of(model)
    assert loss(model, batch).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    assert loss(model, batch).item() > 1e-3


def _kl_float64(reference, model, batch):
    """KL(p_ref || p) per unpadded position, averaged, from float64 copies of both models."""
    ref64, mod64 = copy.deepcopy(reference).double(), copy.deepcopy(model).double()
    with torch.no_grad():
        lq = torch.log_softmax(ref64(**batch).logits, -1)
        lp = torch.log_softmax(mod64(**batch).logits, -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    keep = batch["attention_mask"].bool()
    return kl[keep].mean().item()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logit_distillation_matches_float64_and_is_zero_with_zero_gradient_at_the_reference(
        make_model, make_batches, kind):
    model = make_model(kind)
    batch = make_batches(n=1, batch=3, tokens=19, pad_last=7, seed=5)[0]
    loss = LogitDistillation.of(model)
    at_ref = loss(model, batch)
    assert at_ref.item() == pytest.approx(0.0, abs=1e-6)
    weight = model.model.layers[0].mlp.down_proj.weight
    (g,) = torch.autograd.grad(at_ref, [weight])
    assert g.abs().max() < 1e-6
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    moved = loss(model, batch)
    expected = _kl_float64(loss.reference, model, batch)
    assert expected > 1e-4  # the change moved the distribution: the check below can fail
    assert moved.item() == pytest.approx(expected, rel=1e-4)
    # padding is not scored: changing a padded position's token changes nothing
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][-1, -1] = 7 if int(other["input_ids"][-1, -1]) != 7 else 8
    assert loss(model, other).item() == pytest.approx(moved.item(), rel=1e-6)


def test_distill_names_the_distillation_that_fits_the_model(make_model):
    assert isinstance(default_task(make_model("llama"), "distill"), LogitDistillation)
    assert isinstance(default_task(make_model("bert"), "distill"), EmbeddingDistillation)


def test_contrastive_loss_has_a_gradient(make_model, make_batches):
    model = make_model("bert")
    batch = make_batches(n=1, batch=4)[0]
    loss = ContrastiveLoss()(model, batch)
    assert torch.isfinite(loss) and float(loss) > 0
    (g,) = torch.autograd.grad(loss, [model.encoder.layer[0].attention.self.query.weight])
    assert g.abs().sum() > 0


def test_default_task_and_bad_task(make_model):
    assert default_task(make_model("llama")) is causal_lm_loss
    assert isinstance(default_task(make_model("bert")), EmbeddingDistillation)
    assert isinstance(default_task(make_model("bert"), encoder="contrastive"), ContrastiveLoss)
    with pytest.raises(PrehabError, match="unknown task"):
        default_task(make_model("bert"), "mse")


# ---------------------------------------------------------------------------------------------
# Prehab pieces


def test_lambda_warmup_is_exponential_then_flat():
    lams = [lambda_schedule(s, 10.0, 1e-3, 4) for s in range(6)]
    assert lams[0] == pytest.approx(1e-3)
    for a, b in zip(lams[:4], lams[1:5]):
        assert b / a == pytest.approx((10.0 / 1e-3) ** 0.25)
    assert lams[4] == lams[5] == 10.0
    assert lambda_schedule(0, 10.0, 1e-3, 0) == 10.0


def test_layer_input_grams_share_groups_and_skip_padding(make_model, make_batches):
    model = make_model("llama")
    batches = make_batches(n=2, batch=2, pad_last=7)
    names = plan_targets(model).targets
    grams = layer_input_grams(model, names, batches)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert grams[q][0] is grams[k][0]  # one covariance for q/k/v
    # by hand: the input of o_proj over unpadded tokens
    xs = []
    name = "model.layers.1.self_attn.o_proj"
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    x = torch.cat([xi[b["attention_mask"].bool()] for xi, b in zip(xs, batches)]).double()
    want = x.T @ x / x.shape[0]
    got, tokens = grams[name]
    assert tokens == 2 * 2 * 24 - 7
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_surrogate_gradient_matches_autograd_through_float64_svd(make_model, make_batches):
    """The regularizer's gradient (batched op, warm-started power iteration) equals autograd of
    ‖WL‖_F²/σ₁(WL)² through a float64 SVD."""
    model = make_model("llama").double()
    batches = make_batches(n=2, batch=2)
    names = plan_targets(model).targets
    grams = layer_input_grams(model, names, batches)
    from prehab_svd.training.whitening import _square_factor

    factors = {n: _square_factor(g, 0.0) for n, (g, _t) in grams.items()}
    wt = WhitenedTargets(model, names, factors)
    for _ in range(50):  # warm-started power iteration: each call continues from the last vectors
        wt.values("stable", grad=False)
    weights = [model.get_submodule(n).weight for n in names]
    (wt.values("stable").mean()).backward()
    for n, w in zip(names, weights):
        L = factors[n].to(torch.float32).to(torch.float64)  # the factor as used (stored in fp32)
        W = w.detach().clone().requires_grad_(True)
        s = torch.linalg.svdvals(W @ L)
        (s.square().sum() / s[0].square() / len(names)).backward()
        cos = torch.nn.functional.cosine_similarity(w.grad.flatten(), W.grad.flatten(), dim=0)
        assert cos > 0.999, n
        assert (w.grad - W.grad).norm() < 1e-4 * W.grad.norm(), n


@pytest.mark.parametrize("kind", ["stable", "nuclear"])
def test_bf16_weights_get_a_bf16_factor(kind, make_model, make_batches, monkeypatch):
    """With bf16 weights the op gets L in bf16 (the bf16 tensor-core path of M = W L, not tf32);
    fp32 weights keep the fp32 factor. The values stay within the op's bf16 tolerance of the float64
    surrogate of W·L with the exact (fp32) factor."""
    import prehab_svd.ops as ops
    from prehab_svd.training.whitening import _square_factor

    model = make_model("llama")
    batches = make_batches(n=2, batch=2)
    names = plan_targets(model).targets
    grams = layer_input_grams(model, names, batches)
    factors = {n: _square_factor(g, 0.0) for n, (g, _t) in grams.items()}
    seen = []
    real = ops.stable_rank

    def spy(W, L=None, **kw):
        seen.append((W.dtype, None if L is None else L.dtype))
        return real(W, L, **kw)

    monkeypatch.setattr(ops, "stable_rank", spy)
    WhitenedTargets(model, names, factors).values(kind, grad=False)
    assert seen and all(ld == torch.float32 for _wd, ld in seen)
    seen.clear()
    model = model.to(torch.bfloat16)
    wt = WhitenedTargets(model, names, factors)
    for _ in range(30):  # warm-started power iteration ("stable") converges over calls
        vals = wt.values(kind, grad=False)
    assert seen and all(wd == torch.bfloat16 and ld == torch.bfloat16 for wd, ld in seen)
    for n, v in zip(names, vals):
        M = model.get_submodule(n).weight.double() @ factors[n].to(torch.float32).double()
        s = torch.linalg.svdvals(M)
        want = s.square().sum() / s[0].square() if kind == "stable" else s.sum().square() / s.square().sum()
        assert abs(v.item() - want.item()) <= 1e-2 * want.item(), (n, v.item(), want.item())


def test_tail_surrogate_value_and_gradient_match_float64_svd(make_model, make_batches):
    """surrogate="tail": Σ_{i>r}σᵢ²/‖WL‖_F² at the rank keep_ratio gives each shape, its gradient
    (top-r subspace held fixed) equal to autograd through a float64 SVD."""
    from prehab_svd.models import rank_for
    from prehab_svd.training.whitening import _square_factor

    model = make_model("llama").double()
    batches = make_batches(n=2, batch=2)
    names = plan_targets(model).targets
    grams = layer_input_grams(model, names, batches)
    factors = {n: _square_factor(g, 0.0) for n, (g, _t) in grams.items()}
    wt = WhitenedTargets(model, names, factors, keep_ratio=0.45)
    vals = wt.values("tail")
    vals.sum().backward()
    for n, v in zip(names, vals):
        w = model.get_submodule(n).weight
        L = factors[n].to(torch.float32).to(torch.float64)
        W = w.detach().clone().requires_grad_(True)
        s = torch.linalg.svdvals(W @ L)
        r = rank_for(w.shape[0], w.shape[1], 0.45)
        ref = s[r:].square().sum() / s.square().sum()
        ref.backward()
        assert 0 < ref < 1 and abs(v.item() - ref.item()) < 1e-5 * ref.item(), n
        cos = torch.nn.functional.cosine_similarity(w.grad.flatten(), W.grad.flatten(), dim=0)
        assert cos > 0.9999 and (w.grad - W.grad).norm() < 1e-4 * W.grad.norm(), n


def test_tail_prehab_lowers_the_truncation_error(make_model, make_batches):
    """A short Prehab with the tail surrogate lowers svd-llm's calibration error at that keep ratio."""
    batches = make_batches(n=3, batch=2)
    model = make_model("llama")
    plain = copy.deepcopy(model)
    report = prehab(model, batches, batches, steps=15, lam=1.0, lam_start=1e-2, warmup_steps=3, lr=3e-3,
                    surrogate="tail", keep_ratio=0.4)
    assert report.steps[-1].surrogate < 0.7 * report.steps[0].surrogate
    err = [sum(r.rel_error_after for r in compress(m, "svd-llm", 0.4, batches).layers) for m in (model, plain)]
    assert err[0] < 0.7 * err[1]


@pytest.mark.parametrize("track", [False, True])
def test_truncated_forward_is_the_svd_llm_compressed_model(track, make_model, make_batches):
    """Inside WhitenedTargets.truncated() the model computes what svd-llm's compression at that keep
    ratio computes (same calibration, the exact statistics: shrinkage 0), and the layers are restored
    afterwards."""
    from prehab_svd.training.whitening import _square_factor

    model = make_model("llama")
    batches = make_batches(n=3, batch=2)
    names = plan_targets(model).targets
    grams = layer_input_grams(model, names, batches)
    wt = WhitenedTargets(model, names, {n: _square_factor(g, 0.0) for n, (g, _t) in grams.items()},
                         keep_ratio=0.4)
    wt.track = track  # tracked: the first projections are the exact ones, run as two factors
    compressed = copy.deepcopy(model)
    compress(compressed, "svd-llm", 0.4, batches, shrinkage=0.0)
    with torch.no_grad():
        want, dense = compressed(**batches[0]).logits, model(**batches[0]).logits
        with wt.truncated():
            got = model(**batches[0]).logits
        again = model(**batches[0]).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (dense - want).abs().max() > 1e-2 * want.abs().max()  # the truncation does change it
    assert torch.equal(again, dense)
    assert all("forward" not in model.get_submodule(n).__dict__ for n in names)


@pytest.mark.parametrize("track,split,bound", [(False, False, 0.5), (True, False, 0.5), (True, True, 0.7)])
def test_compressed_surrogate_makes_svd_llm_closer_to_the_original(track, split, bound, make_model, make_batches):
    """surrogate="compressed" with a distillation task (logits to the original's): after a short
    Prehab, svd-llm at that keep ratio lands much closer to the original than svd-llm of the
    original itself, while the dense model stays closer still. Exact projector on whole batches
    (the old behaviour), tracked, and tracked with split batches (the default; each term then sees
    one of each batch's two sequences: measured 0.31, 0.32 and 0.59 of the distance before)."""
    batches = make_batches(n=3, batch=2)
    original = make_model("llama")
    tuned, plain = copy.deepcopy(original), copy.deepcopy(original)

    def distance(m, batch):
        with torch.no_grad():
            ref = original(**batch).logits
        return (m(**batch).logits - ref).square().mean() / ref.square().mean()

    report = prehab(tuned, batches, batches, steps=20, lam=1.0, warmup_steps=0, lr=3e-4,
                    surrogate=CompressedTask(track=track, split=split), keep_ratio=0.4, task=distance)
    assert report.steps[-1].surrogate < 0.5 * report.steps[0].surrogate
    compress(tuned, "svd-llm", 0.4, batches)
    compress(plain, "svd-llm", 0.4, batches)
    with torch.no_grad():
        after = sum(distance(tuned, b) for b in batches).item()
        before = sum(distance(plain, b) for b in batches).item()
    assert after < bound * before
    assert report.steps[-1].task_loss < 0.5 * report.steps[-1].surrogate


@pytest.mark.parametrize("surrogate", ["stable", "nuclear"])
def test_short_prehab_lowers_the_mean_whitened_stable_rank(surrogate, make_model, make_batches):
    model = make_model("llama")
    before = copy.deepcopy(model)
    batches = make_batches(n=3, batch=2)
    steps = []
    report = prehab(model, batches, batches, steps=15, lam=1.0, lam_start=1e-2, warmup_steps=3, lr=3e-3,
                    surrogate=surrogate, callback=steps.append)
    assert len(report.steps) == 15 and steps == report.steps
    assert report.mean_stable_rank_after < 0.8 * report.mean_stable_rank_before
    # the logged stable rank is the whitened one, and falls
    assert report.steps[-1].stable_rank < report.steps[0].stable_rank
    assert all(math.isfinite(s.task_loss) and math.isfinite(s.surrogate) for s in report.steps)
    # the exact per-layer stable ranks agree with the spectra kept for the plot
    assert report.stable_rank_after == [stable_rank_of(s) for s in report.spectra_after]
    changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert changed and model.training is False


def test_prehab_with_lambda_zero_is_plain_fine_tuning(make_model, make_batches):
    """λ = 0: the same steps as AdamW on the task loss alone."""
    batches = make_batches(n=2, batch=2)
    a = make_model("llama")
    b = copy.deepcopy(a)
    prehab(a, batches, batches, steps=3, lam=0.0, lr=1e-3, grad_clip=None)
    opt = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.0)
    for i in range(3):
        opt.zero_grad()
        causal_lm_loss(b, batches[i % 2]).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_statistics_block_by_block_give_the_same_prehab(make_model, make_batches):
    """stats_blocks=1: one forward pass over the calibration batches per block, that block's
    covariances only; the same Grams (bitwise), so the same training."""
    calib, train = make_batches(n=3, batch=2, pad_last=4), make_batches(n=2, batch=2, seed=5)
    runs = {}
    for blocks in (None, 1, 2):
        model = make_model("llama", layers=3)
        calls = []
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        rep = prehab(model, calib, train, steps=2, lr=1e-3, stats_blocks=blocks)
        runs[blocks] = (model.state_dict(), rep, len(calls))
    whole, _rep, n_whole = runs[None]
    for blocks, passes in ((1, 3), (2, 2)):
        state, rep, n = runs[blocks]
        assert n - n_whole == (passes - 1) * len(calib)  # one more calibration pass per extra group
        assert all(torch.equal(state[k], whole[k]) for k in whole), blocks
        assert rep.stable_rank_before == runs[None][1].stable_rank_before


def test_statistics_blocks_per_pass_follow_the_free_memory(make_model, make_batches, monkeypatch):
    """stats_blocks=None: as many blocks per pass as fit in a quarter of the free memory (20 bytes
    per covariance entry of every targeted layer); all of them when that is unknown."""
    from prehab_svd.training import whitening

    model = make_model("llama", layers=3, hidden=32, intermediate=64)
    plan = plan_targets(model)
    # a block: q, k, v, o, gate, up read 32 features, down 64
    per_block = 20 * (6 * 32 ** 2 + 64 ** 2)
    cpu = torch.device("cpu")
    for free, want in ((None, 3), (10 ** 12, 3), (4 * per_block, 1), (8 * per_block, 2), (1, 1)):
        monkeypatch.setattr(whitening, "_free_memory", lambda _d, f=free: f)
        assert whitening.stats_blocks_that_fit(model, plan, cpu) == want, free
    monkeypatch.undo()
    assert whitening._free_memory(cpu) > 0  # /proc/meminfo on Linux


@pytest.mark.parametrize("kwargs,msg", [
    (dict(steps=0), "steps"),
    (dict(stats_blocks=0), "stats_blocks"),
    (dict(surrogate="trace"), "surrogate"),
    (dict(surrogate="tail"), "needs keep_ratio"),
    (dict(surrogate="tail", keep_ratio=1.0), "needs keep_ratio"),
    (dict(surrogate="stable", keep_ratio=0.5), "only used by surrogate='tail' or 'compressed'"),
    (dict(surrogate="compressed"), "needs keep_ratio"),
    (dict(lam=-1.0), "lam"),
    (dict(optimizer="lion"), "optimizer"),
    (dict(targets=["*.nothing"]), "no nn.Linear"),
])
def test_prehab_bad_arguments(kwargs, msg, make_model, make_batches):
    model = make_model("llama")
    with pytest.raises(PrehabError, match=msg):
        prehab(model, make_batches(), make_batches(), **kwargs)


def test_prehab_empty_data_is_an_error(make_model, make_batches):
    with pytest.raises(PrehabError, match="training data is empty"):
        prehab(make_model("llama"), make_batches(), [])


# ---------------------------------------------------------------------------------------------
# rehab


def test_rehab_trains_lora_on_the_factors_and_merges_back(make_model, make_batches):
    model = make_model("llama")
    batches = make_batches(n=2, batch=2)
    compress(model, "svd-llm", 0.5, batches)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    n_params = sum(p.numel() for p in model.parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "U" not in n.split(".")[-1]
              and "V" not in n.split(".")[-1]}
    before = float(causal_lm_loss(model, batches[0]))
    report = rehab(model, batches[:1], steps=30, lr=1e-2, lora_rank=2)
    after = float(causal_lm_loss(model, batches[0]))
    assert after < before
    assert report.steps[-1]["task_loss"] < report.steps[0]["task_loss"]
    # same ranks, no extra parameters, no adapter left behind
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    # only the factors changed
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert report.trainable_params == sum(2 * (m.U.shape[0] + m.rank) + 2 * (m.rank + m.V.shape[1])
                                          for m in model.modules() if isinstance(m, LowRankLinear))


def test_rehab_of_an_encoder_distils_to_the_given_original(make_model, make_batches):
    model = make_model("bert")
    original = copy.deepcopy(model)
    batches = make_batches(n=2, batch=4)
    compress(model, "svd-llm", 0.4, batches)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random tiny encoder barely notices compression: damage it for real
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.U.add_(0.5 * torch.randn(m.U.shape, generator=g))
    with pytest.raises(PrehabError, match="reference"):
        rehab(model, batches, steps=1)
    loss = EmbeddingDistillation(original)
    before = float(loss(model, batches[0]))
    assert before > 1e-3
    rehab(model, batches, steps=20, lr=5e-3, reference=original)
    assert float(loss(model, batches[0])) < 0.7 * before


def test_rehab_needs_a_compressed_model(make_model, make_batches):
    with pytest.raises(PrehabError, match="no LowRankLinear"):
        rehab(make_model("llama"), make_batches(), steps=1)


def test_rehab_leaves_the_reference_trainable_and_zs_svd_works_on_a_frozen_model(make_model, make_batches):
    """Regression: distilling toward a reference once froze its parameters, and zs-svd on a copy of
    a frozen model then had no gradient."""
    original = make_model("bert")
    batches = make_batches(n=2, batch=4)
    model = copy.deepcopy(original)
    compress(model, "svd-llm", 0.5, batches)
    rehab(model, batches, steps=1, reference=original)
    assert all(p.requires_grad for p in original.parameters())
    frozen = copy.deepcopy(original).requires_grad_(False)
    report = compress(frozen, "zs-svd", 0.5, batches, grad_samples=4)
    assert report.layers and not frozen.embeddings.word_embeddings.weight.requires_grad
    for layer in report.layers:  # a layer kept dense is frozen as before
        if layer.rank is None:
            assert not frozen.get_submodule(layer.name).weight.requires_grad
