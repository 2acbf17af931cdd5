"""Property-based tests (hypothesis) of the ops, the closed forms and the methods on hostile input.

Shapes include 1, odd sizes and fewer tokens than channels; covariances range from well conditioned to
condition number 1e12, rank-deficient, with zero rows/columns, and all zero; inputs carry NaN/Inf.
Every property is either "finite and correct against an independent float64 oracle" or "a clear
PrehabError". Tensors are built from a drawn seed and drawn structure (shape, spectrum, scale), so
hypothesis shrinks the structure, not thousands of matrix entries.

Profiles: ``prehab-ci`` (default) is derandomized (the same examples every run, no example database
written) and sized for a 2-core CI machine; ``PREHAB_SVD_HYPOTHESIS=thorough`` runs 20x the examples
from fresh random seeds, for hunting bugs. ``pytest --hypothesis-show-statistics`` prints the counts.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from prehab_svd import PrehabError, ops
from prehab_svd.linalg import anchored_lowrank, objective, whitened_lowrank
from prehab_svd.methods import LayerStats, factorize

f64 = torch.float64

settings.register_profile(
    "prehab-ci", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "prehab-thorough", deadline=None, derandomize=False, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
_THOROUGH = os.environ.get("PREHAB_SVD_HYPOTHESIS") == "thorough"
_PARENT = settings.get_profile("prehab-thorough" if _THOROUGH else "prehab-ci")


def examples(n: int):
    """``@settings`` with n examples (20n in the thorough profile) and no deadline."""
    return settings(parent=_PARENT, max_examples=n * (20 if _THOROUGH else 1))


seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """rows x cols with orthonormal columns (cols <= rows)."""
    if cols == 0:
        return torch.zeros(rows, 0, dtype=f64)
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=f64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------------------------------------------
# Problems for the closed forms: data matrices with an exactly known range, so the oracle needs no
# numerical rank decision.
# ---------------------------------------------------------------------------------------------------


class Problem:
    """Tokens x' = Z diag(s) Qᵀ (Z [T, k] and Q [d, k] orthonormal, so range(X') = span(Z) exactly),
    x = x' + shift·noise (x = x' for the whitened problem), weights W [out, d]."""

    def __init__(self, X, Xp, Z, s, Q, W, rank):
        self.X, self.Xp, self.Z, self.s, self.Q, self.W, self.rank = X, Xp, Z, s, Q, W, rank
        T = X.shape[0]
        self.T = T
        self.gram_x = X.T @ X / T
        self.cross = X.T @ Xp / T
        self.gram_xp = Xp.T @ Xp / T

    def residual(self, Wn: torch.Tensor) -> torch.Tensor:
        """‖x Wᵀ − x' W_newᵀ‖² / T straight from the data."""
        return (self.X @ self.W.T - self.Xp @ Wn.to(f64).T).square().sum() / self.T

    def optimum(self, keep_rel: float | None = None) -> torch.Tensor:
        """min over rank-r W' of the residual, with x' restricted to its directions with
        s_i² > keep_rel·s_max² (None: all of them: the exact optimum)."""
        Y = self.X @ self.W.T
        Z = self.Z
        if keep_rel is not None and self.s.numel():
            Z = Z[:, self.s.square() > keep_rel * self.s.max().square()]
        sv = torch.linalg.svdvals(Z.T @ Y) if Z.shape[1] else Y.new_zeros(0)
        return (Y.square().sum() - sv[: self.rank].square().sum()) / self.T

    def energy(self) -> float:
        return float((self.X @ self.W.T).square().sum() / self.T)


@st.composite
def problems(draw, anchored: bool, max_d: int = 12, max_out: int = 12):
    seed = draw(seeds)
    g = _gen(seed)
    d = draw(st.integers(1, max_d))
    out = draw(st.integers(1, max_out))
    dead = draw(st.integers(0, d))  # channels that are always zero (zero rows/columns of the gram)
    k = draw(st.integers(0, d - dead))  # rank of x' (0: the gram is all zero)
    T = draw(st.integers(max(k, 1), 2 * max_d))  # T < d allowed
    zero_tokens = draw(st.integers(0, T - k))
    log_cond = draw(st.sampled_from([0.0, 1.0, 3.0, 6.0, 9.0, 11.0, 12.0]))  # of the gram
    scale = 10.0 ** draw(st.integers(-6, 6))
    w_scale = 10.0 ** draw(st.integers(-3, 3))
    w_kind = draw(st.sampled_from(["dense", "rank1", "zero_rows", "zero"]))
    rank = draw(st.integers(1, min(out, d) + 2))
    note(f"d={d} out={out} dead={dead} k={k} T={T} zero_tokens={zero_tokens} log_cond={log_cond} "
         f"scale={scale} w_scale={w_scale} w_kind={w_kind} rank={rank}")

    Zl = _orthonormal(T - zero_tokens, k, g)
    Z = torch.zeros(T, k, dtype=f64)
    live_tok = torch.randperm(T, generator=g)[: T - zero_tokens]
    Z[live_tok] = Zl
    Q = torch.zeros(d, k, dtype=f64)
    live_ch = torch.randperm(d, generator=g)[: d - dead]
    Q[live_ch] = _orthonormal(d - dead, k, g)
    s = scale * torch.logspace(0, -log_cond / 2, k, dtype=f64) if k else torch.zeros(0, dtype=f64)
    s = s[torch.randperm(k, generator=g)] if k else s
    Xp = (Z * s) @ Q.T
    if anchored:
        shift = draw(st.sampled_from([0.0, 0.1, 1.0]))
        X = Xp + shift * scale * torch.randn(T, d, generator=g, dtype=f64)
        dead_ch = torch.ones(d, dtype=torch.bool)
        dead_ch[live_ch] = False
        X[:, dead_ch] = 0.0  # dead in both streams
    else:
        X = Xp
    W = torch.randn(out, d, generator=g, dtype=f64) * w_scale
    if w_kind == "rank1":
        W = torch.outer(torch.randn(out, generator=g, dtype=f64), torch.randn(d, generator=g, dtype=f64))
    elif w_kind == "zero_rows":
        W[torch.rand(out, generator=g) < 0.5] = 0.0
    elif w_kind == "zero":
        W = torch.zeros_like(W)
    return Problem(X, Xp, Z, s, Q, W, rank)


# Directions with s_i² above this fraction of s_max² are certainly inside the pseudo-inverse (its
# documented cut-off is d·1e-13 of the largest eigenvalue), so the optimum restricted to them bounds
# the library's answer from above; the unrestricted optimum bounds it from below.
_SURE_KEPT = 1e-10


