"""Tests of prehab_svd.ops: every op against an independent float64 oracle, autograd, torch.compile,
and the backend dispatch.

Tolerances are relative Frobenius errors against the oracle computed in fp64 from the *same rounded
inputs* (so they measure the op's own error, not the rounding of the inputs): 1e-5 where the op computes
and returns fp32, 1e-2 where it returns bf16/fp16. Elementwise checks against a forward-error bound
catch any output element that was never written.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import prehab_svd.ops as ops
from prehab_svd.errors import PrehabError
from prehab_svd.ops import BackendUnavailableError

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
LOW = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in fp64 (absolute error when b is zero)."""
    a, b = a.double(), b.double()
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den > 0 else num


def gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters (different inputs per case, reproducible)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# =============================================================================================
# covariance_update
# =============================================================================================


@pytest.mark.parametrize("T", [1, 7, 129, 300])
@pytest.mark.parametrize("d", [1, 5, 33, 257, 641])  # 257, 641: 2 and 4 panels of the symmetric product
@pytest.mark.parametrize("xdtype", LOW)
@pytest.mark.parametrize("cross", [False, True])
def test_covariance_update_matches_fp64(T, d, xdtype, cross):
    g = gen("cov", T, d, xdtype, cross)
    x = randn(T, d, g=g, dtype=xdtype)
    y = randn(T, d, g=g, dtype=xdtype) if cross else None
    # nonzero start values: the op must add to every element, not overwrite or skip any
    G0 = randn(d, d, g=g, scale=T**0.5)
    G0 = G0 + G0.T
    C0 = randn(d, d, g=g, scale=T**0.5) if cross else None
    G = G0.clone()
    C = C0.clone() if cross else None
    ops.covariance_update(G, x, C, y)
    assert G.dtype == torch.float32

    xd = x.double()
    G_ref = G0.double() + xd.T @ xd
    # the op returns fp32 computed from exactly upcast inputs: fp32 tolerance for every input dtype
    assert rel_err(G, G_ref) <= 1e-5
    bound = G0.double().abs() + xd.abs().T @ xd.abs()
    assert ((G.double() - G_ref).abs() <= 1e-5 * bound + 1e-30).all()
    if cross:
        yd = y.double()
        C_ref = C0.double() + xd.T @ yd
        assert rel_err(C, C_ref) <= 1e-5
        bound = C0.double().abs() + xd.abs().T @ yd.abs()
        assert ((C.double() - C_ref).abs() <= 1e-5 * bound + 1e-30).all()


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_covariance_update_fp64_accumulator(xdtype):
    g = gen("cov64", xdtype)
    x, y = randn(129, 33, g=g, dtype=xdtype), randn(129, 33, g=g, dtype=xdtype)
    G = torch.full((33, 33), 2.0, dtype=torch.float64)
    C = torch.full((33, 33), -1.0, dtype=torch.float64)
    ops.covariance_update(G, x, C, y)
    xd, yd = x.double(), y.double()
    assert rel_err(G, 2.0 + xd.T @ xd) <= 1e-13
    assert rel_err(C, -1.0 + xd.T @ yd) <= 1e-13


@pytest.mark.parametrize("d", [127, 128, 256, 300, 513, 1031])
def test_symmetric_update_panels_match_fp64(d):
    """The torch backend multiplies out only the upper block triangle of xᵀx and mirrors it: every
    entry (both triangles, ragged last panel) must equal the float64 product, added to what G held;
    x a strided view (a column slice), as the driver's token selection can give."""
    from prehab_svd.ops.reference import symmetric_update

    g = gen("sym", d)
    wide = randn(97, d + 3, g=g, dtype=torch.float64)
    x = wide[:, 2:d + 2]
    assert not x.is_contiguous()
    G0 = randn(d, d, g=g, dtype=torch.float64)
    G = G0.clone()
    symmetric_update(G, x)
    assert rel_err(G, G0 + x.T @ x) <= 1e-13
    assert ((G - G0) - (G - G0).T).abs().max() <= 1e-12 * (x.T @ x).abs().max()


def test_covariance_update_empty_batch_is_noop():
    G = torch.eye(5)
    ops.covariance_update(G, torch.zeros(0, 5, dtype=torch.bfloat16))
    assert torch.equal(G, torch.eye(5))


