"""The targeted weights as Prehab sees them: whitened (``M = W·L``), grouped by shape, with the
surrogates' values, the tail's proximal step, svd-llm's truncation and the spectra.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models import rank_for

__all__ = ["WhitenedTargets", "stable_rank_of", "project_onto", "subspace_iteration", "truncation_rank"]


def _op_factor(Ls: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """The whitening factors as passed to the stable-rank op: in bf16 when the weights are bf16, else
    the stored fp32. The op (its documented numerics: fp32 accumulation throughout) multiplies a bf16
    W by a bf16 L on the bf16 tensor cores (exact products, fp32 accumulation, twice tf32's rate); with
    an fp32 L it upcasts W and runs tf32, which truncates L to 10 mantissa bits. Everything after
    M = W L stays fp32. Rounding L to bf16 (8 bits, round to nearest) changes each entry by at most
    2⁻⁹ relative, unbiased: inside the op's bf16 tolerance (1e-2) and immaterial to a regularizer's
    direction; bf16 has fp32's exponent range, so no factor overflows or flushes.
    fp16 weights keep the fp32 factor (fp16's range could flush small entries of L). The tail
    surrogate and the truncation (fp64 SVDs of W·L) keep the fp32 factor. The cast is one pass over
    the n×n factors per step, against the op's 2·m·n² multiply."""
    return Ls.to(torch.bfloat16) if weight_dtype == torch.bfloat16 else Ls


class WhitenedTargets:
    """The targeted weights grouped by shape, with their whitening factors and power-iteration states.

    ``values(kind)`` returns the per-layer surrogate values (differentiable w.r.t. the weights) in the
    order of ``names``; the stable-rank states are kept between calls (warm start).

    ``owned``: hold only these of ``names`` (a rank's shard of the layers; their ``factors`` suffice).
    Each still gets the cold power-iteration start it would have in the stack of all ``names`` of its
    shape, so its values do not depend on how the layers are split over ranks.

    ``weights``: None reads (and, for ``shrink_tail``, writes) each layer's ``weight``; a dict
    ``{name: whole weight}`` is used instead where the layers' own weights are not whole tensors
    (FSDP2 shards; :mod:`prehab_svd.fsdp` gathers them a few layers at a time). Then every method
    works on the held layers present in the dict only (``values`` returns theirs, in the order of
    ``names``), and ``shrink_tail`` replaces its entries.
    """

    def __init__(self, model: nn.Module, names: list, factors: dict, *, backend: str = "auto",
                 owned=None, keep_ratio: float | None = None, ranks: dict | None = None):
        keep = set(names if owned is None else owned)
        self.names = [n for n in names if n in keep]
        self.backend = backend
        self.keep_ratio = keep_ratio
        # the truncation's rank per layer (None: stays dense); None: the uniform rank of keep_ratio
        self.ranks = ranks
        self.weights: dict | None = None
        # per shape: (held names, their linear modules, L stack, number of all names of the shape,
        # each held name's row in the stack of all of them)
        self._groups = []
        by_shape: dict = {}
        for n in names:
            lin = model.get_submodule(n)
            by_shape.setdefault(tuple(lin.weight.shape), []).append(n)
        for shape, full in by_shape.items():
            group = [n for n in full if n in keep]
            if not group:
                continue
            lins = [model.get_submodule(n) for n in group]
            w = lins[0].weight
            Ls = torch.stack([factors[n].to(device=w.device, dtype=torch.float32) for n in group])
            self._groups.append((group, lins, Ls, len(full), [full.index(n) for n in group]))
        self._state: dict = {}  # (kind, name) -> power-iteration state [n]
        # Subspace tracking of the truncation (see :meth:`projections`): off unless the runner turns
        # it on; per name the tracked U_r [m, r] (fp32) and the B = U_rᵀW of the last forward
        self.track = False
        self._tracked: dict = {}
        self._last_b: dict = {}
        self._covs: dict = {}  # group index -> C = L·Lᵀ stack (fp32), made on first use

    def _present(self):
        """Per shape group with layers present (all held ones, or those in ``weights``): (names,
        linear modules, weight stack, L stack, all-names count, rows in the stack of all names)."""
        for group, lins, Ls, n_all, rows in self._groups:
            idx = list(range(len(group))) if self.weights is None else \
                [i for i, n in enumerate(group) if n in self.weights]
            if not idx:
                continue
            names = [group[i] for i in idx]
            sub_lins = [lins[i] for i in idx]
            W = torch.stack([self.weights[n] for n in names] if self.weights is not None
                            else [lin.weight for lin in sub_lins])
            yield (names, sub_lins, W, Ls if len(idx) == len(group) else Ls[idx], n_all,
                   [rows[i] for i in idx])

    def values(self, kind: str, *, grad: bool = True) -> torch.Tensor:
        out = {}
        for names, _lins, W, Ls, n_all, rows in self._present():
            if not grad:
                W = W.detach()
            if kind == "tail":
                out.update(zip(names, self._tail(W, Ls).unbind(0)))
                continue
            state = iters = None
            if kind == "stable":
                if all(("stable", n) in self._state for n in names):  # warm start
                    state = torch.stack([self._state[("stable", n)] for n in names])
                elif len(names) < n_all:  # part of the stack: its rows of the whole stack's start
                    cold, _ = ops.reference.power_start(None, n_all, W.shape[2], W.device,
                                                        ops.reference.compute_dtype(W.dtype), None)
                    state, iters = cold[rows], ops.reference.STABLE_ITERS_COLD
            Lop = _op_factor(Ls, W.dtype)
            if grad:
                val, new_state = ops.stable_rank_loss(W, Lop, kind=kind, state=state, iters=iters,
                                                      backend=self.backend)
            else:
                val, _g, new_state = ops.stable_rank(W, Lop, kind=kind, state=state, iters=iters,
                                                     backend=self.backend)
            if kind == "stable":
                for n, st in zip(names, new_state.detach().unbind(0)):
                    self._state[("stable", n)] = st
            out.update(zip(names, val.unbind(0)))
        if not out:
            return torch.zeros(0)
        return torch.stack([out[n] for n in self.names if n in out])

    def _top_left(self, M: torch.Tensor, r: int | None = None) -> torch.Tensor:
        """The top-r left singular vectors [B, m, r] of the stack M (fp64 SVD), r from keep_ratio
        unless given."""
        r = rank_for(M.shape[1], M.shape[2], self.keep_ratio) if r is None else r
        return torch.linalg.svd(M.detach().double(), full_matrices=False).U[..., :r].to(M.dtype)

    def _ranks_of(self, names: list, W: torch.Tensor) -> list:
        """The truncation's rank of each of ``names`` (a stack W of one shape); None: stays dense."""
        return [truncation_rank(n, W.shape[1:], self.keep_ratio, self.ranks) for n in names]

    def _tail(self, W: torch.Tensor, Ls: torch.Tensor) -> torch.Tensor:
        """Tail energy fraction ``Σ_{i>r} σᵢ²(M) / ‖M‖_F²`` of each ``M = W·L`` in the stack, r the
        rank ``keep_ratio`` gives the shape (0 where that shape stays dense): svd-llm's relative
        truncation error of the layer at rank r. Differentiable: with the top-r subspace U_r held
        fixed, autograd gives the exact gradient ``2(M_tail − t·M)/‖M‖_F²`` wherever σ_r > σ_{r+1}
        (U_r maximizes ‖U_rᵀM‖_F², so its own derivative does not contribute)."""
        if rank_for(W.shape[1], W.shape[2], self.keep_ratio) is None:
            return W.new_zeros(W.shape[0], dtype=torch.float32)
        M = W.float() @ Ls
        Ur = self._top_left(M)
        tail = M - project_onto(Ur, M)
        return tail.square().sum((-2, -1)) / M.square().sum((-2, -1)).clamp_min(1e-30)

    @contextmanager
    def truncated(self):
        """Within the block, every held layer computes with ``U_r U_rᵀ W`` instead of ``W``: svd-llm's
        rank-r compression of it (``(W·L)_r L⁻¹``, the truncation of the whitened weight mapped
        back), with U_r (the top-r left singular vectors of ``W·L``) fixed at entry. Gradients reach W
        through the projection (U_r held constant). Layers that stay dense at ``keep_ratio`` are
        left as they are."""
        lin_of = {n: lin for group, lins, *_rest in self._groups for n, lin in zip(group, lins)}
        patched = [(n, lin_of[n], Ur) for n, Ur in self.projections().items()]
        store = self._last_b if self.track else None
        try:
            for n, lin, Ur in patched:
                lin.forward = functools.partial(_projected_linear, lin, Ur, n, store)
            yield
        finally:
            for _n, lin, _Ur in patched:
                lin.__dict__.pop("forward", None)

    @torch.no_grad()
    def shrink_tail(self, frac: float) -> None:
        """The proximal step of the tail penalty: remove ``frac`` of every weight's whitened tail,
        ``W ← W − frac·(I − U_r U_rᵀ) W`` with U_r the top-r left singular vectors of ``W·L``.

        That is ``M ← M_r + (1 − frac)·M_tail`` for ``M = W·L`` (the tail is ``(I − U_r U_rᵀ) W·L``,
        so no inverse of L is needed); ``frac = 1`` would be svd-llm's truncation itself."""
        for names, lins, W, Ls, _n_all, _rows in self._present():
            if rank_for(W.shape[1], W.shape[2], self.keep_ratio) is None:
                continue
            Wf = W.float()
            Ur = self._top_left(Wf @ Ls)
            new = (Wf - frac * (Wf - project_onto(Ur, Wf))).to(W.dtype)
            for n, lin, w in zip(names, lins, new.unbind(0)):
                if self.weights is not None:
                    self.weights[n] = w
                else:
                    lin.weight.copy_(w)

    @torch.no_grad()
    def projections(self) -> dict:
        """``{name: U_r}`` for the held layers that the compression at ``keep_ratio`` truncates, as
        :meth:`truncated` uses them: the top-r left singular vectors of their ``W·L`` (fp32).

        Without tracking (``self.track`` False), computed now by fp64 SVDs. With tracking, the first
        call computes them so; afterwards each :meth:`advance` (after a step's backward pass) moves
        them by one block-power step on ``W·C·Wᵀ`` from where they were, so this returns the tracked
        subspaces: a few products per layer and step instead of an SVD. How far they lag the exact
        ones is measured by :meth:`tracking_lag`."""
        out = {}
        for names, _lins, W, Ls, _n_all, _rows in self._present():
            truncated = [(n, r) for n, r in zip(names, self._ranks_of(names, W)) if r is not None]
            if not truncated:
                continue
            if self.track and all(n in self._tracked for n, _r in truncated):
                out.update((n, self._tracked[n]) for n, _r in truncated)
                continue
            U = self._top_left(W.float() @ Ls, max(r for _n, r in truncated))
            at = {n: i for i, n in enumerate(names)}
            for n, r in truncated:
                out[n] = U[at[n], :, :r].contiguous()
            if self.track:
                self._tracked.update((n, out[n]) for n, _r in truncated)
        return out

    def _group_covariances(self, gi: int) -> torch.Tensor:
        if gi not in self._covs:
            Ls = self._groups[gi][2]
            self._covs[gi] = Ls @ Ls.mT
        return self._covs[gi]

    @torch.no_grad()
    def advance(self) -> None:
        """One block-power step of every tracked subspace, from the ``B = U_rᵀW`` its layer's last
        forward under :meth:`truncated` computed (W unchanged since: call it before the optimizer
        step): ``U_r ← orth(W·C·Bᵀ) = orth(M·Mᵀ·U_r)``, ``C = L·Lᵀ``, batched per shape
        (:func:`subspace_iteration`). Layers whose forward did not run keep their subspace."""
        for gi, (group, lins, _Ls, _n_all, _rows) in enumerate(self._groups):
            by_rank: dict = {}  # one batch per rank (a shape's layers differ in rank under given ranks)
            for i, n in enumerate(group):
                if n in self._last_b:
                    by_rank.setdefault(self._last_b[n].shape[0], []).append(i)
            for idx in by_rank.values():
                W = torch.stack([lins[i].weight.detach() for i in idx]).float()
                C = self._group_covariances(gi)
                C = C if len(idx) == len(group) else C[idx]
                B = torch.stack([self._last_b.pop(group[i]) for i in idx])
                for n, u in zip((group[i] for i in idx), subspace_iteration(W, C, B).unbind(0)):
                    self._tracked[n] = u
        self._last_b.clear()

    def skip_advance(self) -> None:
        """A step without a block-power step: the subspaces stay; the forward's products are dropped."""
        self._last_b.clear()

    @torch.no_grad()
    def tracking_lag(self) -> dict:
        """How far the tracked subspaces are from the exact ones now, per tracked held layer:
        ``{name: (sin θ_max, excess)}``: the sine of the largest principal angle between the tracked
        U_r and the top-r left singular vectors of ``W·L`` (fp64 SVD), and the relative excess of the
        truncation's error, ``‖(I − U Uᵀ)M‖_F² / Σ_{i>r} σᵢ² − 1`` (0: the tracked truncation is as
        good as the exact one; sin θ can be large where σ_r ≈ σ_{r+1} while the excess stays ~0)."""
        out = {}
        for names, _lins, W, Ls, _n_all, _rows in self._present():
            for n, w, L in zip(names, W.detach().unbind(0), Ls):
                if n not in self._tracked:
                    continue
                U = self._tracked[n].double()
                r = U.shape[1]
                M = w.double() @ L.double()
                Ue, S, _ = torch.linalg.svd(M, full_matrices=False)
                sin = torch.linalg.matrix_norm(U - Ue[:, :r] @ (Ue[:, :r].mT @ U), ord=2)
                tail_exact = S[r:].square().sum()
                tail = M.square().sum() - (U.mT @ M).square().sum()
                excess = (tail / tail_exact - 1) if tail_exact > 0 else tail.new_zeros(())
                out[n] = (float(sin), float(excess))
        return out

    def spectra(self) -> dict:
        """``{name: singular values of W·L}`` now (fp64 SVD, on the CPU) of the held layers."""
        res = {}
        for names, _lins, W, Ls, _n_all, _rows in self._present():
            for n, w, L in zip(names, W.detach().unbind(0), Ls):
                res[n] = torch.linalg.svdvals(w.to(torch.float64) @ L.to(torch.float64)).cpu()
        return res


def truncation_rank(name: str, shape, keep_ratio, ranks: dict | None):
    """The rank the "compressed" surrogate truncates layer ``name`` (weight ``shape``) to: its given
    rank (None: stays dense) where ``ranks`` are given, else the uniform rank of ``keep_ratio``."""
    return ranks.get(name) if ranks is not None else rank_for(shape[0], shape[1], keep_ratio)


def project_onto(Ur: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``U_r U_rᵀ X`` (in U_r's dtype): the rows of X projected on the span of U_r's columns. svd-llm's
    compressed weight is this of W; the gradient through it (U_r fixed) is this of the gradient."""
    return Ur @ (Ur.mT @ X.to(Ur.dtype))


def _projected_linear(lin: nn.Linear, Ur: torch.Tensor, name: str, store, x: torch.Tensor) -> torch.Tensor:
    """``x (U_r U_rᵀ W)ᵀ + b``. Without a ``store``: the projected weight, as before tracking. With
    one (tracking on): as the two factors ``B = U_rᵀW`` and ``U_r`` (4·m·n·r fewer flops per step to
    form, and ``r·(m + n)`` instead of ``m·n`` multiply-adds per token), B kept in ``store[name]``
    for :meth:`WhitenedTargets.advance`."""
    W = lin.weight
    if store is None:
        return F.linear(x, project_onto(Ur, W).to(W.dtype), lin.bias)
    B = Ur.mT @ W.to(Ur.dtype)
    store[name] = B.detach()
    return F.linear(F.linear(x, B.to(W.dtype)), Ur.to(W.dtype), lin.bias)


def subspace_iteration(W: torch.Tensor, C: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """One block-power step toward the top-r left singular subspace of ``M = W·L`` (``C = L·Lᵀ``)
    from the span of U, given ``B = Uᵀ·W``: the orthonormal Q of ``W·(C·Bᵀ) = M·Mᵀ·U`` (thin QR).
    Batched: W [k, m, n], C [k, n, n], B [k, r, n] -> [k, m, r]. Costs 2·n²·r + 2·m·n·r multiply-adds
    per matrix (the B the forward already computed saves the first product), three batched GEMMs and
    a QR: cuBLAS/cuSOLVER through torch on a GPU, nothing a custom kernel would do better.

    The subspace after one step from an exact start, for a matrix that changed by ΔM, is off by about
    ``(σ_{r+1}/σ_r)²`` times the previous lag plus the ΔM-induced rotation ``‖ΔM‖/(σ_r − σ_{r+1})``
    (Davis–Kahan); an optimizer step is small, so the lag stays small where the gap is not
    (measured by :meth:`WhitenedTargets.tracking_lag`)."""
    return torch.linalg.qr(W @ (C @ B.mT)).Q


def stable_rank_of(spectrum: torch.Tensor) -> float:
    """‖M‖_F²/σ₁² from the singular values (0 for a zero matrix)."""
    return float(spectrum.square().sum() / spectrum[0].square()) if spectrum[0] > 0 else 0.0