def _check_optimal(p: Problem, U, V, *, what: str):
    out, d = p.W.shape
    assert U.shape == (out, p.rank) and V.shape == (p.rank, d), what
    assert torch.isfinite(U).all() and torch.isfinite(V).all(), what
    Wn = U.to(f64) @ V.to(f64)
    got = p.residual(Wn)
    lower = p.optimum()
    upper = p.optimum(_SURE_KEPT)
    # rounding: fp64 products of the data, the factors' entries and the output's size; plus the
    # conditioning of the problem: a backward-stable solve gets W' to eps·κ(R)·‖W'‖, and at an
    # optimum the objective is quadratic in that error, ≤ ‖x'‖²·(eps·κ(R)·‖W'‖)²
    size = p.energy() + float((p.Xp @ Wn.T).square().sum() / p.T)
    cond = 0.0
    if p.s.numel():
        cond = float(p.s.max() / p.s.min()) * float(p.s.max()) * float(Wn.norm()) * 1e-16
    tol = 1e-9 * size + 100 * p.W.shape[1] * cond**2 / p.T + 1e-300
    note(f"{what}: got={float(got):.6e} lower={float(lower):.6e} upper={float(upper):.6e} tol={tol:.3e}")
    assert got >= lower - tol, f"{what}: better than the optimum ({float(got)} < {float(lower)})"
    assert got <= upper + tol, f"{what}: not optimal ({float(got)} > {float(upper)})"
    if Wn.abs().max() > 0:
        assert torch.linalg.matrix_rank(Wn) <= p.rank, what
    # the statistics-only objective agrees with the data, up to the rounding of its three terms
    obj = objective(p.W, Wn, p.gram_x, p.cross, p.gram_xp)
    aW, aWn = p.W.abs(), Wn.abs()
    terms = float(((aW @ p.gram_x.abs()) * aW).sum() + 2 * ((aW @ p.cross.abs()) * aWn).sum()
                  + ((aWn @ p.gram_xp.abs()) * aWn).sum())
    assert abs(float(obj - got)) <= tol + 1e-12 * terms, f"{what}: objective {float(obj)} vs data {float(got)}"
    return Wn, got, tol


# ---------------------------------------------------------------------------------------------------
# The closed forms
# ---------------------------------------------------------------------------------------------------


def _leak(p: Problem, Wn: torch.Tensor, gram: torch.Tensor) -> float:
    """‖W'D (I − QQᵀ)‖ / ‖W'D‖ with D = diag(gram): the weight, in the equilibrated metric, on input
    directions x' never visits (zero for unvisited="zero")."""
    Wd = Wn * torch.diagonal(gram)
    n = float(Wd.norm())
    return 0.0 if n == 0 else float((Wd - Wd @ p.Q @ p.Q.T).norm()) / n


def _leak_tol(p: Problem) -> float:
    """The null space of a gram with eigenvalues down to λ_min is only determined to an angle of
    about eps·λ_max/λ_min (Davis–Kahan), so that much leak is rounding, not a wrong answer."""
    if p.s.numel() == 0:
        return 0.0
    kappa = float(p.s.max().square() / p.s.min().square())
    return 1e-10 + 1e-15 * p.W.shape[1] * kappa


@examples(300)
@given(p=problems(anchored=False), pert_seed=seeds)
def test_whitened_lowrank_is_optimal(p, pert_seed):
    Uz, Vz = whitened_lowrank(p.W, p.gram_x, p.rank, unvisited="zero")
    Wz, _, _ = _check_optimal(p, Uz, Vz, what="whitened, unvisited=zero")
    # minimum norm: no weight on input directions the tokens never visit
    assert _leak(p, Wz, p.gram_x) <= _leak_tol(p), "weight off the data's range"
    U, V = whitened_lowrank(p.W, p.gram_x, p.rank)  # the default: the vanishing-jitter limit
    Wn, got, tol = _check_optimal(p, U, V, what="whitened")
    # full rank: W' = W on the data (objective ~ 0)
    if p.rank >= min(p.W.shape):
        assert got <= tol
    # no rank-r perturbation does better
    g = _gen(pert_seed)
    for eps in (1e-2, 1e-5):
        A = torch.randn(U.shape, generator=g, dtype=f64) * eps * (U.norm() + 1) / U.numel() ** 0.5
        B = torch.randn(V.shape, generator=g, dtype=f64) * eps * (V.norm() + 1) / V.numel() ** 0.5
        assert p.residual((U + A) @ (V + B)) >= got - tol


@examples(300)
@given(p=problems(anchored=True), pert_seed=seeds)
def test_anchored_lowrank_is_optimal(p, pert_seed):
    Uz, Vz = anchored_lowrank(p.W, p.cross, p.gram_xp, p.rank, unvisited="zero")
    Wz, _, _ = _check_optimal(p, Uz, Vz, what="anchored, unvisited=zero")
    assert _leak(p, Wz, p.gram_xp) <= _leak_tol(p), "weight off the range of x'"
    U, V = anchored_lowrank(p.W, p.cross, p.gram_xp, p.rank)
    Wn, got, tol = _check_optimal(p, U, V, what="anchored")
    g = _gen(pert_seed)
    for eps in (1e-2, 1e-5):
        A = torch.randn(U.shape, generator=g, dtype=f64) * eps * (U.norm() + 1) / U.numel() ** 0.5
        B = torch.randn(V.shape, generator=g, dtype=f64) * eps * (V.norm() + 1) / V.numel() ** 0.5
        assert p.residual((U + A) @ (V + B)) >= got - tol


@examples(200)
@given(p=problems(anchored=True), seed=seeds, anchored=st.booleans(),
       unvisited=st.sampled_from(["keep", "zero"]))
def test_answer_is_invariant_to_channel_scaling(p, seed, anchored, unvisited):
    """Rescaling the input channels (x → x·c, W → W/c: the same outputs, the same problem) changes
    nothing in the answer: W'·c is unchanged. With powers of two every decision sees the same
    equilibrated Gram bit for bit, so the answers agree to rounding whatever the conditioning."""
    g = _gen(seed)
    d = p.W.shape[1]
    c = torch.exp2(torch.randint(-20, 21, (d,), generator=g).to(f64))
    X, Xp = (p.X, p.Xp) if anchored else (p.X, p.X)
    T = X.shape[0]
    Xc, Xpc, Wc = X * c, Xp * c, p.W / c

    def solve(X_, Xp_, W_):
        cross, gram = X_.T @ Xp_ / T, Xp_.T @ Xp_ / T
        if anchored:
            return torch.mm(*anchored_lowrank(W_, cross, gram, p.rank, unvisited=unvisited))
        return torch.mm(*whitened_lowrank(W_, X_.T @ X_ / T, p.rank, unvisited=unvisited))

    W0, W1 = solve(X, Xp, p.W), solve(Xc, Xpc, Wc) * c
    tol = 1e-9 * float(W0.abs().max()) + 1e-300
    assert float((W0 - W1).abs().max()) <= tol, float((W0 - W1).abs().max())