def test_covariance_update_rejects_bad_input():
    x = torch.randn(7, 5)
    with pytest.raises(PrehabError, match="float32 or float64|must be one of"):
        ops.covariance_update(torch.zeros(5, 5, dtype=torch.float16), x)
    with pytest.raises(PrehabError, match="must be one of"):
        ops.covariance_update(torch.zeros(5, 5, dtype=torch.bfloat16), x)
    with pytest.raises(PrehabError, match=r"G must be \[d, d\] = \[5, 5\]"):
        ops.covariance_update(torch.zeros(4, 4), x)
    with pytest.raises(PrehabError, match="y must have the shape of x"):
        ops.covariance_update(torch.zeros(5, 5), x, torch.zeros(5, 5), torch.randn(6, 5))
    with pytest.raises(PrehabError, match=r"C must be \[d, d\]"):
        ops.covariance_update(torch.zeros(5, 5), x, torch.zeros(5, 4), x)
    with pytest.raises(PrehabError, match="together"):
        ops.covariance_update(torch.zeros(5, 5), x, torch.zeros(5, 5))
    with pytest.raises(PrehabError, match="2-D"):
        ops.covariance_update(torch.zeros(5, 5), x.reshape(1, 7, 5))
    G = torch.zeros(5, 5)
    with pytest.raises(PrehabError, match="different tensors"):
        ops.covariance_update(G, x, G, x)
    with pytest.raises(PrehabError, match="dtype"):
        ops.covariance_update(torch.zeros(5, 5), x.to(torch.int32))


def test_covariance_accumulator():
    g = gen("acc")
    d = 33
    batches = [randn(2, 5, d, g=g, dtype=torch.bfloat16), randn(7, d, g=g, dtype=torch.bfloat16), randn(d, g=g)]
    pairs = [randn(*b.shape, g=g, dtype=b.dtype) for b in batches]
    acc = ops.CovarianceAccumulator(d, cross=True)
    with pytest.raises(PrehabError, match="no tokens"):
        acc.gram()
    for b, p in zip(batches, pairs):
        acc.update(b, p)
    assert acc.tokens == 10 + 7 + 1
    X = torch.cat([b.reshape(-1, d).double() for b in batches])
    Y = torch.cat([p.reshape(-1, d).double() for p in pairs])
    assert rel_err(acc.gram(normalize=False), X.T @ X) <= 1e-5
    gram = acc.gram()
    assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)  # fp32 products, fp64 sums
    assert acc.max_batch_tokens == 10 and acc.noise_floor > 1e-6
    assert rel_err(gram, X.T @ X / 18) <= 1e-5
    assert rel_err(acc.cross(), X.T @ Y / 18) <= 1e-5
    with pytest.raises(PrehabError, match="cross=True"):
        acc.update(batches[1])
    with pytest.raises(PrehabError, match=r"\[\.\.\., 33\]"):
        acc.update(torch.randn(4, 5), torch.randn(4, 5))
    acc.reset()
    assert acc.tokens == 0 and not acc.gram(normalize=False).any()

    plain = ops.CovarianceAccumulator(d, dtype=torch.float64)
    plain.update(batches[1])
    assert plain.gram().dtype == torch.float64
    with pytest.raises(PrehabError, match="cross=False"):
        plain.cross()
    with pytest.raises(PrehabError, match="cross=False"):
        plain.update(batches[1], pairs[1])
    with pytest.raises(PrehabError, match="float32 or torch.float64"):
        ops.CovarianceAccumulator(d, dtype=torch.bfloat16)
    with pytest.raises(PrehabError, match="at least as precise"):
        ops.CovarianceAccumulator(d, dtype=torch.float64, sum_dtype=torch.float32)
    inplace = ops.CovarianceAccumulator(d, sum_dtype=torch.float32)  # the old fp32 running sums
    inplace.update(batches[1])
    assert inplace.gram().dtype == torch.float32 and rel_err(inplace.gram(), plain.gram()) <= 1e-5


def test_covariance_sums_do_not_depend_on_batch_order():
    """fp64 running sums of fp32 per-batch products: the order of the batches (or their split across
    ranks) changes the result only at float64 rounding, where fp32 running sums change at fp32's."""
    g = gen("order")
    d = 48
    batches = [randn(64, d, g=g) * torch.logspace(-2, 2, d) for _ in range(24)]
    perm = torch.randperm(len(batches), generator=g).tolist()

    def gram(order, **kw):
        acc = ops.CovarianceAccumulator(d, backend="torch", **kw)
        for i in order:
            acc.update(batches[i])
        return acc.gram().double()

    fwd, bwd = gram(range(len(batches))), gram(perm)
    assert rel_err(fwd, bwd) <= 1e-13, rel_err(fwd, bwd)
    f32, b32 = gram(range(len(batches)), sum_dtype=torch.float32), gram(perm, sum_dtype=torch.float32)
    assert rel_err(f32, b32) > 1e-9  # the old scheme is order-dependent (the check can fail)


# =============================================================================================
# stable rank
# =============================================================================================


