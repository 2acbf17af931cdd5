"""ZS-SVD: the zero-sum selection traced by hand, the budget, the break-even rule, the first-order
estimates, the correction step, and compress(method="zs-svd") on tiny models."""

import copy
import math

import pytest
import torch
from torch import nn

from prehab_svd import LowRankLinear, PrehabError, compress
from prehab_svd.linalg import whitening_factor
from prehab_svd.models import plan_targets
from prehab_svd.methods.zs_svd import (
    MatrixCandidates, break_even_rank, corrected_lowrank, predicted_changes, projected_correction,
    whitened_spectrum, zero_sum_select,
)


def _mat(name, deltas, m=8, n=8, min_rank=1):
    k = min(m, n)
    sigma = torch.arange(k, 0, -1, dtype=torch.float64)  # largest first
    return MatrixCandidates(name, m, n, sigma, torch.tensor(deltas, dtype=torch.float64), min_rank)


# ΔL per component, index 0 = largest σ; components are offered from index 7 (smallest σ) upward.
# Dyadic values, so every running sum below is exact in floating point.
A_DELTAS = [9.9, -0.75, -0.0625, 0.375, 0.0625, -0.25, 0.5, 0.125]
B_DELTAS = [9.9, 9.9, 9.9, 0.75, -0.5, -0.125, 0.25, -0.375]


def test_break_even_rank():
    assert break_even_rank(8, 8) == 3  # 3·16 = 48 < 64 <= 4·16
    assert break_even_rank(4096, 11008) == 2985
    for m, n in [(8, 8), (3, 17), (64, 32), (4096, 11008)]:
        r = break_even_rank(m, n)
        assert r * (m + n) < m * n <= (r + 1) * (m + n)


def test_zero_sum_rule_traced_by_hand():
    """Worked by hand from the rule (running sum <= 0: take the smallest |ΔL| among the positive
    candidates, else among the negative ones; each matrix offers its smallest remaining σ). Two 8×8
    matrices, r* = 3, dense 64 each, budget floor(0.5·128) = 64:

    step  sum before  heap  taken          sum after  kept
    1      0          +     A7 (+0.125)     0.125     128   (A rank 7: above r*, still dense)
    2      0.125      -     B7 (-0.375)    -0.25      128
    3     -0.25       +     B6 (+0.25)      0         128   (B6 +0.25 beats A6 +0.5)
    4      0          +     A6 (+0.5)       0.5       128   (sum <= 0 counts as "take positive")
    5      0.5        -     B5 (-0.125)     0.375     128   (B5 beats A5 -0.25)
    6      0.375      -     A5 (-0.25)      0.125     128   (A5 beats B4 -0.5)
    7      0.125      -     B4 (-0.5)      -0.375     128
    8     -0.375      +     A4 (+0.0625)   -0.3125    128
    9     -0.3125     +     A3 (+0.375)     0.0625    112   (A reaches r* = 3: 64 -> 48)
    10     0.0625     -     A2 (-0.0625)    0          96
    11     0          +     B3 (+0.75)      0.75       80   (B reaches r*)
    12     0.75       -     A1 (-0.75)      0          64   (budget met: stop)
    """
    sel = zero_sum_select([_mat("A", A_DELTAS), _mat("B", B_DELTAS)], 0.5)
    assert sel.order == [("A", 7), ("B", 7), ("B", 6), ("A", 6), ("B", 5), ("A", 5), ("B", 4),
                         ("A", 4), ("A", 3), ("A", 2), ("B", 3), ("A", 1)]
    assert sel.ranks == {"A": 1, "B": 3}
    assert sel.budget == 64 and sel.params_kept == 64 and sel.params_dense == 128
    assert sel.running_sum == 0.0
    assert sel.drops == 12


def test_break_even_matrix_above_r_star_stays_dense():
    """Budget floor(0.9·128) = 115: the first saving (A reaching r* at step 9, kept 112) meets it.
    B ends at rank 4 > r* = 3, so it stays dense (None) and counts m·n."""
    sel = zero_sum_select([_mat("A", A_DELTAS), _mat("B", B_DELTAS)], 0.9)
    assert sel.ranks == {"A": 3, "B": None}
    assert sel.params_kept == 48 + 64 and sel.budget == 115
    assert len(sel.order) == 9


def test_unreachable_budget_is_a_clear_error():
    with pytest.raises(PrehabError, match="cannot be met"):
        zero_sum_select([_mat("A", A_DELTAS, min_rank=6), _mat("B", B_DELTAS, min_rank=6)], 0.5)
    with pytest.raises(PrehabError, match="min_rank"):
        zero_sum_select([_mat("A", A_DELTAS, min_rank=0)], 0.5)
    with pytest.raises(PrehabError, match="singular values"):
        zero_sum_select([MatrixCandidates("A", 8, 8, torch.ones(7), torch.zeros(7))], 0.5)