@examples(150)
@given(p=problems(anchored=True), seed=seeds, n_batches=st.integers(2, 6), anchored=st.booleans())
def test_answer_is_invariant_to_the_order_of_the_batches(p, seed, n_batches, anchored):
    """The tokens streamed in another order (or split otherwise, as between ranks) give the same
    answer to rounding. The default accumulator (fp32 product per batch, float64 running sums) sees
    each batch's product bit for bit whatever the order; only the float64 sums round differently, at
    ~1e-16 of each entry's size. What that moves: the objective (on the exact statistics) at most
    quadratically, and W' itself by ~1e-16 times the problem's sensitivity: the conditioning of the
    kept part of the Gram over the relative gap at the rank r (Davis-Kahan), which is where the
    tolerance on W' comes from. The fp32 running sums this replaced fail it
    (test_the_factor_check_catches_fp32_running_sums)."""
    g = _gen(seed)
    T, d = p.X.shape
    X, Xp = p.X.float(), (p.Xp if anchored else p.X).float()
    assume(bool(torch.isfinite(X).all()) and bool(torch.isfinite(Xp).all()))
    cuts = sorted(torch.randperm(T - 1, generator=g)[: n_batches - 1].add(1).tolist()) if T > 1 else []
    bounds = list(zip([0] + cuts, cuts + [T]))
    orders = [list(range(len(bounds))), torch.randperm(len(bounds), generator=g).tolist()]

    def stats(order):
        acc = ops.CovarianceAccumulator(d, cross=anchored, backend="torch")
        for i in order:
            a, b = bounds[i]
            acc.update(Xp[a:b], X[a:b] if anchored else None)  # gram of x', cross x'ᵀx
        return acc.gram(), (acc.cross().mT if anchored else None)

    def solve(gram, cross):
        if anchored:
            return torch.mm(*anchored_lowrank(p.W, cross, gram, p.rank))
        return torch.mm(*whitened_lowrank(p.W, gram, p.rank))

    (G0, C0), (G1, C1) = stats(orders[0]), stats(orders[1])
    # the sums: the same fp32 products added in another order in float64
    aX, aXp = X.double().abs(), Xp.double().abs()
    assert ((G0 - G1).abs() <= 8 * len(bounds) * 1.2e-16 * (aXp.T @ aXp) / T + 1e-300).all()
    W0, W1 = solve(G0, C0), solve(G1, C1)
    # the objective on the statistics of the first order: both answers are (near-)optimal
    Cx = C0 if anchored else G0
    Gx = (X.double().T @ X.double() / T) if anchored else G0
    e0, e1 = (float(objective(p.W, Wn, Gx, Cx, G0)) for Wn in (W0, W1))
    energy = float(objective(p.W, torch.zeros_like(p.W), Gx, Cx, G0))
    assert abs(e0 - e1) <= 1e-10 * energy + 1e-300, (e0, e1, energy)
    _check_same_answer(p.W, W0, W1, G0, Cx, p.rank, len(bounds))


def _same_answer_tolerance(W, W0, G, C, rank, n_batches):
    """(tolerance, None) for W' from two batch orders where W' is well posed, else (None, why): a clear
    relative gap at the rank in the singular values of W·C·L⁻ᵀ (G = L·Lᵀ) and a moderate condition
    number κ of G. Davis-Kahan: a perturbation δ of the statistics turns the kept subspace by
    ~δ·κ/gap; the float64 sums' δ is ~1e-16 per batch and channel."""
    d = G.shape[0]
    ev = torch.linalg.eigvalsh(G)
    L, info = torch.linalg.cholesky_ex(G)
    if ev.max() <= 0 or ev.min() <= 1e-12 * ev.max() or info or min(W.shape) <= rank:
        return None, "W' not compared: singular Gram or no truncation"
    target = torch.linalg.svdvals(torch.linalg.solve_triangular(L, (W @ C).T, upper=False).T)  # W·C·L⁻ᵀ
    gap = float((target[rank - 1] - target[rank]) / target[0]) if target[0] > 0 else 0.0
    kappa = float(ev.max() / ev.min())
    if gap <= 1e-3 or kappa >= 1e6:
        return None, "W' not compared: no clear gap at the rank or kappa >= 1e6"
    return 1e-16 * n_batches * d * kappa / gap * float(W0.abs().max()) + 1e-300, None


def _check_same_answer(W, W0, W1, G, C, rank, n_batches):
    """W' from two orders agrees to the tolerance above where it is well posed; returns whether it
    compared."""
    tol, why = _same_answer_tolerance(W, W0, G, C, rank, n_batches)
    event(why or "W' compared")
    if tol is not None:
        assert float((W0 - W1).abs().max()) <= tol, (float((W0 - W1).abs().max()), tol)
    return tol is not None


def _two_order_answers(seed, d, out, rank, n_batches, log_cond, anchored, sum_dtype=torch.float64):
    """aa-svd's (or svd-llm's) W' from the same fp32 tokens streamed in two orders, with their first
    order's statistics: (W, [W'₀, W'₁], G, C)."""
    g = _gen(seed)
    T = 3 * d + 5
    scales = torch.logspace(0, -log_cond / 2, d, dtype=f64)[torch.randperm(d, generator=g)]
    X = (torch.randn(T, d, generator=g, dtype=f64) * scales).float()
    Xp = (X.double() + 0.3 * torch.randn(T, d, generator=g, dtype=f64) * scales).float() if anchored else X
    W = torch.randn(out, d, generator=g, dtype=f64)
    cuts = sorted(torch.randperm(T - 1, generator=g)[: n_batches - 1].add(1).tolist())
    bounds = list(zip([0] + cuts, cuts + [T]))
    answers, stats = [], []
    for order in (range(n_batches), torch.randperm(n_batches, generator=g).tolist()):
        acc = ops.CovarianceAccumulator(d, cross=anchored, backend="torch", sum_dtype=sum_dtype)
        for i in order:
            a, b = bounds[i]
            acc.update(Xp[a:b], X[a:b] if anchored else None)  # gram of x', cross x'ᵀx
        G = acc.gram().double()
        C = acc.cross().mT.double() if anchored else G
        stats.append((G, C))
        answers.append(torch.mm(*(anchored_lowrank(W, C, G, rank) if anchored else whitened_lowrank(W, G, rank))))
    return W, answers, *stats[0]


@examples(60)
@given(seed=seeds, d=st.integers(2, 24), out=st.integers(2, 16), n_batches=st.integers(2, 8),
       log_cond=st.sampled_from([0.0, 2.0, 4.0]), anchored=st.booleans(), data=st.data())
def test_well_posed_answer_is_the_same_factor_in_any_batch_order(seed, d, out, n_batches, log_cond,
                                                                 anchored, data):
    """The same property where W' is well posed (full-rank tokens, channel scales over
    ``log_cond`` decades, a truncation): the factors themselves agree, not only the objective."""
    rank = data.draw(st.integers(1, min(out, d) - 1))
    W, (W0, W1), G, C = _two_order_answers(seed, d, out, rank, n_batches, log_cond, anchored)
    assume(_check_same_answer(W, W0, W1, G, C, rank, n_batches))


def test_the_factor_check_catches_fp32_running_sums():
    """The check above can fail: with the fp32 running sums the float64 sums replaced, the same
    construction's factors differ across the two orders by 1,400x to 42,000x the tolerance (40
    seeds measured); with float64 sums they are bit for bit the same."""
    for seed in range(5):
        args = (seed, 20, 12, 5, 6, 2.0, True)
        W, (W0, W1), G, C = _two_order_answers(*args)
        assert torch.equal(W0, W1)
        W, (W0, W1), G, C = _two_order_answers(*args, sum_dtype=torch.float32)
        tol, why = _same_answer_tolerance(W, W0, G, C, 5, 6)
        assert tol is not None, why
        assert float((W0 - W1).abs().max()) > tol, seed