def make_spectrum_matrices(B, m, n, g, kind):
    """fp64 [B, m, n] matrices M = U diag(s) Vᵀ with a chosen spectrum.

    "stable": σ₁ = 1, σ₂ = 0.5, the rest in [0.05, 0.45]: the gap σ₂/σ₁ = 0.5 makes power iteration
    converge by a factor 4 per step, so a fixed step count gives a known accuracy (random matrices can
    have σ₁ ≈ σ₂ and then the top pair, and the gradient, are ill-defined).
    "nuclear": σ in [0.05, 1]: condition number ≤ 20, so every singular value is lifted by the default
    Newton–Schulz steps and the polar factor converges to round-off (the polar factor is discontinuous
    at σ = 0, so near-singular matrices have no well-defined reference).
    """
    k = min(m, n)
    out = []
    for _ in range(B):
        Uq, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        Vq, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        if kind == "stable":
            s = torch.rand(k, generator=g, dtype=torch.float64) * 0.4 + 0.05
            s[0] = 1.0
            if k > 1:
                s[1] = 0.5
        else:
            s = torch.rand(k, generator=g, dtype=torch.float64) * 0.95 + 0.05
        out.append(Uq @ torch.diag(s) @ Vq.T)
    return torch.stack(out)


def make_whitening(n, g):
    """Random lower-triangular L with positive diagonal, well conditioned."""
    L = torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64), -1) * (0.3 / n**0.5)
    return L + torch.diag(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)


def oracle(W: torch.Tensor, L, kind):
    """Value and gradient w.r.t. W from a fp64 SVD of M = W L (W, L: the op's rounded inputs)."""
    Wd = W.double()
    Ld = None if L is None else L.double()
    M = Wd if Ld is None else Wd @ Ld
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    f2 = M.square().sum(dim=(-2, -1))
    if kind == "stable":
        s1 = S[..., 0]
        u1, v1 = U[..., :, 0], Vh[..., 0, :]
        value = f2 / s1**2
        gM = 2 * M / s1[..., None, None] ** 2 - (2 * f2 / s1**3)[..., None, None] * (
            u1[..., :, None] * v1[..., None, :]
        )
    else:
        nuc = S.sum(-1)
        P = U @ Vh
        value = nuc**2 / f2
        gM = (2 * nuc / f2)[..., None, None] * P - (2 * nuc**2 / f2**2)[..., None, None] * M
    gW = gM if Ld is None else gM @ Ld.mT
    return value, gW


STABLE_SHAPES = [(1, 7, 5), (2, 5, 33), (3, 33, 17), (1, 129, 65), (2, 66, 129)]


