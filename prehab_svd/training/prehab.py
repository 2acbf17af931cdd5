"""Low-Rank Prehab: fine-tune a dense model toward low rank before compressing it.

``prehab(model, calibration, data)``:

1. runs the calibration batches once through the model and accumulates each targeted layer's input
   covariance ``xᵀx/N`` (layers fed the same tensor share one), and takes its whitening factor ``L``
   (fp64 Cholesky, or the eigen pseudo-factor of a singular covariance, zero-padded to square);
2. fine-tunes on ``task(model, batch) + λ_t · mean_ℓ R(W_ℓ L_ℓ)`` over the ``data`` batches, where R is
   the stable rank ``‖M‖_F²/σ₁²`` (default) or the nuclear surrogate ``‖M‖_*²/‖M‖_F²``, computed by the
   batched op :func:`prehab_svd.ops.stable_rank_loss` on the stack of each weight shape, with the power
   iteration warm-started from the previous step's singular vectors; λ_t rises exponentially from
   ``lam_start`` to ``lam`` over ``warmup_steps``, then stays at ``lam``. Or, with
   ``surrogate="tail"`` and the planned ``keep_ratio``, fine-tunes on the task loss alone and after
   every step shrinks each layer's whitened tail beyond rank r (the part svd-llm will cut) by the
   proximal step of that penalty; its plain gradient hardly moves the tail, which lives in the
   inputs' low-variance directions where the gradient in W is scaled down by the whitening. Or, with
   ``surrogate="compressed"``, fine-tunes on ``task(model) + λ_t·task(model compressed by svd-llm at
   keep_ratio)``, the compressed weights ``U_r U_rᵀ W`` recomputed from W·L at every step;
3. logs per step the task loss, the surrogate, and the mean stable rank of the whitened weights.

The whitening factors stay fixed during training (the compression that follows re-measures the
covariances of the fine-tuned model). Then compress with a whitening method (``svd-llm``, ``aa-svd``,
``zs-svd``), optionally followed by :func:`prehab_svd.rehab`.

Under an initialized ``torch.distributed`` process group, every rank calls ``prehab`` with its shard of
the batches: the covariances are summed over the ranks, training is data-parallel (DDP, or FSDP2 with
the parameters sharded: :mod:`prehab_svd.fsdp`) and each rank computes the regularizer of its own
layers only (:mod:`prehab_svd.distributed`).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as _dist
from .. import fsdp as _fsdp
from .. import ops
from ..calibration import as_batch, check_finite, select_tokens, token_mask
from ..errors import PrehabError
from ..linalg import whitening_factor
from ..models import plan_targets, rank_for
from ..tasks import default_task, is_causal_model, step_range

__all__ = ["prehab", "PrehabReport", "PrehabStep", "layer_input_grams", "WhitenedTargets",
           "lambda_schedule", "stable_rank_of"]


@dataclass
class PrehabStep:
    step: int
    task_loss: float
    surrogate: float  # mean over layers of the surrogate (stable, nuclear, tail); "compressed": its task loss
    stable_rank: float  # mean stable rank of the whitened weights W·L
    lam: float
    loss: float


@dataclass
class PrehabReport:
    surrogate: str
    steps: list = field(default_factory=list)
    layers: list = field(default_factory=list)  # names, in the order of the rank lists
    stable_rank_before: list = field(default_factory=list)  # per layer, whitened
    stable_rank_after: list = field(default_factory=list)
    calibration_tokens: int = 0
    seconds: float = 0.0
    # per layer singular values of W·L (tensors; not in to_dict): for plots
    spectra_before: list = field(default_factory=list, repr=False)
    spectra_after: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("spectra_before", "spectra_after")}
        d["steps"] = [asdict(s) if not isinstance(s, dict) else s for s in self.steps]
        return d

    @property
    def mean_stable_rank_before(self) -> float:
        return sum(self.stable_rank_before) / max(len(self.stable_rank_before), 1)

    @property
    def mean_stable_rank_after(self) -> float:
        return sum(self.stable_rank_after) / max(len(self.stable_rank_after), 1)

    def summary(self) -> str:
        first, last = (self.steps[0], self.steps[-1]) if self.steps else (None, None)
        lines = [f"prehab ({self.surrogate} surrogate): {len(self.steps)} steps, "
                 f"{len(self.layers)} layers, {self.calibration_tokens:,} calibration tokens, "
                 f"{self.seconds:.1f} s",
                 f"mean whitened stable rank {self.mean_stable_rank_before:.2f} -> "
                 f"{self.mean_stable_rank_after:.2f}"]
        if first is not None:
            lines.append(f"task loss {first.task_loss:.4f} (step 1) -> {last.task_loss:.4f} "
                         f"(step {last.step})")
        return "\n".join(lines)


SURROGATES = ("stable", "nuclear", "tail", "compressed")


def lambda_schedule(step: int, lam: float, lam_start: float, warmup_steps: int) -> float:
    """λ at 0-based ``step``: exponential from lam_start to lam over warmup_steps, then lam."""
    if warmup_steps <= 0 or step >= warmup_steps or lam <= 0:
        return lam
    start = min(lam_start, lam)
    return start * (lam / start) ** (step / warmup_steps)


# --------------------------------------------------------------------------------------------------
# Calibration covariances of the targeted layers' inputs


def layer_input_grams(model: nn.Module, names: list, batches: list, *, dtype=torch.float32):
    """``{layer name: (gram [in, in] float64, tokens)}`` of each named linear layer's input.

    One forward pass per batch with hooks; layers that receive the very same input tensor in a forward
    share one accumulator (q/k/v, gate/up). Padded positions (attention_mask 0) are excluded.
    Distributed, each rank passes its shard of the batches and gets the grams of all of them.
    """
    modules = {n: model.get_submodule(n) for n in names}
    accs: dict = {}  # group key (first layer's name) -> CovarianceAccumulator
    group_of: dict = {}  # layer name -> group key
    seen: list = []  # this forward: (input tensor, group key)
    current = {}

    def make_hook(name):
        def hook(_m, args):
            x = args[0]
            for t, key in seen:
                if t is x:
                    group_of.setdefault(name, key)
                    return
            key = group_of.setdefault(name, name)
            seen.append((x, key))
            check_finite(name, x)
            if key not in accs:
                accs[key] = ops.CovarianceAccumulator(x.shape[-1], dtype=dtype, device=x.device)
            accs[key].update(select_tokens(x.detach(), current["mask"]))
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                current["mask"] = token_mask(batch)
                model(**batch)
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in group_of]
    if missing:
        raise PrehabError(f"target layers never ran on the calibration data: {missing}")
    if _dist.is_distributed():  # each rank saw its shard: sum the raw sums and the token counts
        keys = sorted(accs)
        for key in keys:
            accs[key].tokens = _dist.all_reduce_count(
                accs[key].tokens, same=[len(keys), accs[key].d], what="the targeted layers' inputs")
        _dist.all_reduce_sum(*(accs[key].gram(normalize=False) for key in keys))
    grams = {key: acc.gram().to(torch.float64) for key, acc in accs.items()}
    return {n: (grams[group_of[n]], accs[group_of[n]].tokens) for n in names}


def _square_factor(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """A square [d, d] factor F with gram = F Fᵀ: the Cholesky factor, or the eigen pseudo-factor
    zero-padded (extra zero columns leave the singular values of W F unchanged)."""
    f = whitening_factor(gram, damping)
    if f.kind == "cholesky":
        return f.R
    d, k = f.R.shape
    return torch.cat([f.R, f.R.new_zeros(d, d - k)], dim=1) if k < d else f.R


STATS_MEMORY_FRACTION = 0.25  # of the device's free memory, for one pass's calibration statistics


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (CUDA: ``mem_get_info``; CPU: MemAvailable of /proc/meminfo), or
    None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _stats_blocks_that_fit(model, plan, device: torch.device) -> int:
    """How many blocks' calibration statistics to accumulate per pass: as many as fit in
    ``STATS_MEMORY_FRACTION`` of the free memory, counting 20 bytes (the float64 sum, the fp32 scratch
    of one batch's product, and the fp64 Gram) per entry of each targeted layer's ``in × in``
    covariance (an upper bound: layers fed the same input share one); at least 1, all of them when the
    free memory is unknown."""
    n = len(plan.stages)
    free = _free_memory(device)
    if free is None or n <= 1:
        return n
    per_block = max(sum(20 * model.get_submodule(name).weight.shape[1] ** 2 for name in st[2])
                    for st in plan.stages)
    return max(1, min(n, int(free * STATS_MEMORY_FRACTION // max(per_block, 1))))


def _whitening_factors(model, plan, calib: list, wanted: set, damping: float, blocks_per_pass: int):
    """``({name: square whitening factor}, calibration tokens)`` for the ``wanted`` targets.

    The input covariances are accumulated over the calibration batches ``blocks_per_pass`` blocks
    at a time (one forward pass over the batches per group of blocks): only those blocks' statistics
    exist at once (every rank accumulates every layer's, on its shard, before the all-reduce), and
    each pass's Grams are dropped once the wanted factors are taken from them."""
    stages = [list(st[2]) for st in plan.stages]
    factors, tokens = {}, 0
    for i in range(0, len(stages), blocks_per_pass):
        part = [n for st in stages[i:i + blocks_per_pass] for n in st]
        grams = layer_input_grams(model, part, calib)
        tokens = next(iter(grams.values()))[1]
        for n in part:
            if n in wanted:
                factors[n] = _square_factor(grams[n][0], damping)
        del grams
    return factors, tokens


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
                 owned=None, keep_ratio: float | None = None):
        keep = set(names if owned is None else owned)
        self.names = [n for n in names if n in keep]
        self.backend = backend
        self.keep_ratio = keep_ratio
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

    def _top_left(self, M: torch.Tensor) -> torch.Tensor:
        """The top-r left singular vectors [B, m, r] of the stack M (fp64 SVD), r from keep_ratio."""
        r = rank_for(M.shape[1], M.shape[2], self.keep_ratio)
        return torch.linalg.svd(M.detach().double(), full_matrices=False).U[..., :r].to(M.dtype)

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
        tail = M - _project(Ur, M)
        return tail.square().sum((-2, -1)) / M.square().sum((-2, -1)).clamp_min(1e-30)

    @contextmanager
    def truncated(self):
        """Within the block, every held layer computes with ``U_r U_rᵀ W`` instead of ``W``: svd-llm's
        rank-r compression of it (``(W·L)_r L⁻¹``, the truncation of the whitened weight mapped
        back), with U_r (the top-r left singular vectors of ``W·L``) fixed at entry. Gradients reach W
        through the projection (U_r held constant). Layers that stay dense at ``keep_ratio`` are
        left as they are."""
        lin_of = {n: lin for group, lins, *_rest in self._groups for n, lin in zip(group, lins)}
        patched = [(lin_of[n], Ur) for n, Ur in self.projections().items()]
        try:
            for lin, Ur in patched:
                lin.forward = functools.partial(_projected_linear, lin, Ur)
            yield
        finally:
            for lin, _Ur in patched:
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
            new = (Wf - frac * (Wf - _project(Ur, Wf))).to(W.dtype)
            for n, lin, w in zip(names, lins, new.unbind(0)):
                if self.weights is not None:
                    self.weights[n] = w
                else:
                    lin.weight.copy_(w)

    @torch.no_grad()
    def projections(self) -> dict:
        """``{name: U_r}`` for the held layers that the compression at ``keep_ratio`` truncates: the
        top-r left singular vectors of their ``W·L`` now (fp32), as :meth:`truncated` uses them."""
        out = {}
        for names, _lins, W, Ls, _n_all, _rows in self._present():
            if rank_for(W.shape[1], W.shape[2], self.keep_ratio) is None:
                continue
            out.update(zip(names, self._top_left(W.float() @ Ls).unbind(0)))
        return out

    def spectra(self) -> dict:
        """``{name: singular values of W·L}`` now (fp64 SVD, on the CPU) of the held layers."""
        res = {}
        for names, _lins, W, Ls, _n_all, _rows in self._present():
            for n, w, L in zip(names, W.detach().unbind(0), Ls):
                res[n] = torch.linalg.svdvals(w.to(torch.float64) @ L.to(torch.float64)).cpu()
        return res


def _project(Ur: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``U_r U_rᵀ X`` (in U_r's dtype): the rows of X projected on the span of U_r's columns. svd-llm's
    compressed weight is this of W; the gradient through it (U_r fixed) is this of the gradient."""
    return Ur @ (Ur.mT @ X.to(Ur.dtype))


def _projected_linear(lin: nn.Linear, Ur: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    W = lin.weight
    return F.linear(x, _project(Ur, W).to(W.dtype), lin.bias)


def _all_spectra(mine: dict, names: list) -> list:
    """Singular values of every layer's W·L, in the order of ``names``: ``mine`` has those this rank
    computed (:meth:`WhitenedTargets.spectra`), the others come from their owners."""
    merged = {}
    for part in _dist.all_gather_objects(mine):
        merged.update(part)
    return [merged[n] for n in names]


def stable_rank_of(spectrum: torch.Tensor) -> float:
    """‖M‖_F²/σ₁² from the singular values (0 for a zero matrix)."""
    return float(spectrum.square().sum() / spectrum[0].square()) if spectrum[0] > 0 else 0.0


# --------------------------------------------------------------------------------------------------


def _own_stable_rank_sum(targets_w, surrogate: str, reg_own: float) -> float:
    """The sum of the whitened stable ranks of this rank's layers (for the log): ``reg_own`` itself
    for the stable surrogate, else computed (0 for a rank without layers)."""
    if targets_w is None:
        return 0.0
    return reg_own if surrogate == "stable" else targets_w.values("stable", grad=False).sum().item()


def _fsdp_losses_and_grads(model, names, rounds, whole_weights, owner_of, targets_w, surrogate,
                           keep_ratio, task_of, batch, lam_t):
    """One Prehab step's forward and backward passes on an FSDP2-sharded model; leaves the whole
    step's gradient (task + λ·regularizer) in the parameters' gradient shards.

    The layers are visited in ``rounds`` (lists of names); ``whole_weights(round)`` puts the owned
    layers' whole weights of one round in ``targets_w.weights``. Returns (this rank's task loss, the
    sum of its own layers' surrogate values or, for "compressed", its compressed-model loss, the sum
    of its own layers' whitened stable ranks).

    * "stable"/"nuclear": FSDP reduce-scatters the task gradient; each owner differentiates
      ``λ/len(names)·Σ R`` of its layers with respect to their whole weights and scatters that
      gradient into the shards (added, not averaged: each layer's regularizer counts once).
    * "tail": the task gradient only (the proximal step follows the optimizer step).
    * "compressed": after the task backward, the projected layers' task gradients are set aside;
      each owner scatters its layers' projected weights ``U_r U_rᵀ W`` into the shards, the model
      runs forward and backward on ``λ·task``, the weights are restored, and each owner maps its
      layers' gradients back through the projection (``U_r U_rᵀ G``, U_r fixed: the chain rule of
      the single-process ``task(U_r U_rᵀ W)``) and scatters them; the task gradients are added
      back. The other parameters accumulate both backward passes' gradients as they are.
    """
    task_loss = task_of(model, batch)
    task_loss.float().backward()
    reg_own = sr_own = 0.0
    if surrogate != "compressed":
        for chunk in rounds:
            with whole_weights(chunk):
                grads = {}
                full = targets_w.weights if targets_w is not None else None
                if full:
                    if surrogate == "tail":
                        vals = targets_w.values("tail", grad=False)
                    else:
                        for w in full.values():
                            w.requires_grad_(True)
                        vals = targets_w.values(surrogate)
                        (vals.sum() * (lam_t / len(names))).backward()
                        grads = {n: w.grad for n, w in full.items()}
                    reg_own += vals.sum().item()
                    sr_own += _own_stable_rank_sum(targets_w, surrogate, vals.sum().item())
                if surrogate != "tail":
                    _fsdp.scatter_from_owners(model, chunk, owner_of, grads, into="grad", add=True)
        return task_loss, reg_own, sr_own

    projected = [n for n in names  # the same list on every rank: from the shapes alone
                 if rank_for(*model.get_submodule(n).weight.shape, keep_ratio) is not None]
    weights = {n: model.get_submodule(n).weight for n in projected}
    saved_w = _fsdp.local_copies(weights)
    saved_g = _fsdp.local_copies({n: p.grad for n, p in weights.items()})
    for p in weights.values():
        p.grad = None
    Urs = {}  # this rank's layers' projections, kept through the backward pass
    for chunk in rounds:
        with whole_weights(chunk):
            new = {}
            full = targets_w.weights if targets_w is not None else None
            if full:
                here = targets_w.projections()
                Urs.update(here)
                new = {n: _project(Ur, full[n]) for n, Ur in here.items()}
                sr_own += targets_w.values("stable", grad=False).sum().item()
            _fsdp.scatter_from_owners(model, [n for n in chunk if n in weights], owner_of, new,
                                      into="weight")
    try:
        c_loss = task_of(model, batch).float()
        (lam_t * c_loss).backward()
    finally:
        _fsdp.restore_local(weights, saved_w)
    for chunk in rounds:
        part = [n for n in chunk if n in weights]
        g = _fsdp.gather_to_owners(model, part, owner_of, of="grad")
        _fsdp.scatter_from_owners(model, part, owner_of, {n: _project(Urs[n], gn) for n, gn in g.items()},
                                  into="grad")
    with torch.no_grad():
        for n, p in weights.items():
            p.grad.to_local().add_(saved_g[n])
    return task_loss, c_loss.item(), sr_own


def _make_optimizer(optimizer, params, lr, weight_decay):
    if callable(optimizer):
        return optimizer(params)
    name = str(optimizer).lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise PrehabError(f"unknown optimizer {optimizer!r}; use 'adamw', 'adam', 'sgd' or a callable "
                      "params -> torch.optim.Optimizer")


def _check_positive_int(name, v, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise PrehabError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")


def prehab(
    model: nn.Module,
    calibration,
    data,
    *,
    steps: int = 100,
    lam: float = 10.0,
    lam_start: float = 1e-3,
    warmup_steps: int = 10,
    surrogate: str = "stable",
    keep_ratio: float | None = None,
    task=None,
    lr: float = 2e-5,
    optimizer="adamw",
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    targets=None,
    exclude=None,
    damping: float = 0.0,
    backend: str = "auto",
    parallel: str = "auto",
    stats_blocks: int | None = None,
    log_every: int = 0,
    callback=None,
    progress: bool = False,
) -> PrehabReport:
    """Fine-tune ``model`` in place on task loss + λ·(rank surrogate of its whitened target weights).

    Args:
        model: a Hugging Face model or any ``nn.Module`` (the targets are found as ``compress`` does).
        calibration: batches (dicts of model inputs or LongTensors of ids) for the input covariances.
        data: training batches, cycled for ``steps`` steps.
        steps: optimizer steps. lam: the surrogate's weight after warm-up; lam_start: its weight at
            step 1 (exponential warm-up over ``warmup_steps``).
        surrogate: "stable" (‖WL‖_F²/σ₁², power iteration warm-started), "nuclear"
            (‖WL‖_*²/‖WL‖_F², Newton–Schulz) or "tail" (Σ_{i>r}σᵢ²/‖WL‖_F², the fraction of the
            whitened energy that truncation to the rank of ``keep_ratio`` would drop: svd-llm's
            relative error of the layer; needs ``keep_ratio``). "tail" is not added to the loss:
            after each optimizer step on the task loss, its proximal step removes the fraction
            λ_t/(1+λ_t) of every layer's whitened tail (``W ← W − f·(I − U_r U_rᵀ) W``), so λ is a
            rate per step (0.01 removes about 63% of the tail over 100 steps), not a weight.
            "compressed": the task loss of the model as svd-llm would compress it at ``keep_ratio``
            (every W replaced by ``U_r U_rᵀ W``, U_r the top-r left singular vectors of W·L, held
            fixed within the step), so training minimizes ``task(dense) + λ·task(compressed)``: the
            dense model stays close to the original while the compressed one improves. Costs a
            second forward/backward and the SVD of every W·L per step. λ 1 is a good start.
        keep_ratio: the compression planned after Prehab (surrogate "tail" only).
        task: "auto" (cross-entropy for a causal LM, embedding distillation to the original model for
            an encoder), "causal_lm", "distill", "contrastive", or a callable loss(model, batch).
        lr, optimizer ("adamw", "adam", "sgd" or a callable params -> optimizer), weight_decay,
        grad_clip (max global grad norm; None: off).
        dtype: None (fp32) or torch.bfloat16/float16 to train under autocast.
        train_mode: run with dropout (model.train()); default False keeps the model in eval mode.
        damping: relative damping of the covariances before the whitening factor.
        parallel: under an initialized ``torch.distributed`` process group (call ``prehab`` on every
            rank, each with its shard of ``calibration`` and ``data``): ``"ddp"`` trains data-parallel
            with DistributedDataParallel, each rank computing the regularizer of its own layers
            (layer i on rank i % world); see :mod:`prehab_svd.distributed`. ``"fsdp"``: FSDP2, the
            parameters, gradients and optimizer state sharded over the ranks, for a model that does
            not fit one device; a model already sharded with ``fully_shard`` is used as it is, a
            whole one is sharded in place (each block, then the root) and stays sharded; the
            regularizer of layer i is still computed on rank i % world only (see
            :mod:`prehab_svd.fsdp`). ``"auto"`` (default): ``"fsdp"`` for a model whose parameters
            are DTensors, else ``"ddp"``. Without a process group, a whole model trains in this
            process whatever ``parallel`` says.
        stats_blocks: accumulate the calibration covariances of this many blocks per forward pass
            over the calibration batches, so that only their statistics exist at once (an LLM
            block's are hundreds of MB to GB in fp32/fp64; results are bitwise the same). None:
            as many blocks as fit in a quarter of the device's free memory (all of a small model,
            one pass), or one block per pass under FSDP (the model is sharded to save memory, so
            its statistics should not be whole either).
        log_every: print a log line every so many steps (0: never); callback(step: PrehabStep) is
            called after every step.

    Returns:
        a :class:`PrehabReport` with the per-step log and per-layer whitened stable ranks before and
        after.
    """
    t0 = time.perf_counter()
    _check_positive_int("steps", steps)
    _check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
    if surrogate not in SURROGATES:
        raise PrehabError(f"surrogate must be one of {', '.join(map(repr, SURROGATES))}, got {surrogate!r}")
    if surrogate in ("tail", "compressed"):
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) \
                or not 0 < keep_ratio < 1:
            raise PrehabError(f"surrogate={surrogate!r} needs keep_ratio, the fraction of parameters the "
                              f"compression after Prehab keeps, in (0, 1); got {keep_ratio!r}")
    elif keep_ratio is not None:
        raise PrehabError("keep_ratio is only used by surrogate='tail' or 'compressed' (got "
                          f"surrogate={surrogate!r})")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise PrehabError(f"lam must be a finite number >= 0, got {lam!r}")
    if not (isinstance(lam_start, (int, float)) and lam_start > 0):
        raise PrehabError(f"lam_start must be > 0, got {lam_start!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise PrehabError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if stats_blocks is not None:
        _check_positive_int("stats_blocks", stats_blocks)
    if parallel not in ("auto", "ddp", "fsdp"):
        raise PrehabError(f"parallel must be 'auto', 'ddp' or 'fsdp', got {parallel!r}")
    sharded = _fsdp.is_sharded(model)
    if sharded and parallel == "ddp":
        raise PrehabError("the model's parameters are DTensors (sharded with FSDP2's fully_shard): "
                          "use parallel='fsdp' (or 'auto'), or pass the model unsharded")
    # FSDP: a sharded model, or a whole one under a process group with parallel="fsdp"
    use_fsdp = sharded or (parallel == "fsdp" and _dist.is_distributed())
    device = next(model.parameters()).device
    calib = [as_batch(b, device) for b in calibration]
    train_batches = [as_batch(b, device) for b in data]
    _dist.raise_together(
        PrehabError("the calibration data is empty; pass at least one batch") if not calib else
        PrehabError("the training data is empty; pass at least one batch") if not train_batches else
        None, "prehab's input check")
    plan = plan_targets(model, targets, exclude)
    names = plan.targets
    if not names:
        raise PrehabError("no target layers found")

    was_training = model.training
    cfg = getattr(model, "config", None)
    old_cache = getattr(cfg, "use_cache", None)
    if cfg is not None and old_cache is not None:
        cfg.use_cache = False
    model.eval()
    try:
        # Distributed, each rank regularizes its own layers (i % world): factors, power-iteration
        # states and spectra of those only. Without a process group, it owns them all. DDP with
        # the compressed surrogate projects every layer on every rank: all the factors everywhere.
        world = _dist.world_size()
        own = [n for i, n in enumerate(names) if _dist.owns(i)]
        every_layer = surrogate == "compressed" and not use_fsdp and len(own) < len(names)
        blocks_per_pass = stats_blocks if stats_blocks is not None else (
            1 if use_fsdp else _stats_blocks_that_fit(model, plan, device))
        factors, tokens = _whitening_factors(model, plan, calib, set(names if every_layer else own),
                                             damping, blocks_per_pass)
        owner_of = {n: _dist.owner(i) for i, n in enumerate(names)}
        report = PrehabReport(surrogate=surrogate, layers=list(names), calibration_tokens=tokens)
        if sharded and not callable(task) and (task == "distill" or (
                task in (None, "auto") and not is_causal_model(model))):
            raise PrehabError(
                "the distillation task copies the model as its target, which FSDP2 cannot do for a "
                "model already sharded; pass the model unsharded with parallel='fsdp' (prehab copies "
                "it, then shards it), or pass task=prehab_svd.tasks.EmbeddingDistillation(reference) "
                "with a reference you sharded separately")
        loss_fn = default_task(model, task)  # before sharding: a distillation target copies the model
        if use_fsdp:
            if not sharded:
                _fsdp.shard(model, device)
            _fsdp.check_sharding(model, names)
        targets_w = (WhitenedTargets(model, names, {n: factors[n] for n in own}, backend=backend, owned=own,
                                     keep_ratio=keep_ratio) if own else None)

        # FSDP: the owners see their layers' whole weights a few at a time (each round gathers
        # fsdp.GATHER_LAYERS_PER_RANK layers per rank); otherwise every held layer at once
        rounds = _fsdp.rounds(names, world) if use_fsdp else [names]

        @contextmanager
        def whole_weights(chunk):
            """FSDP: the owned layers of ``chunk`` with their whole weights in ``targets_w.weights``."""
            if not use_fsdp:
                yield
                return
            full = _fsdp.gather_to_owners(model, chunk, owner_of)
            if targets_w is not None:
                targets_w.weights = full
            try:
                yield
            finally:
                if targets_w is not None:
                    targets_w.weights = None

        def all_spectra():
            mine = {}
            for chunk in rounds:
                with whole_weights(chunk):
                    if targets_w is not None:
                        mine.update(targets_w.spectra())
            return _all_spectra(mine, names)

        report.spectra_before = all_spectra()
        report.stable_rank_before = [stable_rank_of(sp) for sp in report.spectra_before]
        model.train(train_mode)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _make_optimizer(optimizer, params, lr, weight_decay)
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16)
                    else None)

        # "tail" is applied by its proximal step after each optimizer step, not through the loss:
        # its gradient in W is scaled by the whitening factor, so the whitened tail (which lives in
        # the inputs' low-variance directions) would hardly move (measured on MiniLM).
        penalised = surrogate != "tail"
        # "compressed": the regularizer is the task loss of the whole model as svd-llm would compress
        # it, so every rank needs every layer's projection (computed alike on each rank). Under FSDP
        # the owners project their layers and scatter the projected weights instead.
        project = None
        if surrogate == "compressed" and not use_fsdp:
            if targets_w is not None and len(own) == len(names):  # one process: the same stacks
                project = targets_w
            else:
                project = WhitenedTargets(model, names, factors, keep_ratio=keep_ratio)

        def task_of(m, batch):
            if autocast is not None:
                with autocast:
                    return loss_fn(m, batch)
            return loss_fn(m, batch)

        def losses(m, batch):
            """The task loss and this rank's surrogate values (one call, so DDP sees both)."""
            task_loss = task_of(m, batch)
            if project is not None:
                with project.truncated():
                    return task_loss, task_of(m, batch).float().reshape(1)
            vals = targets_w.values(surrogate, grad=penalised) if targets_w is not None else None
            return task_loss, vals

        def global_log(step, task_loss, reg_own, sr_own, per_layer):
            """(task, surrogate, stable rank, loss) as the means over the global batch and all the
            layers, from this rank's task loss and sums over its own layers (per_layer False: its
            compressed-model loss); raise on every rank if the task loss is not finite."""
            task_sum, reg_sum, sr_sum = _dist.all_reduce_floats([task_loss.item(), reg_own, sr_own])
            task_g = task_sum / world
            if not math.isfinite(task_g):  # the same verdict on every rank
                raise PrehabError(f"the task loss is {task_g} (mean over the ranks) at step "
                                  f"{step + 1}; lower the learning rate or train in float32")
            mean_reg = reg_sum / (len(names) if per_layer else world)
            return task_g, mean_reg, sr_sum / len(names), task_g + lam_t * mean_reg

        step_fn = None if use_fsdp else _dist.data_parallel(_dist.LossModule(model, losses), device)
        stream = itertools.cycle(train_batches)
        for step in step_range(steps, progress, "prehab"):
            batch = next(stream)
            lam_t = lambda_schedule(step, float(lam), float(lam_start), warmup_steps)
            opt.zero_grad(set_to_none=True)
            if use_fsdp:  # the backward passes happen inside: gradients are ready
                task_loss, reg_own, sr_own = _fsdp_losses_and_grads(
                    model, names, rounds, whole_weights, owner_of, targets_w, surrogate, keep_ratio,
                    task_of, batch, lam_t)
                logged = global_log(step, task_loss, reg_own, sr_own, surrogate != "compressed")
                loss = None
            elif world == 1:
                task_loss, vals = step_fn(batch)
                if not torch.isfinite(task_loss):
                    raise PrehabError(f"the task loss is {task_loss.item()} at step {step + 1}; lower "
                                      "the learning rate or train in float32")
                reg = vals.mean()
                # the logged stable rank is the one of the weights this step starts from
                sr = (vals if surrogate == "stable" else targets_w.values("stable", grad=False)).mean().item()
                loss = task_loss.float() + lam_t * reg
                logged = (task_loss.item(), reg.item(), sr, loss.item())
            else:
                # DDP averages the gradients over the ranks: the own-layer regularizer times the world
                # size gives each layer's regularizer gradient once, as in the single-process mean.
                # ("compressed" is a task loss of this rank's batch: averaged by DDP like the task.)
                task_loss, vals = step_fn(batch)
                per_layer = project is None
                reg = (vals.sum() * (world / len(names) if per_layer else 1.0) if vals is not None
                       else task_loss.new_zeros(()))
                reg_own = vals.sum().item() if vals is not None else 0.0
                sr_own = _own_stable_rank_sum(targets_w, surrogate, reg_own)
                loss = task_loss.float() + lam_t * reg
                logged = global_log(step, task_loss, reg_own, sr_own, per_layer)
            if loss is not None:
                loss.backward()
            if grad_clip is not None:  # after DDP's averaging (FSDP's reduce-scatter): the same on every rank
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if not penalised:
                frac = lam_t / (1.0 + lam_t)
                if use_fsdp:  # the owners shrink their layers' whole weights and scatter the shards
                    for chunk in rounds:
                        with whole_weights(chunk):
                            if targets_w is not None:
                                targets_w.shrink_tail(frac)
                            _fsdp.scatter_from_owners(model, chunk, owner_of,
                                                      targets_w.weights if targets_w is not None else {},
                                                      into="weight")
                else:
                    if targets_w is not None:
                        targets_w.shrink_tail(frac)
                    _dist.broadcast_from_owners([(owner_of[n], [model.get_submodule(n).weight.data])
                                                 for n in names])
            rec = PrehabStep(step=step + 1, task_loss=logged[0], surrogate=logged[1],
                             stable_rank=logged[2], lam=lam_t, loss=logged[3])
            report.steps.append(rec)
            if callback is not None:
                callback(rec)
            if log_every and (step + 1) % log_every == 0:
                print(f"prehab step {rec.step}/{steps}: task {rec.task_loss:.4f}  "
                      f"{surrogate} {rec.surrogate:.3f}  stable rank {rec.stable_rank:.3f}  λ {lam_t:.3g}")
        del step_fn  # DDP's gradient hooks go with it
        report.spectra_after = all_spectra()
        report.stable_rank_after = [stable_rank_of(sp) for sp in report.spectra_after]
    finally:
        model.train(was_training)
        if cfg is not None and old_cache is not None:
            cfg.use_cache = old_cache
    report.seconds = time.perf_counter() - t0
    return report