@examples(100)
@given(p=problems(anchored=True))
def test_anchored_with_equal_streams_is_whitened(p):
    """cross = gram turns AA-SVD's closed form into SVD-LLM's."""
    U1, V1 = whitened_lowrank(p.W, p.gram_xp, p.rank)
    U2, V2 = anchored_lowrank(p.W, p.gram_xp, p.gram_xp, p.rank)
    W1, W2 = U1 @ V1, U2 @ V2
    G = p.gram_xp
    e1 = ((W1 - p.W) @ G * (W1 - p.W)).sum()
    e2 = ((W2 - p.W) @ G * (W2 - p.W)).sum()
    energy = float((p.W @ G * p.W).sum())
    assert abs(float(e1 - e2)) <= 1e-9 * energy + 1e-300


@examples(150)
@given(p=problems(anchored=True), wdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       gdtype=st.sampled_from([torch.float32, f64]))
def test_closed_forms_low_precision_are_finite(p, wdtype, gdtype):
    """Low-precision weights/statistics: factors in W's dtype, finite, and (when W itself is
    representable) the product matches the float64 answer to the output's precision."""
    fmax = torch.finfo(wdtype).max
    assume(float(p.W.abs().max()) < fmax / 4)
    W = p.W.to(wdtype)
    gram, cross = p.gram_xp.to(gdtype), p.cross.to(gdtype)
    for name, fn in (("whitened", lambda w: whitened_lowrank(w, gram, p.rank)),
                     ("anchored", lambda w: anchored_lowrank(w, cross, gram, p.rank))):
        A, B = (t.to(f64) for t in fn(W.to(f64)))  # the same problem, float64 output
        ref = A @ B
        # the best any diagonal rescaling can do: each component's entries down to √(max|a|·max|b|)
        need = float((A.abs().amax(0) * B.abs().amax(1)).sqrt().max()) if A.numel() else 0.0
        assume(not fmax / 8 < need <= fmax / 2)  # borderline: either answer is fine
        if need > fmax / 2:
            with pytest.raises(PrehabError, match="range"):  # not representable: a clear error
                fn(W)
            continue
        U, V = fn(W)
        assert U.dtype == wdtype and V.dtype == wdtype, name
        assert torch.isfinite(U).all() and torch.isfinite(V).all(), f"{name}: non-finite {wdtype} factors"
        # the product is the float64 answer up to rounding each factor entry to the output dtype
        fi = torch.finfo(wdtype)
        U64, V64 = U.to(f64), V.to(f64)
        bound = 2.1 * fi.eps * (U64.abs() @ V64.abs()) + fi.smallest_normal * (
            U64.abs().sum(1, keepdim=True) + V64.abs().sum(0, keepdim=True) + p.rank * fi.smallest_normal)
        assert ((U64 @ V64 - ref).abs() <= bound).all(), f"{name}: {wdtype} product off the float64 answer"


def test_singular_gram_that_cholesky_accepts_gets_the_pseudo_factor():
    """Regression (found by hypothesis, thorough profile): this rank-3 gram (eigenvalues 0.33, 1e-5,
    3e-10 and a rounding-level 1.5e-17) has a Cholesky factor whose smallest squared pivot is 8e-12
    of the largest, above the 1e-12 cut; the triangular solve then put 25% of W' on the direction
    the tokens never visit. The smallest eigenvalue is now estimated too, and the answer is the
    minimum-norm one."""
    gram = torch.tensor([
        [3.7484355205643784e-05, 0.0015092037163302945, 0.0026498409586184156, 0.0016889554932045386],
        [0.0015092037163302945, 0.06249666607971018, 0.10963394921523574, 0.07003197529697619],
        [0.0026498409586184156, 0.10963394921523574, 0.19232917430268556, 0.12284767791118478],
        [0.0016889554932045386, 0.07003197529697619, 0.12284767791118478, 0.0784805498545992]], dtype=f64)
    W = torch.tensor([[-0.2233590100423521, 1.1582220078578187, 0.26236037452866273, 0.8387474813731076]],
                     dtype=f64)
    L = torch.linalg.cholesky(gram)
    assert torch.diagonal(L).square().min() > 1e-12 * torch.diagonal(L).square().max()  # the old test passed
    from prehab_svd.linalg import whitening_factor

    F = whitening_factor(gram)
    assert F.kind == "eigen" and F.rank == 3
    null = torch.linalg.eigh(gram).eigenvectors[:, 0]
    U, V = whitened_lowrank(W, gram, 1, unvisited="zero")
    Wn = U @ V
    Wd = Wn * torch.diagonal(gram)  # zero weight on the null direction, in the equilibrated metric
    assert float((Wd @ null).abs()) < 1e-6 * float(Wd.norm())
    assert float(((W - Wn) @ gram * (W - Wn)).sum()) < 1e-12  # and still optimal (0 at full rank)


def test_fp16_factors_fit_the_range():
    """Regression (found by hypothesis): with cond(gram) = 1e9 the whitened-balanced V of an fp16
    layer reached 1.7e5 and became Inf; the factors are now rescaled (product unchanged), and a
    product no rescaling can fit is a clear error."""
    Gp = torch.diag(torch.tensor([1.0, 1e-9], dtype=f64))
    C = torch.diag(torch.tensor([1.0, 1e-4], dtype=f64))
    W = torch.tensor([[10.0, 10.0]], dtype=torch.float16)
    U64, V64 = anchored_lowrank(W.to(f64), C, Gp, 1)
    assert V64.abs().max() > torch.finfo(torch.float16).max  # the float64 balance would overflow
    U, V = anchored_lowrank(W, C, Gp, 1)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    assert torch.allclose(U.to(f64) @ V.to(f64), U64 @ V64, rtol=2e-3)
    with pytest.raises(PrehabError, match="range of torch.float16"):
        anchored_lowrank(W, torch.diag(torch.tensor([1.0, 1.0], dtype=f64)), Gp, 1)


_BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


@examples(60)
@given(d=st.integers(1, 10), out=st.integers(1, 6), seed=seeds, neg=st.floats(0.02, 1.0),
       n_neg=st.integers(1, 3), trace_sign=st.sampled_from(["positive", "any"]))
def test_indefinite_gram_is_an_error(d, out, seed, neg, n_neg, trace_sign):
    """A "gram" with an eigenvalue of -2% or more of the largest is no covariance: the objective is
    unbounded below, so there is no optimum to return (before: a trace <= 0 gave W' = 0, a positive
    trace an answer for the positive part, silently)."""
    g = _gen(seed)
    Q = _orthonormal(d, d, g)
    lam = torch.rand(d, generator=g, dtype=f64) + 0.5
    k = min(n_neg, d)
    lam[:k] = -neg * lam.max()
    if trace_sign == "positive" and lam.sum() <= 0:
        lam[k:] += (-lam.sum() + 1) / max(d - k, 1) if d > k else 0
    assume(float(lam.min()) < -0.011 * float(lam.abs().max()))
    gram = (Q * lam) @ Q.T
    W = torch.randn(out, d, generator=g, dtype=f64)
    with pytest.raises(PrehabError, match="positive semi-definite"):
        whitened_lowrank(W, gram, 1)
    with pytest.raises(PrehabError, match="positive semi-definite"):
        anchored_lowrank(W, gram, gram, 1)


@examples(60)
@given(d=st.integers(1, 8), out=st.integers(1, 8), seed=seeds, where=st.sampled_from(["W", "gram", "cross"]),
       bad=st.sampled_from(_BAD_VALUES), dtype=st.sampled_from([torch.float32, f64]))