@pytest.mark.parametrize("kind", ["stable", "nuclear"])
@pytest.mark.parametrize("B,m,n", STABLE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("whiten", [False, True])
def test_stable_rank_matches_svd_oracle(kind, B, m, n, dtype, whiten):
    g = gen("sr", kind, B, m, n, dtype, whiten)
    M = make_spectrum_matrices(B, m, n, g, kind)
    L = None
    if whiten:
        Ld = make_whitening(n, g)
        W = torch.linalg.solve_triangular(Ld, M, upper=False, left=False)  # W L = M
        L = Ld.to(dtype) if dtype != torch.float64 else Ld
        if B > 1 and m % 2:  # also exercise a per-matrix [B, n, n] whitening factor
            L = L.expand(B, n, n).clone()
    else:
        W = M
    W = W.to(dtype)
    value, grad, state = ops.stable_rank(W, L, kind=kind)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    assert value.shape == (B,) and grad.shape == (B, m, n)
    assert value.dtype == cd and grad.dtype == cd
    if kind == "stable":
        assert state.shape == (B, n)
    else:
        assert state is None
    ref_value, ref_grad = oracle(W, L, kind)
    # outputs are computed and returned in fp32/fp64 from the rounded inputs
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert rel_err(value, ref_value) <= tol
    assert rel_err(grad, ref_grad) <= tol
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("e", [-20, 20])
def test_stable_rank_of_16_bit_weights_far_from_unit_scale(e):
    """fp16 W near 2^-20 (and bf16 near 2^20): the op's power-of-two rescaling keeps its scale in
    fp32 (2^20 does not fit fp16), so the answer is that of the same numbers in fp32."""
    torch.manual_seed(7)
    dtype = torch.float16 if e < 0 else torch.bfloat16
    W = (torch.randn(2, 9, 6) * 2.0 ** e).to(dtype)
    v, g, _ = ops.stable_rank(W, kind="stable", iters=30, backend="torch")
    v32, g32, _ = ops.stable_rank(W.float(), kind="stable", iters=30, backend="torch")
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    assert torch.allclose(v, v32, rtol=1e-5) and torch.allclose(g, g32, rtol=1e-4, atol=1e-6 * g32.abs().max())


@pytest.mark.parametrize("kind", ["stable", "nuclear"])
def test_stable_rank_unbatched(kind):
    g = gen("sr2d", kind)
    W = make_spectrum_matrices(1, 9, 6, g, kind)[0].float()
    L = make_whitening(6, g).float()
    value, grad, state = ops.stable_rank(W, L, kind=kind)
    assert value.shape == () and grad.shape == (9, 6)
    ref_value, ref_grad = oracle(W, L, kind)
    assert rel_err(value, ref_value) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    if kind == "stable":
        assert state.shape == (6,)
        v2, g2, _ = ops.stable_rank(W, L, state=state, iters=2)
        assert rel_err(g2, ref_grad) <= 1e-5


def test_stable_rank_warm_start():
    """A warm-started call with 2 steps is as accurate as a cold one with many; a cold one with 2 is not."""
    g = gen("warm")
    M = make_spectrum_matrices(3, 129, 65, g, "stable").float()
    ref_value, ref_grad = oracle(M, None, "stable")

    v_cold, g_cold, state = ops.stable_rank(M, iters=40)
    err_cold = rel_err(g_cold, ref_grad)
    assert err_cold <= 1e-5

    _, g_bad, _ = ops.stable_rank(M, iters=2)
    assert rel_err(g_bad, ref_grad) > 1e-3  # the warm start is what makes 2 steps enough

    v_warm, g_warm, state2 = ops.stable_rank(M, state=state, iters=2)
    assert rel_err(v_warm, ref_value) <= 1e-5
    assert rel_err(g_warm, ref_grad) <= max(2 * err_cold, 1e-5)

    # a training step moves W a little: the previous state still needs only a few steps
    M2 = M + 1e-4 * randn(*M.shape, g=g)
    ref_value2, ref_grad2 = oracle(M2, None, "stable")
    v3, g3, _ = ops.stable_rank(M2, state=state2)  # default warm iters
    assert rel_err(v3, ref_value2) <= 1e-5
    assert rel_err(g3, ref_grad2) <= 1e-5


@pytest.mark.parametrize("kind", ["stable", "nuclear"])
@pytest.mark.parametrize("whiten", [False, True])
def test_stable_rank_gradcheck_fp64(kind, whiten):
    """The analytic gradient against finite differences of the returned value (fp64, tiny)."""
    g = gen("gradcheck", kind, whiten)
    M = make_spectrum_matrices(2, 5, 4, g, kind)  # the spectrum (and the gap) is that of M = W L
    L = make_whitening(4, g) if whiten else None
    W = (M if L is None else torch.linalg.solve_triangular(L, M, upper=False, left=False)).requires_grad_()

    def f(W):
        return ops.stable_rank_loss(W, L, kind=kind, iters=60)[0]

    assert torch.autograd.gradcheck(f, (W,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["stable", "nuclear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stable_rank_loss_backward_matches_grad(kind, dtype):
    g = gen("loss", kind, dtype)
    W = make_spectrum_matrices(3, 17, 11, g, kind).to(dtype).requires_grad_()
    L = make_whitening(11, g).float()
    value, grad, state = ops.stable_rank(W, L, kind=kind)
    assert not value.requires_grad and not grad.requires_grad
    loss_value, loss_state = ops.stable_rank_loss(W, L, kind=kind)
    assert loss_value.requires_grad
    assert torch.equal(loss_value.detach(), value)
    assert (loss_state is None) == (state is None)
    weights = torch.tensor([0.5, -2.0, 3.0])
    (loss_value * weights).sum().backward()
    assert W.grad.dtype == dtype
    expected = weights[:, None, None] * grad
    if dtype == torch.float32:
        assert torch.equal(W.grad, expected)
    else:  # the saved gradient is held in W's dtype: one extra rounding
        assert rel_err(W.grad, expected) <= 1e-2


def test_stable_rank_loss_under_compile():
    torch._dynamo.reset()
    g = gen("srcompile")
    W = make_spectrum_matrices(2, 12, 8, g, "stable").float().requires_grad_()

    def step(W, state):
        value, new_state = ops.stable_rank_loss(W, kind="stable", state=state, iters=8)
        return value.sum(), new_state

    state = ops.stable_rank(W, iters=40)[2]
    loss, _ = torch.compile(step, backend="aot_eager", fullgraph=True)(W, state)
    loss.backward()
    _, ref_grad = oracle(W.detach(), None, "stable")
    assert rel_err(W.grad, ref_grad) <= 1e-5  # d(Σ_b value_b)/dW_b = grad_b


def test_stable_rank_zero_matrix_is_finite():
    for kind in ("stable", "nuclear"):
        value, grad, _ = ops.stable_rank(torch.zeros(2, 4, 3), kind=kind)
        assert torch.equal(value, torch.zeros(2)) and torch.equal(grad, torch.zeros(2, 4, 3))


def test_stable_rank_rejects_bad_input():
    W = torch.randn(2, 5, 4)
    with pytest.raises(PrehabError, match="unknown kind"):
        ops.stable_rank(W, kind="spectral")
    with pytest.raises(PrehabError, match="only used by kind='stable'"):
        ops.stable_rank(W, kind="nuclear", state=torch.randn(2, 4))
    with pytest.raises(PrehabError, match=r"state must be \[2, 4\]"):
        ops.stable_rank(W, state=torch.randn(2, 5))
    with pytest.raises(PrehabError, match="L must be"):
        ops.stable_rank(W, torch.eye(5))
    with pytest.raises(PrehabError, match="iters"):
        ops.stable_rank(W, iters=-1)
    with pytest.raises(PrehabError, match="requires grad"):
        ops.stable_rank_loss(W, torch.eye(4).requires_grad_())
    with pytest.raises(PrehabError, match=r"\[m, n\] or a batch"):
        ops.stable_rank(torch.randn(5))


# =============================================================================================
# lowrank_linear
# =============================================================================================

LR_SHAPES = [(5, 1, 1), (33, 17, 5), (257, 129, 31)]  # (in, out, rank): odd on purpose
LEAD = {1: (), 2: (7,), 3: (2, 3)}


def lowrank_inputs(in_f, out_f, r, ndim, bias, dtype, g):
    x = randn(*LEAD[ndim], in_f, g=g, dtype=dtype)
    U = randn(out_f, r, g=g, dtype=dtype, scale=r**-0.5)
    V = randn(r, in_f, g=g, dtype=dtype, scale=in_f**-0.5)
    b = randn(out_f, g=g, dtype=dtype) if bias else None
    return x, U, V, b


def lowrank_ref(x, U, V, b):
    y = F.linear(F.linear(x, V), U)
    return y if b is None else y + b


@pytest.mark.parametrize("in_f,out_f,r", LR_SHAPES)
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_lowrank_linear_matches_fp64(in_f, out_f, r, ndim, bias, dtype):
    g = gen("lr", in_f, out_f, r, ndim, bias, dtype)
    x, U, V, b = lowrank_inputs(in_f, out_f, r, ndim, bias, dtype, g)
    y = ops.lowrank_linear(x, U, V, b)
    assert y.shape == (*LEAD[ndim], out_f) and y.dtype == dtype
    xd, Ud, Vd = x.double(), U.double(), V.double()
    bd = None if b is None else b.double()
    y_ref = lowrank_ref(xd, Ud, Vd, bd)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol
    # elementwise against the forward-error bound |x||V|ᵀ|U|ᵀ + |b|: no element left unwritten
    bound = lowrank_ref(xd.abs(), Ud.abs(), Vd.abs(), None if bd is None else bd.abs())
    assert ((y.double() - y_ref).abs() <= 2 * tol * bound + 1e-30).all()


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lowrank_linear_gradients(ndim, bias, dtype):
    g = gen("lrgrad", ndim, bias, dtype)
    inputs = [t.requires_grad_() if t is not None else None for t in lowrank_inputs(33, 17, 5, ndim, bias, dtype, g)]
    y = ops.lowrank_linear(*inputs)
    gy = randn(*y.shape, g=g, dtype=dtype)
    y.backward(gy)
    # torch autograd through plain matmuls, in fp64 from the same rounded inputs
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    lowrank_ref(*ref_inputs).backward(gy.double())
    tol = TOL[dtype]
    for t, rt in zip(inputs, ref_inputs):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == dtype and t.grad.shape == t.shape
        assert rel_err(t.grad, rt.grad) <= tol


def test_lowrank_linear_gradcheck():
    g = gen("lrgc")
    inputs = tuple(t.requires_grad_() for t in lowrank_inputs(6, 4, 3, 3, True, torch.float64, g))
    assert torch.autograd.gradcheck(ops.lowrank_linear, inputs)
    assert torch.autograd.gradgradcheck(ops.lowrank_linear, inputs)


def test_lowrank_linear_partial_requires_grad():
    g = gen("lrpart")
    x, U, V, b = lowrank_inputs(9, 4, 2, 2, True, torch.float32, g)
    U.requires_grad_()
    ops.lowrank_linear(x, U, V, b).sum().backward()
    xd, Vd = x.double(), V.double()
    assert rel_err(U.grad, torch.ones(7, 4, dtype=torch.float64).T @ (xd @ Vd.T)) <= 1e-5


def _capture_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "capture"])
@pytest.mark.parametrize("bias", [False, True])
def test_lowrank_linear_compile(compile_backend, bias):
    torch._dynamo.reset()  # each case starts from a clean cache (no recompile-limit carry-over)
    g = gen("lrcompile", bias)
    graphs = []
    be = _capture_backend(graphs) if compile_backend == "capture" else compile_backend

    def fn(x, U, V, b):
        return torch.tanh(ops.lowrank_linear(x, U, V, b))

    compiled = torch.compile(fn, backend=be, fullgraph=True)
    for ndim in (1, 2, 3):
        raw = lowrank_inputs(33, 17, 5, ndim, bias, torch.float32, g)
        x, U, V, b = (t.requires_grad_() if t is not None else None for t in raw)
        y = compiled(x, U, V, b)
        gy = randn(*y.shape, g=g)
        grads = torch.autograd.grad(y, [t for t in (x, U, V, b) if t is not None], gy)
        y_e = fn(x, U, V, b)
        grads_e = torch.autograd.grad(y_e, [t for t in (x, U, V, b) if t is not None], gy)
        assert rel_err(y, y_e) <= 1e-6
        for a, e in zip(grads, grads_e):
            assert rel_err(a, e) <= 1e-6
    if compile_backend == "capture":  # torch.compile sees one op, not its inner matmuls
        code = graphs[0].code
        assert "prehab_svd.lowrank_linear" in code and "mm" not in code.replace("prehab_svd", "")


@pytest.mark.slow
def test_lowrank_linear_compile_inductor():
    """The default inductor backend on CPU (forward and backward)."""
    torch._dynamo.reset()
    g = gen("inductor")
    x, U, V, b = (t.requires_grad_() for t in lowrank_inputs(33, 17, 5, 3, True, torch.float32, g))
    compiled = torch.compile(lambda *a: ops.lowrank_linear(*a) * 2.0, fullgraph=True)
    y = compiled(x, U, V, b)
    y.sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x, U, V, b)]
    y_ref = lowrank_ref(*ref) * 2.0
    y_ref.sum().backward()
    assert rel_err(y, y_ref.detach()) <= 1e-5
    for t, r in zip((x, U, V, b), ref):
        assert rel_err(t.grad, r.grad) <= 1e-5


