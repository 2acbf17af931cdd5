"""ZS-SVD's global selection of singular components by the zero-sum rule.

Each targeted matrix W [m, n] is whitened (A = W·L, L the factor of its input covariance) and
decomposed, A = Σᵢ σᵢ uᵢ vᵢᵀ. Dropping component i changes the task loss, to first order, by
``ΔLᵢ = −σᵢ · uᵢᵀ H vᵢ`` with ``H = G·L⁻ᵀ`` the task-loss gradient in whitened coordinates.

Selection (:func:`zero_sum_select`): every matrix offers one candidate, its smallest remaining σ. The
candidates sit in two min-heaps by |ΔL|, one for ΔL ≥ 0 and one for ΔL < 0. While the parameters kept
exceed the budget: if the running sum of the chosen ΔL is ≤ 0, take the smallest |ΔL| from the
positive heap, else from the negative one (the other when one is empty), add its ΔL to the running
sum, and let its matrix offer its next smallest σ. So the chosen changes keep summing to about zero.

Parameter accounting with the break-even rank ``r* = floor((m·n − 1)/(m + n))``: a matrix of rank above
r* is stored dense (m·n parameters; dropping a σ there saves nothing yet); reaching r* saves
``m·n − r*·(m + n)``, and each σ dropped below r* saves ``m + n``. A matrix that ends above r* keeps its
original dense weight. The loop stops at the first drop that brings the parameters kept to or below
the budget, so the budget is met exactly in the sense that one drop fewer would exceed it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .. import distributed as _dist
from ..calibration import take_sequences
from ..errors import PrehabError
from ..linalg import closed_form_factors, truncated_svd
from ..utils import check_keep_ratio
from .base import CovarianceOptions, register
from .svd_llm import Whitening

__all__ = ["MatrixCandidates", "Selection", "break_even_rank", "zero_sum_select", "predicted_changes",
           "whitened_spectrum", "projected_correction", "corrected_lowrank", "ZSOptions", "ZSAllocation",
           "ZSSVD", "ZS_MIN_RANK_OF_KEEP"]

# The default minimum rank, as a fraction of keep_ratio·(break-even rank), i.e. of the uniform rank:
# on MiniLM without a floor the rule cuts some matrices to rank 1 and loses to uniform ranks
# (results/methods_minilm.md).
ZS_MIN_RANK_OF_KEEP = 0.75
# The covariance shrinkage of zs-svd (its spectra and its factors) when none is given: 0, the exact
# optimum (measured: ZSSVDOptions); the whitening methods' default is OAS (base.DEFAULT_SHRINKAGE).
ZS_DEFAULT_SHRINKAGE = 0.0


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense m×n matrix."""
    return (m * n - 1) // (m + n)


@dataclass
class MatrixCandidates:
    """One matrix's components, largest σ first: ``sigma`` [k] and predicted changes ``delta`` [k]."""

    name: str
    m: int
    n: int
    sigma: torch.Tensor
    delta: torch.Tensor
    min_rank: int = 1

    def dense_params(self) -> int:
        return self.m * self.n

    def params(self, rank: int) -> int:
        return self.m * self.n if rank > break_even_rank(self.m, self.n) else rank * (self.m + self.n)


@dataclass
class Selection:
    ranks: dict  # name -> rank (None: stays dense)
    params_kept: int
    params_dense: int
    budget: int
    drops: int  # components dropped (including those of matrices that revert to dense)
    running_sum: float  # Σ ΔL of the drops
    order: list  # the drops in the order taken: (matrix name, component index, largest σ = 0)