def test_closed_forms_reject_nonfinite(d, out, seed, where, bad, dtype):
    g = _gen(seed)
    X = torch.randn(2 * d, d, generator=g, dtype=dtype)
    W = torch.randn(out, d, generator=g, dtype=dtype)
    gram = X.T @ X
    cross = gram.clone()
    i, j = int(torch.randint(d, (1,), generator=g)), int(torch.randint(d, (1,), generator=g))
    {"W": W, "gram": gram, "cross": cross}[where][i % W.shape[0] if where == "W" else i, j] = bad
    with pytest.raises(PrehabError, match="NaN or Inf"):
        anchored_lowrank(W, cross, gram, 1)
    if where != "cross":
        with pytest.raises(PrehabError, match="NaN or Inf"):
            whitened_lowrank(W, gram, 1)


@examples(60)
@given(d=st.integers(1, 6), out=st.integers(1, 6), seed=seeds,
       bad=st.sampled_from(["rank0", "rank_neg", "rank_float", "rank_bool", "gram_shape", "cross_shape",
                            "W_1d", "W_3d", "gram_3d", "W_int", "gram_complex", "damping_neg",
                            "damping_nan", "W_list"]))
def test_closed_forms_reject_bad_arguments(d, out, seed, bad):
    g = _gen(seed)
    W = torch.randn(out, d, generator=g, dtype=f64)
    gram = torch.eye(d, dtype=f64)
    cross = torch.eye(d, dtype=f64)
    rank = 1
    if bad == "rank0":
        rank = 0
    elif bad == "rank_neg":
        rank = -2
    elif bad == "rank_float":
        rank = 1.5
    elif bad == "rank_bool":
        rank = True
    elif bad == "gram_shape":
        gram = torch.eye(d + 1, dtype=f64)
    elif bad == "cross_shape":
        cross = torch.ones(d, d + 1, dtype=f64)
    elif bad == "W_1d":
        W = W[0]
    elif bad == "W_3d":
        W = W[None]
    elif bad == "gram_3d":
        gram = gram[None]
    elif bad == "W_int":
        W = W.round().to(torch.int64)
    elif bad == "gram_complex":
        gram = gram.to(torch.complex128)
    elif bad == "W_list":
        W = W.tolist()
    kw = {"damping": -0.1} if bad == "damping_neg" else {"damping": float("nan")} if bad == "damping_nan" else {}
    with pytest.raises(PrehabError):
        anchored_lowrank(W, cross, gram, rank, **kw)
    if bad != "cross_shape":
        with pytest.raises(PrehabError):
            whitened_lowrank(W, gram, rank, **kw)


# ---------------------------------------------------------------------------------------------------
# The methods layer
# ---------------------------------------------------------------------------------------------------


def _stats(p: Problem) -> LayerStats:
    return LayerStats(gram_x=p.gram_x, cross=p.cross, gram_xp=p.gram_xp,
                      abs_mean=p.X.abs().mean(0), tokens=p.T)


def _whitened_err(W, Wn, G):
    D = (W - Wn.to(f64))
    return float((D @ G * D).sum())


@examples(200)
@given(p=problems(anchored=True), wdtype=st.sampled_from([f64, torch.float32]))
def test_methods_finite_and_ordered(p, wdtype):
    """Every method, with its defaults and with the exact optimum's options: finite factors of the
    right shape and dtype. With the exact options (no shrinkage; aa-svd's full anchor), by optimality,
    SVD-LLM's whitened error is no worse than SVD's or ASVD's, and AA-SVD's anchored error no worse
    than any of them; SVD's plain error is the Eckart–Young tail. (The defaults, OAS shrinkage and
    anchor 0.5, trade in-sample optimality for held-out error: results/anchor.md.)"""
    st_ = _stats(p)
    W = p.W.to(wdtype)
    W64 = W.to(f64)
    exact = {"svd-llm": {"shrinkage": 0.0}, "aa-svd": {"shrinkage": 0.0, "anchor": 1.0}}
    res = {}
    for method in ("svd", "asvd", "svd-llm", "aa-svd"):
        for options in ({}, exact.get(method, {})):
            U, V = factorize(method, W, st_, p.rank, **options)
            assert U.shape == (W.shape[0], p.rank) and V.shape == (p.rank, W.shape[1]), (method, options)
            assert U.dtype == wdtype and V.dtype == wdtype, (method, options)
            assert torch.isfinite(U).all() and torch.isfinite(V).all(), (method, options)
        res[method] = U.to(f64) @ V.to(f64)
    # factor rounding of fp32 outputs: relative 1e-6 of the (pre-rounding) sizes
    rel = 1e-9 if wdtype == f64 else 1e-5
    G = p.gram_x
    scale = _whitened_err(W64, torch.zeros_like(W64), G) + max(_whitened_err(torch.zeros_like(W64), Wn, G)
                                                              for Wn in res.values())
    e = {m: _whitened_err(W64, Wn, G) for m, Wn in res.items()}
    # svd-llm uses gram_x: optimal for the whitened error
    assert e["svd-llm"] <= e["svd"] + rel * scale, e
    assert e["svd-llm"] <= e["asvd"] + rel * scale, e
    # aa-svd: optimal for the anchored objective
    a = {m: float(objective(W64, Wn, p.gram_x, p.cross, p.gram_xp)) for m, Wn in res.items()}
    ascale = p.energy() + max(float((p.Xp @ Wn.T).square().sum() / p.T) for Wn in res.values())
    for m in ("svd", "asvd", "svd-llm"):
        assert a["aa-svd"] <= a[m] + rel * ascale, (m, a)
    # plain SVD: ‖W − W'‖² is the tail of the spectrum
    sv = torch.linalg.svdvals(W64)
    tail = float(sv[p.rank:].square().sum())
    fro = float(W64.square().sum())
    assert abs(float((W64 - res["svd"]).square().sum()) - tail) <= rel * fro + 1e-300


@examples(60)
@given(d=st.integers(1, 6), out=st.integers(1, 6), seed=seeds,
       method=st.sampled_from(["svd", "asvd", "svd-llm", "aa-svd"]),
       bad=st.sampled_from(["W_nan", "W_inf", "rank0", "rank_float", "stats_none", "absmean_nan",
                            "absmean_shape", "absmean_negative", "gram_shape"]))
def test_methods_reject_bad_input(d, out, seed, method, bad):
    g = _gen(seed)
    W = torch.randn(out, d, generator=g, dtype=f64)
    X = torch.randn(3 * d, d, generator=g, dtype=f64)
    G = X.T @ X / (3 * d)
    stats = LayerStats(gram_x=G, cross=G, gram_xp=G, abs_mean=X.abs().mean(0), tokens=3 * d)
    rank = 1
    if bad == "W_nan":
        W[0, 0] = float("nan")
    elif bad == "W_inf":
        W[-1, -1] = float("inf")
    elif bad == "rank0":
        rank = 0
    elif bad == "rank_float":
        rank = 2.5
    elif bad == "stats_none":
        assume(method != "svd")
        stats = None
    elif bad == "absmean_nan":
        assume(method == "asvd")
        stats.abs_mean[0] = float("nan")
    elif bad == "absmean_shape":
        assume(method == "asvd")
        stats.abs_mean = torch.ones(d + 1, dtype=f64)
    elif bad == "absmean_negative":
        assume(method == "asvd")
        stats.abs_mean[0] = -1.0
    elif bad == "gram_shape":
        assume(method in ("svd-llm", "aa-svd"))
        stats = LayerStats(gram_x=torch.eye(d + 1, dtype=f64), cross=torch.eye(d + 1, dtype=f64),
                           gram_xp=torch.eye(d + 1, dtype=f64), abs_mean=None, tokens=1)
    with pytest.raises(PrehabError):
        factorize(method, W, stats, rank)