def test_lowrank_linear_autocast():
    g = gen("autocast")
    x, U, V, b = lowrank_inputs(33, 17, 5, 2, True, torch.float32, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.lowrank_linear(x, U, V, b)
    assert y.dtype == torch.bfloat16
    ref = lowrank_ref(*(t.to(torch.bfloat16).double() for t in (x, U, V, b)))
    assert rel_err(y, ref) <= 1e-2


def test_lowrank_linear_rejects_bad_input():
    x, U, V = torch.randn(3, 8), torch.randn(4, 2), torch.randn(2, 8)
    with pytest.raises(PrehabError, match="rank mismatch"):
        ops.lowrank_linear(x, torch.randn(4, 3), V)
    with pytest.raises(PrehabError, match=r"x must be \[\.\.\., 8\]"):
        ops.lowrank_linear(torch.randn(3, 7), U, V)
    with pytest.raises(PrehabError, match=r"bias must be \[4\]"):
        ops.lowrank_linear(x, U, V, torch.randn(5))
    with pytest.raises(PrehabError, match="cast them to one dtype"):
        ops.lowrank_linear(x, U.double(), V)
    with pytest.raises(PrehabError, match="U must be"):
        ops.lowrank_linear(x, U[None], V)


# =============================================================================================
# dispatch
# =============================================================================================

OP_CALLS = {
    "covariance_update": lambda be: ops.covariance_update(torch.zeros(3, 3), torch.randn(4, 3), backend=be),
    "stable_rank": lambda be: ops.stable_rank(torch.randn(4, 3), backend=be),
    "lowrank_linear": lambda be: ops.lowrank_linear(
        torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 3), backend=be
    ),
}


