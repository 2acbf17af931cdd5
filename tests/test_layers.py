"""LowRankLinear: construction, optimality of from_linear, dense round trip, autograd, compile."""

import pytest
import torch
from torch import nn

from prehab_svd import LowRankLinear, PrehabError


def test_from_linear_is_eckart_young_optimal():
    torch.manual_seed(0)
    lin = nn.Linear(37, 23).double()
    r = 7
    low = LowRankLinear.from_linear(lin, r)
    assert low.U.shape == (23, r) and low.V.shape == (r, 37) and low.rank == r
    s = torch.linalg.svdvals(lin.weight.detach())
    err = (lin.weight - low.weight).norm() ** 2
    assert err.item() == pytest.approx((s[r:] ** 2).sum().item(), rel=1e-10)
    x = torch.randn(5, 37, dtype=torch.float64)
    ref = x @ low.weight.T + lin.bias
    assert torch.allclose(low(x), ref, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_to_dense_and_from_factors(bias):
    torch.manual_seed(1)
    U, V = torch.randn(11, 3), torch.randn(3, 9)
    b = torch.randn(11) if bias else None
    low = LowRankLinear.from_factors(U, V, b)
    dense = low.to_dense()
    assert isinstance(dense, nn.Linear) and (dense.bias is not None) == bias
    x = torch.randn(2, 4, 9)
    assert torch.allclose(dense(x), low(x), atol=1e-5)
    assert torch.allclose(dense.weight, (U.double() @ V.double()).float(), atol=1e-6)
    # a copy, not a view of the caller's tensors
    U.zero_()
    assert low.U.abs().sum() > 0


def test_state_dict_round_trip_and_init():
    torch.manual_seed(2)
    a = LowRankLinear(20, 30, 5)
    assert set(a.state_dict()) == {"U", "V", "bias"}
    b = LowRankLinear(20, 30, 5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 20)
    assert torch.equal(a(x), b(x))
    # initial weight scale equals nn.Linear's (variance 1/(3·in)); averaged over seeds
    ratios = []
    for seed in range(20):
        torch.manual_seed(seed)
        w_low = LowRankLinear(200, 300, 50, bias=False).weight.detach()
        w_lin = nn.Linear(200, 300, bias=False).weight.detach()
        ratios.append(float(w_low.std() / w_lin.std()))
    assert abs(sum(ratios) / len(ratios) - 1) < 0.05, ratios


def test_autograd_matches_dense_math():
    torch.manual_seed(3)
    low = LowRankLinear(13, 7, 4).double()
    x = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    low(x).square().sum().backward()
    gU, gV, gb, gx = low.U.grad.clone(), low.V.grad.clone(), low.bias.grad.clone(), x.grad.clone()
    U, V, b = (t.detach().clone().requires_grad_() for t in (low.U, low.V, low.bias))
    x2 = x.detach().clone().requires_grad_()
    ((x2 @ V.T) @ U.T + b).square().sum().backward()
    for g1, g2 in ((gU, U.grad), (gV, V.grad), (gb, b.grad), (gx, x2.grad)):
        assert torch.allclose(g1, g2, atol=1e-10)


def test_torch_compile():
    torch.manual_seed(4)
    low = LowRankLinear(16, 8, 3)
    x = torch.randn(5, 16)
    compiled = torch.compile(low, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), low(x), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(PrehabError, match="rank"):
        LowRankLinear(4, 4, 0)
    with pytest.raises(PrehabError, match="same rank"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(3, 5))
    with pytest.raises(PrehabError, match="bias"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 5), torch.randn(3))
    with pytest.raises(PrehabError, match="nn.Linear"):
        LowRankLinear.from_linear(nn.ReLU(), 2)
    for bad in (0, True, 2.0):  # the same rank check as the closed forms (linalg.check_rank)
        with pytest.raises(PrehabError, match="rank must be a positive integer"):
            LowRankLinear.from_linear(nn.Linear(4, 4), bad)