def zero_sum_select(matrices: list, keep_ratio: float) -> Selection:
    """Ranks under the budget ``floor(keep_ratio · Σ m·n)`` parameters by the zero-sum rule."""
    if not matrices:
        raise PrehabError("zero-sum selection needs at least one matrix")
    check_keep_ratio(keep_ratio)
    dense = sum(c.dense_params() for c in matrices)
    budget = math.floor(keep_ratio * dense)
    rank = []
    for c in matrices:
        k = int(c.sigma.numel())
        if c.delta.numel() != k or k != min(c.m, c.n):
            raise PrehabError(f"matrix '{c.name}': need min(m, n) = {min(c.m, c.n)} singular values and "
                              f"predicted changes, got {k} and {c.delta.numel()}")
        if not (1 <= c.min_rank <= k):
            raise PrehabError(f"matrix '{c.name}': min_rank {c.min_rank} must be in [1, {k}]")
        rank.append(k)
    deltas = [c.delta.detach().to(torch.float64).cpu().tolist() for c in matrices]
    kept = sum(c.params(r) for c, r in zip(matrices, rank))
    pos, neg = [], []  # (|ΔL|, matrix index) -- one entry per matrix at most

    def offer(j):
        if rank[j] > matrices[j].min_rank:
            d = deltas[j][rank[j] - 1]
            heapq.heappush(pos if d >= 0 else neg, (abs(d), j))

    for j in range(len(matrices)):
        offer(j)
    total, order = 0.0, []
    while kept > budget:
        first, second = (pos, neg) if total <= 0 else (neg, pos)
        heap = first if first else second
        if not heap:
            raise PrehabError(
                f"keep_ratio {keep_ratio} cannot be met: every matrix is at its minimum rank with "
                f"{kept:,} parameters kept for a budget of {budget:,}; lower the minimum rank or raise "
                "keep_ratio")
        _, j = heapq.heappop(heap)
        c = matrices[j]
        before = c.params(rank[j])
        total += deltas[j][rank[j] - 1]
        order.append((c.name, rank[j] - 1))
        rank[j] -= 1
        kept -= before - c.params(rank[j])
        offer(j)
    ranks = {c.name: (None if r > break_even_rank(c.m, c.n) else r) for c, r in zip(matrices, rank)}
    return Selection(ranks=ranks, params_kept=kept, params_dense=dense, budget=budget, drops=len(order),
                     running_sum=total, order=order)


def predicted_changes(A_svd, H: torch.Tensor) -> torch.Tensor:
    """``ΔLᵢ = −σᵢ · uᵢᵀ H vᵢ`` for the SVD ``(U, S, Vh)`` of a whitened matrix and its whitened gradient."""
    U, S, Vh = A_svd
    g = ((U.mT @ H) * Vh).sum(dim=1)  # uᵢᵀ H vᵢ, with vᵢ the rows of Vh
    return -S * g