@pytest.fixture
def no_interpreter(monkeypatch):
    """The Triton tests turn the interpreter on for the whole process; these tests need it off."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_available_backends_today(no_interpreter, monkeypatch):
    for op in OP_CALLS:
        # registered: torch first (Triton, and CUDA where its extension exists, stay below torch for
        # "auto" until measured faster); CUDA never runs CPU tensors
        from prehab_svd.ops import _cuda

        cuda = ["cuda"] if _cuda._state["registered"] else []
        assert ops.registered_backends(op) == ["torch", "triton"] + cuda
        assert ops.available_backends(op, "cpu", torch.float32) == ["torch"]
        assert ops.available_backends(op, "cpu", torch.bfloat16) == ["torch"]
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs fp32/fp16 on CPU, not bf16
        assert ops.available_backends(op, "cpu", torch.float32) == ["torch", "triton"]
        assert ops.available_backends(op, "cpu", torch.bfloat16) == ["torch"]
        monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(PrehabError, match="unknown op"):
        ops.available_backends("svd")


@pytest.mark.parametrize("op", list(OP_CALLS))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unimplemented_backend_is_a_clear_error(op, backend, monkeypatch, no_interpreter):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    with pytest.raises(BackendUnavailableError, match=f"'{backend}' backend of op '{op}' is not available") as e:
        OP_CALLS[op](backend)
    assert isinstance(e.value, NotImplementedError) and isinstance(e.value, PrehabError)
    OP_CALLS[op]("torch")
    OP_CALLS[op]("auto")


@pytest.mark.parametrize("op", list(OP_CALLS))
def test_invalid_backend_name(op):
    with pytest.raises(PrehabError, match="unknown backend 'gpu'.*'auto', 'torch', 'triton', 'cuda'"):
        OP_CALLS[op]("gpu")


@pytest.mark.parametrize("op", list(OP_CALLS))
def test_env_var_overrides_auto(op, monkeypatch, no_interpreter):
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError, match="PREHAB_SVD_BACKEND=triton"):
        OP_CALLS[op]("auto")
    OP_CALLS[op]("torch")  # an explicit choice wins over the variable
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    OP_CALLS[op]("auto")
    monkeypatch.setenv(ops.ENV_VAR, "fastest")
    with pytest.raises(PrehabError, match="PREHAB_SVD_BACKEND='fastest' is not a backend"):
        OP_CALLS[op]("auto")


@pytest.fixture
def stand_in_triton():
    """Registers a stand-in "triton" lowrank_linear (the reference, counting calls) for the test."""
    calls = []
    support = {"ok": True}

    def impl(x, U, V, bias):
        calls.append(x.shape)
        return ops.reference.lowrank_linear(x, U, V, bias)

    from prehab_svd.ops import _registry

    previous = _registry._REGISTRY["lowrank_linear"].get("triton")  # the real Triton kernel, if any
    ops.register_backend("lowrank_linear", "triton", impl, supports=lambda dev, dt: support["ok"], priority=10,
                         replace=True)
    try:
        yield calls, support
    finally:
        if previous is None:
            ops.unregister_backend("lowrank_linear", "triton")
        else:
            ops.register_backend("lowrank_linear", "triton", previous.fn, supports=previous.supports,
                                 priority=previous.priority, replace=True)


def test_lowrank_linear_layer_fast_path(stand_in_triton, monkeypatch):
    """LowRankLinear calls the torch backend's GEMMs directly when "auto" resolves to it (the same
    numbers as the op, no custom-op cost) and goes through the op for any other backend, under
    autocast, and for a bad input (with the op's clear error)."""
    from prehab_svd import LowRankLinear

    calls, support = stand_in_triton
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    torch.manual_seed(5)
    layer = LowRankLinear(11, 7, 3)
    x = torch.randn(2, 5, 11, requires_grad=True)
    layer(x)
    assert len(calls) == 1  # auto picks the registered "triton": the op path
    support["ok"] = False  # now auto resolves to torch: the direct path, same numbers as the op
    y = layer(x)
    assert len(calls) == 1
    assert torch.equal(y, ops.lowrank_linear(x, layer.U, layer.V, layer.bias, backend="torch"))
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.U, layer.V, layer.bias)]
    for t in (x, layer.U, layer.V, layer.bias):
        t.grad = None
    ops.lowrank_linear(x, layer.U, layer.V, layer.bias, backend="torch").square().sum().backward()
    for g, t in zip(grads, (x, layer.U, layer.V, layer.bias)):
        assert torch.allclose(g, t.grad, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with pytest.raises(PrehabError, match=r"x must be \[\.\.\., 11\]"):
        layer(torch.randn(2, 12))
    with pytest.raises(PrehabError, match="dtype"):
        layer(torch.randn(2, 11, dtype=torch.float64))


def test_registered_backend_is_dispatched(stand_in_triton, monkeypatch):
    calls, support = stand_in_triton
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    x, U, V = torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 3)
    assert ops.available_backends("lowrank_linear") == ["triton", "torch"]
    ops.lowrank_linear(x, U, V)  # auto: highest priority
    assert len(calls) == 1
    ops.lowrank_linear(x, U, V, backend="torch")
    assert len(calls) == 1
    monkeypatch.setenv(ops.ENV_VAR, "torch")  # the variable overrides auto's pick
    ops.lowrank_linear(x, U, V)
    assert len(calls) == 1
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    ops.lowrank_linear(x, U, V)
    assert len(calls) == 2
    # the variable is read when the op runs, also inside a compiled graph
    compiled = torch.compile(lambda x: ops.lowrank_linear(x, U, V), backend="aot_eager", fullgraph=True)
    compiled(x)
    assert len(calls) == 3
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    compiled(x)
    assert len(calls) == 3
    # a backend that cannot run these tensors: auto falls back, an explicit request fails clearly
    monkeypatch.delenv(ops.ENV_VAR)
    support["ok"] = False
    assert ops.available_backends("lowrank_linear", "cpu", torch.float32) == ["torch"]
    ops.lowrank_linear(x, U, V)
    assert len(calls) == 3
    with pytest.raises(BackendUnavailableError, match="not available for cpu tensors of dtype torch.float32"):
        ops.lowrank_linear(x, U, V, backend="triton")