@pytest.mark.parametrize("seed", range(6))
def test_budget_met_exactly_on_random_problems(seed):
    """Kept <= budget, and the last drop was needed (before it, kept > budget); ranks and kept agree."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for i in range(int(torch.randint(2, 7, (1,), generator=g))):
        m, n = (int(v) for v in torch.randint(3, 40, (2,), generator=g))
        k = min(m, n)
        sigma = torch.sort(torch.rand(k, generator=g, dtype=torch.float64), descending=True).values
        mats.append(MatrixCandidates(f"w{i}", m, n, sigma, torch.randn(k, generator=g, dtype=torch.float64)))
    keep = float(torch.empty(1).uniform_(0.2, 0.9, generator=g))
    sel = zero_sum_select(mats, keep)
    assert sel.budget == math.floor(keep * sum(c.m * c.n for c in mats))
    kept = sum(c.m * c.n if sel.ranks[c.name] is None else sel.ranks[c.name] * (c.m + c.n) for c in mats)
    assert kept == sel.params_kept <= sel.budget
    # undo the last drop: the budget was not yet met
    name, idx = sel.order[-1]
    c = next(c for c in mats if c.name == name)
    assert c.params(idx + 1) - c.params(idx) > 0  # the last drop saved parameters
    assert kept + c.params(idx + 1) - c.params(idx) > sel.budget
    # every matrix dropped its smallest σ first: per matrix the indices go down one by one
    for c in mats:
        idxs = [i for nm, i in sel.order if nm == c.name]
        assert idxs == list(range(min(c.m, c.n) - 1, min(c.m, c.n) - 1 - len(idxs), -1))


def _spd(d, n_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
    return x.T @ x / n_tokens


@pytest.mark.parametrize("tokens", [200, 7])  # full rank (Cholesky) and singular (eigen pseudo-factor)
def test_predicted_change_is_the_first_order_change_of_dropping_a_component(tokens):
    g = torch.Generator().manual_seed(1)
    m, n = 9, 13
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    f = whitening_factor(_spd(n, tokens, 2))
    sigma, delta = whitened_spectrum(W, f, G)
    assert sigma.shape == delta.shape == (min(m, n),)
    U, S, Vh = torch.linalg.svd(W @ f.R, full_matrices=False)
    for i in range(S.numel()):
        dW = -S[i] * torch.outer(U[:, i], f.right_solve(Vh[i:i + 1])[0])  # W' − W, whitened back
        assert float(delta[i]) == pytest.approx(float((G * dW).sum()), rel=1e-9, abs=1e-12)
    if S.numel() < min(m, n):  # singular covariance: padded components change nothing
        assert torch.all(sigma[S.numel():] == 0) and torch.all(delta[S.numel():] == 0)
    assert torch.allclose(predicted_changes((U, S, Vh), f.right_solve_t(G)), delta[:S.numel()])


def test_projected_correction_cancels_first_order_change():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(10, 12, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    A_r = (U[:, :4] * S[:4]) @ Vh[:4]
    H = torch.randn(3, 10, 12, generator=g, dtype=torch.float64)
    A_c = projected_correction(A, A_r, H, eps=1e-12)
    before = torch.einsum("kij,ij->k", H, A_r - A)
    after = torch.einsum("kij,ij->k", H, A_c - A)
    assert before.abs().max() > 1e-2
    assert after.abs().max() < 1e-9 * before.abs().max()
    # zero gradients: nothing to correct
    assert torch.equal(projected_correction(A, A_r, torch.zeros(2, 10, 12, dtype=torch.float64)), A_r)


def test_corrected_lowrank_has_the_rank_and_reduces_to_truncation_without_gradients():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(9, 13, generator=g)
    f = whitening_factor(_spd(13, 300, 5))
    U, V = corrected_lowrank(W, f, 5, torch.zeros(2, 9, 13))
    from prehab_svd.linalg import whitened_lowrank

    U0, V0 = whitened_lowrank(W, f.R @ f.R.T, 5)
    assert torch.allclose(U @ V, U0 @ V0, atol=1e-5)
    U, V = corrected_lowrank(W, f, 5, torch.randn(3, 9, 13, generator=g))
    assert U.shape == (9, 5) and V.shape == (5, 13) and torch.isfinite(U @ V).all()
    assert torch.linalg.matrix_rank(U.double() @ V.double()) == 5


# ---------------------------------------------------------------------------------------------
# compress(method="zs-svd")


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("correction", [False, True])
def test_compress_zs_svd_meets_the_budget_with_heterogeneous_ranks(kind, correction, make_model,
                                                                  make_batches):
    model = make_model(kind)
    ref = copy.deepcopy(model)
    batches = make_batches(n=4, batch=4)
    keep = 0.5
    report = compress(model, "zs-svd", keep, batches, grad_samples=12, correction=correction,
                      correction_grads=2)
    targets = plan_targets(ref).targets
    assert [layer.name for layer in report.layers] == targets
    dense_w = sum(ref.get_submodule(t).weight.numel() for t in targets)
    kept_w = 0
    for layer in report.layers:
        mod = model.get_submodule(layer.name)
        if layer.rank is None:  # reverted to the original dense weight
            assert isinstance(mod, nn.Linear)
            assert torch.equal(mod.weight, ref.get_submodule(layer.name).weight)
            kept_w += mod.weight.numel()
        else:
            assert isinstance(mod, LowRankLinear) and mod.rank == layer.rank
            be = break_even_rank(layer.out_features, layer.in_features)
            assert max(1, math.floor(0.75 * keep * be)) <= layer.rank <= be  # the default floor
            kept_w += mod.U.numel() + mod.V.numel()
    assert kept_w <= math.floor(keep * dense_w) == report.details["budget"]
    assert len({layer.rank for layer in report.layers}) > 2  # heterogeneous
    assert report.details["grad_samples"] == 12 and report.details["correction"] is correction
    out = model(**batches[0])
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(out).all()


def test_zs_svd_gradient_is_averaged_over_the_requested_sequences(make_model, make_batches):
    from prehab_svd.methods.zs_svd import ZSAllocation, ZSOptions
    from prehab_svd.tasks import causal_lm_loss

    model = make_model("llama")
    batches = make_batches(n=3, batch=2)
    names = plan_targets(model).targets[:2]
    zs = ZSAllocation(ZSOptions(task="causal_lm", grad_samples=3), 0.5, correction_grads=2)
    zs.gradients(model, names, batches)
    assert zs.samples == 3
    # by hand: batch 0 (2 sequences) and the first sequence of batch 1, weighted by sequences
    w = [model.get_submodule(n).weight for n in names]
    g0 = torch.autograd.grad(causal_lm_loss(model, batches[0]), w)
    b1 = {k: v[:1] for k, v in batches[1].items()}
    g1 = torch.autograd.grad(causal_lm_loss(model, b1), w)
    for i, n in enumerate(names):
        assert torch.allclose(zs.grads[n], (2 * g0[i] + g1[i]) / 3, atol=1e-6)
        assert torch.allclose(zs.chunk_grads[n][0], g0[i], atol=1e-6)
        assert torch.allclose(zs.chunk_grads[n][1], g1[i], atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # .grad left untouched


def test_zs_svd_bad_options(make_model, make_batches):
    model = make_model("llama")
    with pytest.raises(PrehabError, match="needs calibration"):
        compress(model, "zs-svd", 0.5)
    with pytest.raises(PrehabError, match="grad_samples"):
        compress(model, "zs-svd", 0.5, make_batches(), grad_samples=0)
    with pytest.raises(PrehabError, match="min_rank_fraction"):
        compress(model, "zs-svd", 0.5, make_batches(), min_rank_fraction=2)
    with pytest.raises(PrehabError, match="unknown task"):
        compress(model, "zs-svd", 0.5, make_batches(), task="nope")
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_default_shrinkage_is_measured_per_method(make_model, make_batches):
    """OAS for the whitening methods, the exact optimum (0) for zs-svd and the zs allocation's spectra
    (results/shrinkage_smollm2.md); the CLI leaves each method its own default."""
    from prehab_svd.compression import _setup

    m, zs = _setup("zs-svd", 0.5, torch.float32, "uniform", None, {})
    assert m.options.shrinkage == 0.0 and zs.options.shrinkage == 0.0
    m, zs = _setup("aa-svd", 0.5, torch.float32, "zs", None, {})
    assert m.options.shrinkage == "oas" and zs.options.shrinkage == 0.0
    m, zs = _setup("aa-svd", 0.5, torch.float32, "zs", None, {"shrinkage": 0.25})
    assert m.options.shrinkage == zs.options.shrinkage == 0.25
    rep = compress(make_model("llama"), "zs-svd", 0.5, make_batches(), grad_samples=2)
    assert "shrinkage" not in rep.details
    rep = compress(make_model("llama"), "svd-llm", 0.5, make_batches())
    assert set(rep.details["shrinkage"]) == {layer.group for layer in rep.layers}