def whitened_spectrum(W: torch.Tensor, factor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and ΔL of every component of ``A = W·R`` (``factor``: a :class:`~prehab_svd.linalg.WhiteningFactor`),
    float64, largest σ first, zero-padded to min(m, n) when the covariance is singular."""
    W64 = W.detach().to(torch.float64)
    A = W64 @ factor.R
    H = factor.right_solve_t(grad.detach().to(torch.float64))  # G R⁻ᵀ
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    delta = predicted_changes((U, S, Vh), H)
    k = min(W.shape)
    if S.numel() < k:
        pad = S.new_zeros(k - S.numel())
        S, delta = torch.cat([S, pad]), torch.cat([delta, pad])
    return S, delta


def projected_correction(A: torch.Tensor, A_r: torch.Tensor, H: torch.Tensor, *, eps: float = 1e-6):
    """``A_r + Σⱼ αⱼ Hⱼ`` with ``α = (K + eps·tr(K)/k·I)⁻¹ b``, ``Kᵢⱼ = ⟨Hᵢ, Hⱼ⟩``, ``bⱼ = ⟨Hⱼ, A − A_r⟩``:
    the component of the truncation error ``A − A_r`` in the span of the gradients ``H`` [k, m, n] is
    put back, so to first order the k losses no longer see the truncation (``⟨Hⱼ, A_c − A⟩ ≈ 0``)."""
    Hf = H.reshape(H.shape[0], -1)
    K = Hf @ Hf.T
    k = K.shape[0]
    tr = torch.diagonal(K).sum()
    if not tr > 0:
        return A_r
    eye = torch.eye(k, dtype=K.dtype, device=K.device)
    alpha = torch.linalg.solve(K + (eps * tr / k) * eye, Hf @ (A - A_r).reshape(-1))
    return A_r + (alpha @ Hf).reshape(A.shape)


def corrected_lowrank(W: torch.Tensor, factor, rank: int, grads: torch.Tensor, *, eps: float = 1e-6):
    """Whitened truncation, one projected correction step, then re-truncation.

    With ``A = W R``, ``A_r`` its rank-``rank`` truncation, ``δ = A − A_r`` and the whitened gradients
    ``Hⱼ = Gⱼ R⁻ᵀ`` (``grads``: [k, m, n], e.g. the task gradients of k groups of calibration
    sequences): ``α = (K + eps·tr(K)/k·I)⁻¹ b`` with ``Kᵢⱼ = ⟨Hᵢ, Hⱼ⟩`` and ``bⱼ = ⟨Hⱼ, δ⟩``, i.e. the
    part of δ in the span of the gradients (the best step along them); ``A_c = A_r + Σⱼ αⱼ Hⱼ`` is
    truncated to ``rank`` again and mapped back: ``W' = (A_c)_r R⁻¹``. Returns balanced factors like
    :func:`prehab_svd.linalg.whitened_lowrank`.
    """
    W64 = W.detach().to(torch.float64)
    A = W64 @ factor.R
    U, S, Vh = truncated_svd(A, rank)
    A_r = (U * S) @ Vh
    H = torch.stack([factor.right_solve_t(g.to(torch.float64)) for g in grads.detach()])
    A_c = projected_correction(A, A_r, H, eps=eps)
    return closed_form_factors(W64, A_c, factor, rank, W.dtype, W.device)


# --------------------------------------------------------------------------------------------------
# The allocation: task gradients, spectra of every target, global selection


@dataclass
class ZSOptions:
    """The zero-sum allocation's options (zs-svd, or any method with ``allocation="zs"``).

    task: the loss whose gradient predicts each component's effect ("auto": cross-entropy for a
    causal LM, the in-batch contrastive loss for an encoder, or a callable loss(model, batch)),
    averaged over the first ``grad_samples`` calibration sequences. min_rank_fraction: a matrix never
    goes below rank ``max(1, floor(min_rank_fraction · break-even rank))``; None:
    ``ZS_MIN_RANK_OF_KEEP · keep_ratio``. damping, shrinkage: of the whitening the spectra are taken
    in (as for the whitening methods)."""

    task: object = None
    grad_samples: int = 32
    min_rank_fraction: float | None = None
    damping: float = 0.0
    shrinkage: float | str = ZS_DEFAULT_SHRINKAGE  # see ZSSVDOptions

    def __post_init__(self):
        v = self.grad_samples
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PrehabError(f"grad_samples must be a positive int, got {v!r}")
        f = self.min_rank_fraction
        if f is not None and not (isinstance(f, (int, float)) and 0 <= f <= 1):
            raise PrehabError(f"min_rank_fraction must be in [0, 1], got {f!r}")
        self.shrinkage = CovarianceOptions(self.damping, self.shrinkage).shrinkage  # the same checks


class _Spectra(Whitening):
    """The whitening the spectra are taken in (svd-llm's: one stream, the original activations)."""

    name = "zs-spectra"


class ZSAllocation:
    """ZS-SVD's global, heterogeneous ranks: gradients first (:meth:`gradients`), then the block
    driver visits every group with :meth:`visit` (σ and ΔL of each layer, distributed over the
    ranks), then :meth:`select` runs the zero-sum rule over all of them."""

    Options = ZSOptions

    def __init__(self, options: ZSOptions, keep_ratio: float, correction_grads: int = 0):
        self.options = options
        self.keep_ratio = float(keep_ratio)
        self.min_rank_fraction = (ZS_MIN_RANK_OF_KEEP * self.keep_ratio if options.min_rank_fraction is None
                                  else options.min_rank_fraction)
        self.correction_grads = correction_grads
        self.spectral = _Spectra(CovarianceOptions(options.damping, options.shrinkage))
        self.candidates: list = []
        self.grads: dict = {}
        self.chunk_grads: dict = {}
        self.samples = 0
        self.task = None

    # gradients ---------------------------------------------------------------------------------

    def gradients(self, model, names, batches) -> None:
        """Mean gradient of the task loss w.r.t. each target weight over the first ``grad_samples``
        sequences (and, for the correction, of ``correction_grads`` disjoint groups of them).

        ``torch.autograd.grad`` is used, so the parameters' ``.grad`` are left untouched."""
        weights = [model.get_submodule(n).weight for n in names]
        frozen = [w for w in weights if not w.requires_grad]
        for w in frozen:  # a frozen model still has a task gradient; restored below
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                self._gradients_of(model, names, weights, batches)
        finally:
            for w in frozen:
                w.requires_grad_(False)

    def _gradients_of(self, model, names, weights, batches) -> None:
        """The sums of ``n · gradient`` over this rank's planned batches, summed over the ranks, over
        the global sequence count (and the same per chunk of global batches, round robin)."""
        from ..tasks import default_task

        chunks = self.correction_grads
        loss_fn = default_task(model, self.options.task, encoder="contrastive")
        plan, taken = gradient_plan(batches, self.options.grad_samples)
        # sums in at least float32 (16-bit weights), in float64 for float64 weights
        total = [torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32)) for w in weights]
        # per chunk: sums; chunk c holds the global batches g with g % chunks == c
        groups = [[torch.zeros_like(t) for t in total] for _ in range(min(chunks, len(taken)))]
        error = None
        try:
            for i, n, g in plan:
                part = take_sequences(batches[i], n)
                loss = loss_fn(model, part)
                if not torch.isfinite(loss):
                    raise PrehabError(f"the task loss is {float(loss.detach())} on calibration batch {i}; "
                                      "check the model and data")
                gs = torch.autograd.grad(loss, weights, allow_unused=True)
                if chunks:
                    for s_, gr in zip(groups[g % chunks], gs):
                        if gr is not None:
                            s_.add_(gr.to(s_.dtype), alpha=n)
                for t, gr in zip(total, gs):
                    if gr is not None:
                        t.add_(gr.to(t.dtype), alpha=n)
        except PrehabError as e:
            error = e
        _dist.raise_together(error, "the task gradient of zs-svd")
        seen = sum(taken)
        if seen == 0:
            raise PrehabError("no calibration sequences for the task gradient")
        _dist.all_reduce_sum(*total, *(t for sums in groups for t in sums))
        counts = [sum(taken[c::chunks]) for c in range(len(groups))]
        self.grads = {name: t / seen for name, t in zip(names, total)}
        if chunks:
            for i, name in enumerate(names):
                self.chunk_grads[name] = torch.stack([sums[i] / max(cnt, 1) for sums, cnt in zip(groups, counts)])
        self.samples, self.task = seen, loss_fn

    # spectra -----------------------------------------------------------------------------------

    def visit(self, module, names, group, stats) -> None:
        """σ and ΔL of the group's layers; distributed, layer ``first + j`` is computed by its owner
        rank and broadcast, so every rank holds the same candidates."""
        first = len(self.candidates)
        mine = [j for j in range(len(group)) if _dist.owns(first + j)]
        factor = self.spectral.group_factor(stats.shrunk(self.spectral.shrinkage(stats))) if mine else None
        spectra, jobs = [], []
        for j, full in enumerate(group):
            lin = module.get_submodule(names[full])
            if j in mine:
                sigma, delta = whitened_spectrum(lin.weight, factor, self.grads[full])
                sigma, delta = sigma.contiguous(), delta.contiguous()
            else:  # filled by the owner's broadcast
                k = min(lin.out_features, lin.in_features)
                sigma, delta = (torch.empty(k, dtype=torch.float64, device=lin.weight.device) for _ in "sd")
            spectra.append((sigma, delta))
            jobs.append((_dist.owner(first + j), [sigma, delta]))
        _dist.broadcast_from_owners(jobs)
        for full, (sigma, delta) in zip(group, spectra):
            lin = module.get_submodule(names[full])
            m, n = lin.out_features, lin.in_features
            min_rank = max(1, math.floor(self.min_rank_fraction * break_even_rank(m, n)))
            self.candidates.append(MatrixCandidates(full, m, n, sigma.cpu(), delta.cpu(),
                                                    min(min_rank, min(m, n))))

    # selection ---------------------------------------------------------------------------------

    def select(self) -> Selection:
        if all(bool((c.delta == 0).all()) for c in self.candidates):
            raise PrehabError(
                "the task gradient is zero for every target layer, so zs-svd has nothing to rank by (a "
                "distillation loss toward the model itself is zero at the start); use task='contrastive' "
                "for an encoder or 'causal_lm' for a causal LM")
        return zero_sum_select(self.candidates, self.keep_ratio)

    def details(self, sel: Selection) -> dict:
        return dict(budget=sel.budget, drops=sel.drops, predicted_loss_change=sel.running_sum,
                    grad_samples=self.samples)