def test_register_backend_rejects_duplicates_and_unknown_names():
    with pytest.raises(PrehabError, match="already registered"):
        ops.register_backend("lowrank_linear", "torch", ops.reference.lowrank_linear)
    with pytest.raises(PrehabError, match="unknown backend"):
        ops.register_backend("lowrank_linear", "cutlass", ops.reference.lowrank_linear)
    with pytest.raises(PrehabError, match="unknown op"):
        ops.register_backend("matmul", "triton", ops.reference.lowrank_linear)


def test_custom_ops_are_registered():
    for name in ("covariance_update", "stable_rank", "lowrank_linear"):
        assert hasattr(torch.ops.prehab_svd, name)
    schema = str(torch.ops.prehab_svd.covariance_update.default._schema)
    assert "Tensor(a0!) G" in schema and "!)? C" in schema


def test_fake_impls_match_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = {
        "lr": (torch.randn(2, 3, 8), torch.randn(5, 4), torch.randn(4, 8), torch.randn(5)),
        "sr": torch.randn(2, 6, 4, dtype=torch.bfloat16),
    }
    y = torch.ops.prehab_svd.lowrank_linear(*real["lr"], "auto")
    outs = {k: torch.ops.prehab_svd.stable_rank(real["sr"], None, k, None, 3, "auto") for k in ("stable", "nuclear")}
    with FakeTensorMode() as mode:
        fy = torch.ops.prehab_svd.lowrank_linear(*(mode.from_tensor(t) for t in real["lr"]), "auto")
        assert fy.shape == y.shape and fy.dtype == y.dtype
        for k, o in outs.items():
            fo = torch.ops.prehab_svd.stable_rank(mode.from_tensor(real["sr"]), None, k, None, 3, "auto")
            for a, b in zip(fo, o):
                assert a.shape == b.shape and a.dtype == b.dtype
        G = mode.from_tensor(torch.zeros(8, 8))
        torch.ops.prehab_svd.covariance_update(G, mode.from_tensor(torch.randn(3, 8)), None, None, "auto")


