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


# ---------------------------------------------------------------------------------------------
# the padded storage: row strides multiples of 16, exactly `rank` columns everywhere else
# ---------------------------------------------------------------------------------------------


def _assert_padded(layer):
    for p, cols in ((layer.U, layer.rank), (layer.V, layer.in_features)):
        assert p.stride(1) == 1 and p.stride(0) % 16 == 0 and p.stride(0) - cols < 16, (p.shape, p.stride())


@pytest.mark.parametrize("rank", [13, 16, 819])
def test_padded_storage_and_parameter_count(rank):
    """Row strides of U and V padded to 16, parameters exactly rank·(in + out) (+ bias), padding zero."""
    layer = LowRankLinear(40, 24, rank)
    _assert_padded(layer)
    assert layer.U.shape == (24, rank) and layer.V.shape == (rank, 40)
    assert layer.num_params == rank * (40 + 24) + 24
    r16 = -(-rank // 16) * 16
    assert layer.padding_elements == 24 * (r16 - rank) + rank * (48 - 40)
    assert (layer.U.stride(0) == r16) and (rank % 16 == 0) == layer.U.is_contiguous()
    buf = torch.as_strided(layer.U, (24, r16), (r16, 1))  # the whole buffer, padding included
    assert (buf[:, rank:] == 0).all()
    x = torch.randn(3, 40)
    ref = (x.double() @ layer.V.double().T) @ layer.U.double().T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_padding_survives_conversions_and_copies():
    import copy
    import pickle

    torch.manual_seed(5)
    layer = LowRankLinear.from_factors(torch.randn(24, 13), torch.randn(13, 45), torch.randn(24))
    _assert_padded(layer)
    x = torch.randn(4, 45)
    y = layer(x)
    for other, tol in ((copy.deepcopy(layer), 0), (pickle.loads(pickle.dumps(layer)), 0),
                       (copy.deepcopy(layer).double().float(), 0), (copy.deepcopy(layer).half().float(), 1e-2),
                       (copy.deepcopy(layer).to("cpu", torch.float64), 1e-6)):
        _assert_padded(other)
        assert other.U.shape == (24, 13) and other.V.shape == (13, 45)
        out = other(x.to(other.U.dtype)).float()
        assert ((out - y).norm() / y.norm()).item() <= tol
    p = layer.U
    layer.to(torch.float64)
    assert layer.U is p  # the same Parameter object (optimizers keep their references)
    _assert_padded(layer)


@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_is_contiguous_and_load_repads(assign):
    torch.manual_seed(6)
    a = LowRankLinear(45, 24, 13)
    sd = a.state_dict()
    assert sd["U"].shape == (24, 13) and sd["V"].shape == (13, 45)
    assert all(t.is_contiguous() for t in sd.values())  # what safetensors can store
    assert sd["U"].untyped_storage().nbytes() == 24 * 13 * 4  # exactly r columns, no padding bytes
    b = LowRankLinear(45, 24, 13)
    b.load_state_dict(sd, assign=assign)
    _assert_padded(b)
    x = torch.randn(3, 45)
    assert torch.equal(a(x), b(x))  # same layout, same arithmetic
    assert a.state_dict(keep_vars=True)["U"] is a.U


def test_safetensors_round_trip_bit_identical(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(7)
    model = nn.Sequential(LowRankLinear(45, 37, 13), nn.ReLU(), LowRankLinear(37, 20, 819 % 20 + 1))
    st.save_model(model, str(tmp_path / "m.safetensors"))
    loaded = st.load_file(str(tmp_path / "m.safetensors"))
    assert loaded["0.U"].shape == (37, 13) and loaded["2.V"].shape == (819 % 20 + 1, 37)
    other = nn.Sequential(LowRankLinear(45, 37, 13), nn.ReLU(), LowRankLinear(37, 20, 819 % 20 + 1))
    missing, unexpected = st.load_model(other, str(tmp_path / "m.safetensors"))
    assert not missing and not unexpected
    for layer in (other[0], other[2]):
        _assert_padded(layer)
    x = torch.randn(5, 45)
    assert torch.equal(model(x), other(x))


def test_optimizer_step_keeps_layout_and_zero_padding():
    torch.manual_seed(8)
    layer = LowRankLinear(45, 24, 13)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(6, 45)).square().sum().backward()
        opt.step()
    _assert_padded(layer)
    buf = torch.as_strided(layer.U, (24, 16), (16, 1))
    assert (buf[:, 13:] == 0).all() and layer.U.grad.shape == (24, 13)


def test_unpad_for_fsdp_and_repad():
    """unpad() makes every layer's factors contiguous (what FSDP2's fully_shard requires) and keeps
    them so through conversions and loads; repad_() restores the padded layout; same outputs."""
    import copy

    from prehab_svd.layers import unpad

    torch.manual_seed(9)
    model = nn.Sequential(LowRankLinear(45, 24, 13), nn.ReLU(), LowRankLinear(24, 20, 5))
    x = torch.randn(3, 45)
    y = model(x)
    assert unpad(model) == 4 and unpad(model) == 0  # U and V of both layers (45 and 24 are ragged too)
    for layer in (model[0], model[2]):
        assert layer.U.is_contiguous() and layer.V.is_contiguous() and layer.padding_elements == 0
    model.double().float()
    model.load_state_dict(copy.deepcopy(model).state_dict())
    assert all(p.is_contiguous() for p in model.parameters())
    assert torch.equal(model(x), y) or torch.allclose(model(x), y, rtol=1e-6, atol=1e-6)
    model[0].repad_()
    _assert_padded(model[0])
    assert torch.allclose(model(x), y, rtol=1e-6, atol=1e-6)
    # a factor shared into another module (as rehab's adapters share U and V) is reached too
    layer = LowRankLinear(45, 24, 13)
    holder = nn.Linear(13, 24, bias=False, device="meta")
    holder.weight = layer.U
    assert unpad(holder) == 1 and layer.U.is_contiguous()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 5), ()])
def test_padded_z_forward_matches_two_linears(bias, lead):
    """The CUDA inference forward of the torch backend (z in a [T, r16] buffer), run here on CPU
    tensors: the same products as F.linear twice, z written in place with its padded stride."""
    from prehab_svd.layers import _lowrank_padded_z

    torch.manual_seed(10)
    layer = LowRankLinear(45, 24, 13, bias=bias)
    x = torch.randn(*lead, 45)
    with torch.no_grad():
        y = _lowrank_padded_z(x, layer.U, layer.V, layer.bias)
        ref = torch.nn.functional.linear(torch.nn.functional.linear(x, layer.V), layer.U, layer.bias)
    assert y.shape == (*lead, 24)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the padded-z path is CUDA only)")
@pytest.mark.parametrize("T", [1, 16, 300])
def test_cuda_torch_backend_forward_with_padded_z(T):
    torch.manual_seed(11)
    layer = LowRankLinear(512, 384, 819 % 512, backend="torch").to("cuda", torch.bfloat16)
    x = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    ref = (x.double() @ layer.V.double().T) @ layer.U.double().T + layer.bias.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2