# ---------------------------------------------------------------------------------------------------
# The ops: covariance
# ---------------------------------------------------------------------------------------------------

_EPS = {torch.float32: 2.0**-24, f64: 2.0**-53}


@st.composite
def token_batches(draw, max_d: int = 24):
    seed = draw(seeds)
    g = _gen(seed)
    d = draw(st.integers(1, max_d))
    n = draw(st.integers(1, 3))  # batches
    xdtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, f64]))
    scale = 2.0 ** draw(st.integers(-20, 20))
    zero_rows = draw(st.booleans())
    lowrank = draw(st.booleans())
    shapes = [draw(st.sampled_from(["2d", "3d"])) for _ in range(n)]
    batches = []
    for shape in shapes:
        T = draw(st.integers(0, 2 * max_d))
        lead = (T,) if shape == "2d" else (max(1, T // 3), 3)
        x = torch.randn(*lead, d, generator=g, dtype=f64)
        y = x + torch.randn(*lead, d, generator=g, dtype=f64)
        if lowrank:
            x = x[..., :1] * torch.ones(d, dtype=f64)
        if zero_rows and x.numel():
            x.reshape(-1, d)[::2] = 0
        batches.append(((x * scale).to(xdtype), (y * scale).to(xdtype)))
    # scaled past the input dtype's range: that is the NaN/Inf test's business
    assume(all(torch.isfinite(x).all() and torch.isfinite(y).all() for x, y in batches))
    note(f"d={d} xdtype={xdtype} scale={scale} shapes={[tuple(b[0].shape) for b in batches]}")
    return d, xdtype, batches


@examples(150)
@given(data=token_batches(), acc_dtype=st.sampled_from([torch.float32, f64]), cross=st.booleans())
def test_covariance_accumulator_matches_fp64(data, acc_dtype, cross):
    d, _xdtype, batches = data
    acc = ops.CovarianceAccumulator(d, cross=cross, dtype=acc_dtype, backend="torch")
    xs, ys = [], []
    for x, y in batches:
        acc.update(x, y if cross else None)
        xs.append(x.reshape(-1, d).to(f64))
        ys.append(y.reshape(-1, d).to(f64))
    X, Y = torch.cat(xs), torch.cat(ys)
    tokens = X.shape[0]
    assert acc.tokens == tokens
    if tokens == 0:
        with pytest.raises(PrehabError, match="no tokens"):
            acc.gram()
        return
    # each entry is a length-T dot product: |error| <= ~T·eps·Σ|x_i||x_j| (plus batches' adds)
    eps = _EPS[acc_dtype]
    # float64 sums of per-batch products: the error is one batch's product's, not the whole sum's
    bound = 2 * (acc.max_batch_tokens + 2) * eps + 2 * (len(batches) + 2) * _EPS[f64]
    G = acc.gram()
    assert G.dtype == torch.float64 and torch.equal(G, G.mT)
    ref = X.T @ X / tokens
    assert ((G.to(f64) - ref).abs() <= bound * (X.abs().T @ X.abs()) / tokens + 1e-300).all()
    if cross:
        C = acc.cross()
        refc = X.T @ Y / tokens
        assert ((C.to(f64) - refc).abs() <= bound * (X.abs().T @ Y.abs()) / tokens + 1e-300).all()


@examples(80)
@given(d=st.integers(1, 12), T=st.integers(1, 20), seed=seeds, bad=st.sampled_from(_BAD_VALUES),
       where=st.sampled_from(["x", "y"]), acc_dtype=st.sampled_from([torch.float32, f64]),
       xdtype=st.sampled_from([torch.float16, torch.float32, f64]))
def test_covariance_accumulator_rejects_nonfinite(d, T, seed, bad, where, acc_dtype, xdtype):
    """NaN/Inf in the tokens is never silently turned into statistics: gram()/cross() raise."""
    g = _gen(seed)
    x = torch.randn(T, d, generator=g).to(xdtype)
    y = torch.randn(T, d, generator=g).to(xdtype)
    (x if where == "x" else y)[int(torch.randint(T, (1,), generator=g)), int(torch.randint(d, (1,), generator=g))] = bad
    acc = ops.CovarianceAccumulator(d, cross=True, dtype=acc_dtype, backend="torch")
    acc.update(x, y)
    if where == "x":
        with pytest.raises(PrehabError, match="NaN or Inf"):
            acc.gram()
    with pytest.raises(PrehabError, match="NaN or Inf"):
        acc.cross()


@examples(40)
@given(d=st.integers(1, 8), T=st.integers(1, 8), seed=seeds)
def test_covariance_accumulator_overflow_is_an_error(d, T, seed):
    """Finite fp32 tokens whose squares overflow the fp32 accumulator: a clear error, not Inf."""
    x = torch.randn(T, d, generator=_gen(seed)).sign() * 1e30
    acc = ops.CovarianceAccumulator(d, dtype=torch.float32, backend="torch")
    acc.update(x)
    with pytest.raises(PrehabError, match="float64"):
        acc.gram()
    acc64 = ops.CovarianceAccumulator(d, dtype=f64, backend="torch")
    acc64.update(x)
    assert torch.isfinite(acc64.gram()).all()


@examples(60)
@given(d=st.integers(1, 6), T=st.integers(1, 6), seed=seeds,
       bad=st.sampled_from(["x_1d", "x_width", "G_shape", "G_int", "G_fp16", "y_shape", "C_alone",
                            "C_is_G", "C_dtype", "x_int", "acc_update_width", "acc_y_missing"]))
def test_covariance_rejects_bad_arguments(d, T, seed, bad):
    g = _gen(seed)
    x = torch.randn(T, d, generator=g)
    y = torch.randn(T, d, generator=g)
    G = torch.zeros(d, d)
    C = torch.zeros(d, d)
    kw = {"G": G, "x": x, "C": C, "y": y}
    if bad == "x_1d":
        kw["x"] = x[0]
    elif bad == "x_width":
        kw["x"] = torch.randn(T, d + 1, generator=g)
    elif bad == "G_shape":
        kw["G"] = torch.zeros(d, d + 1)
    elif bad == "G_int":
        kw["G"] = torch.zeros(d, d, dtype=torch.int64)
    elif bad == "G_fp16":
        kw["G"] = torch.zeros(d, d, dtype=torch.float16)
    elif bad == "y_shape":
        kw["y"] = torch.randn(T + 1, d, generator=g)
    elif bad == "C_alone":
        kw["y"] = None
    elif bad == "C_is_G":
        kw["C"] = G
    elif bad == "C_dtype":
        kw["C"] = torch.zeros(d, d, dtype=f64)
    elif bad == "x_int":
        kw["x"] = torch.ones(T, d, dtype=torch.int32)
    if bad.startswith("acc_"):
        acc = ops.CovarianceAccumulator(d, cross=bad == "acc_y_missing", backend="torch")
        with pytest.raises(PrehabError):
            acc.update(torch.randn(T, d + 1) if bad == "acc_update_width" else x)
        return
    before = G.clone()
    with pytest.raises(PrehabError):
        ops.covariance_update(kw["G"], kw["x"], kw["C"], kw["y"], backend="torch")
    assert torch.equal(G, before)  # nothing accumulated on a rejected call


# ---------------------------------------------------------------------------------------------------
# The ops: stable rank
# ---------------------------------------------------------------------------------------------------


def _sr_oracle(M: torch.Tensor, kind: str):
    """Value and d value/dM from a float64 SVD (M [B, m, n])."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    fro2 = S.square().sum(-1)
    if kind == "stable":
        s1 = S[:, 0]
        val = fro2 / s1.square()
        grad = 2 * M / s1.square()[:, None, None] - (2 * fro2 / s1**3)[:, None, None] * (
            U[:, :, :1] @ Vh[:, :1, :])
    else:
        nuc = S.sum(-1)
        val = nuc.square() / fro2
        P = U @ Vh
        grad = (2 * nuc / fro2)[:, None, None] * P - (2 * val / fro2)[:, None, None] * M
    return val, grad


@st.composite
def stable_rank_inputs(draw):
    """W [B, m, n] = U diag(s) Vᵀ with a drawn spectrum; optionally a whitening factor L."""
    seed = draw(seeds)
    g = _gen(seed)
    B = draw(st.integers(1, 3))
    m = draw(st.integers(1, 16))
    n = draw(st.integers(1, 16))
    k = min(m, n)
    shape = draw(st.sampled_from(["gap", "rank1", "flat_tail", "decay"]))
    dtype = draw(st.sampled_from([torch.float32, f64, torch.float16, torch.bfloat16]))
    log_scale = draw(st.integers(-100, 100))  # fp32 ‖MᵀMv‖² leaves the range beyond about 2^±30
    whiten = draw(st.sampled_from([None, "identity", "cholesky", "cholesky_illcond"]))
    Ws = []
    for _ in range(B):
        if shape == "gap":  # a clear top singular value: the gradient is well defined
            s = torch.cat([torch.tensor([1.0], dtype=f64), 0.7 * torch.rand(k - 1, generator=g, dtype=f64)])
        elif shape == "rank1":
            s = torch.zeros(k, dtype=f64)
            s[0] = 1.0
        elif shape == "flat_tail":
            s = torch.cat([torch.tensor([1.0], dtype=f64), torch.full((k - 1,), 0.5, dtype=f64)])
        else:
            s = torch.logspace(0, -6, k, dtype=f64)
        Ws.append((_orthonormal(m, k, g) * s) @ _orthonormal(n, k, g).T)
    W = torch.stack(Ws) * 2.0 ** log_scale
    L = None
    if whiten == "identity":
        L = torch.eye(n, dtype=f64)
    elif whiten is not None:
        X = torch.randn(2 * n + 1, n, generator=g, dtype=f64)
        if whiten == "cholesky_illcond":
            X = X * torch.logspace(0, -4, n, dtype=f64)
        L = torch.linalg.cholesky(X.T @ X / X.shape[0] + 1e-12 * torch.eye(n, dtype=f64))
        L = L / L.abs().max()
    note(f"B={B} m={m} n={n} shape={shape} dtype={dtype} log2_scale={log_scale} whiten={whiten}")
    return W, L, shape, dtype


@examples(250)
@given(inp=stable_rank_inputs(), kind=st.sampled_from(["stable", "nuclear"]))
def test_stable_rank_matches_fp64_oracle(inp, kind):
    W, L, shape, dtype = inp
    fmax = torch.finfo(dtype).max
    assume(float(W.abs().max()) < fmax / 8)
    Wd = W.to(dtype)
    assume(bool((Wd != 0).flatten(1).any(1).all()))  # zero matrices have their own test
    Ld = None if L is None else L.to(dtype)
    value, grad, state = ops.stable_rank(Wd, Ld, kind=kind, backend="torch")
    assert torch.isfinite(value).all() and torch.isfinite(grad).all(), (value, grad)
    assert grad.shape == W.shape
    M = Wd.to(f64) if Ld is None else Wd.to(f64) @ Ld.to(f64)
    ref_val, ref_grad = _sr_oracle(M, kind)
    cd = ops.reference.compute_dtype(dtype)
    tol = 1e-9 if cd == f64 else 2e-4
    if kind == "stable":
        assert state.shape == (W.shape[0], W.shape[2]) and torch.isfinite(state).all()
        # power iteration underestimates σ₁ (a Rayleigh quotient), so the value is never below the truth
        assert (value.to(f64) >= ref_val * (1 - tol)).all(), (value, ref_val)
    else:
        assert state is None
    # value: accurate when the top singular value is separated (stable) / spectrum not too wide (nuclear)
    if shape in ("gap", "rank1") or kind == "nuclear" and shape != "decay":
        if kind == "stable" and L is not None and shape != "rank1":
            return  # whitening can close the gap; only the one-sided bound above holds
        err = (value.to(f64) - ref_val).abs() / ref_val
        allowed = torch.full_like(ref_val, tol * 10)
        if kind == "nuclear":
            # Newton–Schulz lifts singular values above ~‖M‖_F·1e-5 to 1 in its fixed step count; the
            # mass of smaller ones may be missing from ‖M‖_* (see polar_newton_schulz)
            S = torch.linalg.svdvals(M)
            fro = S.square().sum(-1, keepdim=True).sqrt()
            small = torch.where(S < 1e-3 * fro, S, torch.zeros_like(S)).sum(-1)
            allowed = allowed + 2 * small / S.sum(-1)
        assert (err <= allowed).all(), (value, ref_val, allowed)
        if kind == "stable" and L is None:
            # the gradient is homogeneous of degree -1 in M: σ₁·grad is dimensionless, of size ~ sr
            gerr = (grad.to(f64) - ref_grad).flatten(1).norm(dim=1)
            s1 = torch.linalg.matrix_norm(M, ord=2)
            assert (gerr * s1 <= tol * 100 * ref_val).all(), (gerr * s1, ref_val)


@examples(60)
@given(B=st.integers(1, 3), m=st.integers(1, 9), n=st.integers(1, 9), kind=st.sampled_from(["stable", "nuclear"]),
       dtype=st.sampled_from([torch.float32, f64]), zero_rows=st.booleans(), seed=seeds)
def test_stable_rank_zero_and_partly_zero(B, m, n, kind, dtype, zero_rows, seed):
    """The zero matrix: value 0, gradient 0, never NaN; zero rows leave the other rows' answer alone."""
    W = torch.zeros(B, m, n, dtype=dtype)
    if zero_rows:
        W[:, 0] = torch.randn(B, n, generator=_gen(seed), dtype=dtype)
    value, grad, _ = ops.stable_rank(W, kind=kind, backend="torch")
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    if not zero_rows:
        assert (value == 0).all() and (grad == 0).all()
    else:  # a single nonzero row is rank 1: both surrogates are 1, gradient ~ 0
        assert torch.allclose(value.to(f64), torch.ones(B, dtype=f64), rtol=1e-4)


@examples(60)
@given(B=st.integers(1, 3), m=st.integers(1, 8), n=st.integers(1, 8), seed=seeds, bad=st.sampled_from(_BAD_VALUES),
       where=st.sampled_from(["W", "L"]), kind=st.sampled_from(["stable", "nuclear"]),
       dtype=st.sampled_from([torch.float32, f64, torch.float16]))
def test_stable_rank_nonfinite_is_never_hidden(B, m, n, seed, bad, where, kind, dtype):
    """NaN/Inf in W (or L) makes that matrix's value non-finite, never a plausible number; the other
    matrices of the batch are unaffected. (The op raises nothing: stable_rank_loss runs inside
    torch.compile(fullgraph=True), where a data-dependent check would break the graph; the Prehab
    loop stops on a non-finite loss.)"""
    g = _gen(seed)
    W = torch.randn(B, m, n, generator=g).to(dtype)
    L = torch.linalg.cholesky(torch.eye(n) + 0.1 * torch.ones(n, n)).to(dtype) if where == "L" else None
    (W[0] if where == "W" else L)[int(torch.randint(m if where == "W" else n, (1,), generator=g)),
                                  int(torch.randint(n, (1,), generator=g))] = bad
    value, grad, _ = ops.stable_rank(W, L, kind=kind, backend="torch")
    assert not torch.isfinite(value[0])
    if where == "W" and B > 1:
        assert torch.isfinite(value[1:]).all() and torch.isfinite(grad[1:]).all()


@examples(60)
@given(m=st.integers(1, 6), n=st.integers(1, 6), seed=seeds, kind=st.sampled_from(["stable", "nuclear"]),
       bad=st.sampled_from(["W_1d", "W_4d", "W_empty", "L_shape", "L_grad", "W_int", "state_shape",
                            "state_nuclear", "iters_neg", "iters_float", "kind"]))
def test_stable_rank_rejects_bad_arguments(m, n, seed, kind, bad):
    g = _gen(seed)
    W = torch.randn(m, n, generator=g)
    kw = {"L": None, "kind": kind, "state": None, "iters": None}
    if bad == "W_1d":
        W = W[0]
    elif bad == "W_4d":
        W = W[None, None]
    elif bad == "W_empty":
        W = W[:0]
    elif bad == "L_shape":
        kw["L"] = torch.eye(n + 1)
    elif bad == "L_grad":
        kw["L"] = torch.eye(n).requires_grad_()
    elif bad == "W_int":
        W = W.round().to(torch.int64)
    elif bad == "state_shape":
        kw.update(kind="stable", state=torch.randn(n + 1))
    elif bad == "state_nuclear":
        kw.update(kind="nuclear", state=torch.randn(n))
    elif bad == "iters_neg":
        kw["iters"] = -1
    elif bad == "iters_float":
        kw["iters"] = 2.0
    elif bad == "kind":
        kw["kind"] = "spectral"
    with pytest.raises(PrehabError):
        ops.stable_rank(W, backend="torch", **kw)
    with pytest.raises(PrehabError):
        ops.stable_rank_loss(W, backend="torch", **kw)


# ---------------------------------------------------------------------------------------------------
# The ops: low-rank linear
# ---------------------------------------------------------------------------------------------------

_LR_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, f64: 2.0**-53}


@st.composite
def lowrank_inputs(draw):
    seed = draw(seeds)
    g = _gen(seed)
    lead = draw(st.sampled_from([(), (0,), (1,), (5,), (2, 3), (1, 1, 4)]))
    i = draw(st.integers(1, 24))
    o = draw(st.integers(1, 24))
    r = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, f64]))
    bias = draw(st.booleans())
    scale = 2.0 ** draw(st.integers(-4, 4))
    x = (torch.randn(*lead, i, generator=g, dtype=f64) * scale).to(dtype)
    U = (torch.randn(o, r, generator=g, dtype=f64) / r**0.5).to(dtype)
    V = (torch.randn(r, i, generator=g, dtype=f64) / i**0.5).to(dtype)
    b = torch.randn(o, generator=g, dtype=f64).to(dtype) if bias else None
    note(f"lead={lead} in={i} out={o} r={r} dtype={dtype} bias={bias}")
    return x, U, V, b