def gradient_plan(batches, samples) -> tuple:
    """Which sequences enter the task gradient: the first ``samples`` in the global order, as
    ``(mine, taken)``: ``mine`` = ``[(local batch, sequences taken, global batch)]`` of this rank,
    ``taken`` = sequences taken per global batch. Distributed, the global order is rank 0's batch 0,
    rank 1's batch 0, ..., rank 0's batch 1, ...: the order of the batches before an interleaved
    sharding ``batches[rank::world]``."""
    sizes = [int(b["input_ids"].shape[0]) if "input_ids" in b else 1 for b in batches]
    per_rank = _dist.all_gather_objects(sizes)
    me = _dist.rank()
    mine, taken, seen = [], [], 0
    for i in range(max(len(s_) for s_ in per_rank)):
        for r, rank_sizes in enumerate(per_rank):
            if seen >= samples:
                return mine, taken
            if i >= len(rank_sizes):
                continue
            take = min(rank_sizes[i], samples - seen)
            if r == me:
                mine.append((i, take, len(taken)))
            taken.append(take)
            seen += take
    return mine, taken


# --------------------------------------------------------------------------------------------------
# The method


@dataclass
class ZSSVDOptions(CovarianceOptions):
    """zs-svd's own options (the allocation's are :class:`ZSOptions`). correction: the one-step
    projected correction onto the span of ``correction_grads`` gradients (of disjoint groups of the
    gradient's sequences) before re-truncation (:func:`corrected_lowrank`).

    shrinkage defaults to 0 here, not to OAS: on SmolLM2 (results/shrinkage_smollm2.md) OAS left
    zs-svd unchanged at keep 0.8 and 0.6 (within 2 %, one text better, one worse) and made keep 0.4
    much worse (perplexity 447 / 14,688 against 334 / 7,829), while it helped svd-llm and aa-svd."""

    shrinkage: float | str = ZS_DEFAULT_SHRINKAGE
    correction: bool = False
    correction_grads: int = 4

    def __post_init__(self):
        super().__post_init__()
        v = self.correction_grads
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PrehabError(f"correction_grads must be a positive int, got {v!r}")


@register
class ZSSVD(Whitening):
    """Whitened truncation at the ranks the zero-sum allocation chose, optionally corrected."""

    name = "zs-svd"
    Options = ZSSVDOptions
    allocation = "zs"

    @property
    def correction_grads(self) -> int:
        return self.options.correction_grads if self.options.correction else 0

    def factorize(self, W, stats, rank, factor=None, *, extra=None):
        self._check(W, stats, rank)
        if extra is not None:  # the correction's gradients of this layer
            return corrected_lowrank(W, factor, rank, extra)
        W64 = W.detach().to(torch.float64)
        return closed_form_factors(W64, W64 @ factor.R, factor, rank, W.dtype, W.device)