def test_opcheck():
    """torch.library.opcheck: schema, fake impl, autograd registration and aliasing are consistent."""
    g = gen("opcheck")
    x, U, V, b = lowrank_inputs(7, 5, 3, 3, True, torch.float32, g)
    torch.library.opcheck(torch.ops.prehab_svd.lowrank_linear.default, (x.requires_grad_(), U, V, b, "auto"))
    W = make_spectrum_matrices(2, 6, 4, g, "stable").float()
    for kind in ("stable", "nuclear"):
        torch.library.opcheck(torch.ops.prehab_svd.stable_rank.default, (W, None, kind, None, 8, "auto"))
    torch.library.opcheck(
        torch.ops.prehab_svd.covariance_update.default,
        (torch.zeros(4, 4), torch.randn(3, 4), torch.zeros(4, 4), torch.randn(3, 4), "auto"),
    )


# =============================================================================================
# the same checks on a GPU, in bf16 (skip themselves where there is none)
# =============================================================================================

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("T,d", [(129, 257), (2048, 1000)])
def test_cuda_covariance_update(T, d, cross):
    g = gen("cuda-cov", T, d, cross)
    x = randn(T, d, g=g, dtype=torch.bfloat16)
    y = randn(T, d, g=g, dtype=torch.bfloat16) if cross else None
    G = torch.ones(d, d, device="cuda")
    C = torch.ones(d, d, device="cuda") if cross else None
    ops.covariance_update(G, x.cuda(), C, None if y is None else y.cuda())
    xd = x.double()
    assert rel_err(G.cpu(), 1 + xd.T @ xd) <= 1e-5
    if cross:
        assert rel_err(C.cpu(), 1 + xd.T @ y.double()) <= 1e-5


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("kind", ["stable", "nuclear"])
@pytest.mark.parametrize("B,m,n", [(2, 257, 129), (1, 129, 300)])
def test_cuda_stable_rank(kind, B, m, n):
    g = gen("cuda-sr", kind, B, m, n)
    M = make_spectrum_matrices(B, m, n, g, kind)
    Ld = make_whitening(n, g)
    W = torch.linalg.solve_triangular(Ld, M, upper=False, left=False).to(torch.bfloat16)
    L = Ld.float()
    value, grad, state = ops.stable_rank(W.cuda(), L.cuda(), kind=kind)
    ref_value, ref_grad = oracle(W, L, kind)
    assert rel_err(value.cpu(), ref_value) <= 1e-5 and rel_err(grad.cpu(), ref_grad) <= 1e-5
    if kind == "stable":
        _, g2, _ = ops.stable_rank(W.cuda(), L.cuda(), state=state, iters=2)
        assert rel_err(g2.cpu(), ref_grad) <= 1e-5
    Wc = W.cuda().requires_grad_()
    ops.stable_rank_loss(Wc, L.cuda(), kind=kind)[0].sum().backward()
    assert rel_err(Wc.grad.cpu(), grad.cpu()) <= 1e-2


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_lowrank_linear(bias):
    g = gen("cuda-lr", bias)
    x, U, V, b = lowrank_inputs(4096, 1000, 333, 3, bias, torch.bfloat16, g)
    inputs = [t.cuda().requires_grad_() if t is not None else None for t in (x, U, V, b)]
    y = ops.lowrank_linear(*inputs)
    ref_inputs = [t.double().requires_grad_() if t is not None else None for t in (x, U, V, b)]
    y_ref = lowrank_ref(*ref_inputs)
    assert rel_err(y.cpu(), y_ref.detach()) <= 1e-2
    gy = randn(*y.shape, g=g, dtype=torch.bfloat16)
    y.backward(gy.cuda())
    y_ref.backward(gy.double())
    for t, r in zip(inputs, ref_inputs):
        if t is not None:
            assert rel_err(t.grad.cpu(), r.grad) <= 1e-2
    compiled = torch.compile(lambda *a: ops.lowrank_linear(*a), fullgraph=True)
    assert rel_err(compiled(*(t.detach() if t is not None else None for t in inputs)).cpu(), y_ref.detach()) <= 1e-2