@examples(200)
@given(inp=lowrank_inputs())
def test_lowrank_linear_matches_fp64(inp):
    x, U, V, b = inp
    y = ops.lowrank_linear(x, U, V, b, backend="torch")
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], U.shape[0])
    assert torch.isfinite(y).all()
    x64, U64, V64 = x.to(f64), U.to(f64), V.to(f64)
    ref = x64 @ V64.T @ U64.T + (0 if b is None else b.to(f64))
    # error bound: the rounding of the bottleneck t = x Vᵀ and of both sums, per element
    eps = _LR_EPS[x.dtype]
    r, i = V.shape
    mag = (x64.abs() @ V64.abs().T) @ U64.abs().T + (0 if b is None else b.to(f64).abs())
    assert ((y.to(f64) - ref).abs() <= 2 * (i + r + 2) * eps * mag + 1e-300).all()


@examples(80)
@given(inp=lowrank_inputs(), bad=st.sampled_from(_BAD_VALUES))
def test_lowrank_linear_nonfinite_stays_in_its_row(inp, bad):
    """A NaN/Inf token propagates to its own output row (as nn.Linear does) and nowhere else."""
    x, U, V, b = inp
    assume(x.dim() >= 2 and x.shape[0] > 0)
    x = x.clone()
    x.reshape(-1, x.shape[-1])[0, 0] = bad
    y = ops.lowrank_linear(x, U, V, b, backend="torch").reshape(-1, U.shape[0])
    assert torch.isfinite(y[1:]).all()
    assert not torch.isfinite(y[0]).any() or (V[:, 0] == 0).all()


@examples(60)
@given(i=st.integers(1, 6), o=st.integers(1, 6), r=st.integers(1, 4), seed=seeds,
       bad=st.sampled_from(["rank", "in", "bias_shape", "dtype_mix", "U_1d", "V_3d", "x_int", "x_0d"]))
def test_lowrank_linear_rejects_bad_arguments(i, o, r, seed, bad):
    g = _gen(seed)
    x, U, V, b = (torch.randn(3, i, generator=g), torch.randn(o, r, generator=g),
                  torch.randn(r, i, generator=g), torch.randn(o, generator=g))
    if bad == "rank":
        U = torch.randn(o, r + 1, generator=g)
    elif bad == "in":
        x = torch.randn(3, i + 1, generator=g)
    elif bad == "bias_shape":
        b = torch.randn(o + 1, generator=g)
    elif bad == "dtype_mix":
        U = U.double()
    elif bad == "U_1d":
        U = U[:, 0]
    elif bad == "V_3d":
        V = V[None]
    elif bad == "x_int":
        x = x.to(torch.int64)
    elif bad == "x_0d":
        x = x[0, 0]
    with pytest.raises(PrehabError):
        ops.lowrank_linear(x, U, V, b, backend="torch")


def test_profiles():
    """CI replays the same examples every run (no flaky CI); neither profile writes an example
    database into the working tree."""
    assert _PARENT.derandomize is not _THOROUGH
    assert _PARENT.database is None and _PARENT.deadline is None
