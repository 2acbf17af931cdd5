"""Prehab's step runners: one per parallel mode, each running a step's forward and backward passes.

* :class:`LocalRunner`: one process (or a process group of one);
* :class:`DDPRunner`: data-parallel with DistributedDataParallel, every rank holding the whole model
  and computing the regularizer of its own layers (layer i on rank i % world;
  :mod:`prehab_svd.distributed`);
* :class:`FSDPRunner`: the parameters sharded with FSDP2; the owners gather their layers' whole
  weights a few at a time (:mod:`prehab_svd.fsdp`).

:func:`prehab_svd.prehab` drives them alike::

    runner = Runner(model, names, targets, owner_of, surrogate)
    runner.spectra()                        # every layer's singular values of W·L, on every rank
    runner.start(task, device, factors, keep_ratio, ranks)
    for each step:
        logged = runner.step(step, batch, lam)    # (task, surrogate, stable rank, loss); gradients ready
        optimizer step
        runner.update_weights(fn)           # "tail": its proximal step on the owners, then synced
    runner.stop()

``targets`` is this rank's :class:`~prehab_svd.training.targets.WhitenedTargets` (None for a rank
without layers), ``owner_of`` maps each layer name to the rank that regularizes it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .. import distributed as _dist
from .. import fsdp as _fsdp
from ..errors import PrehabError
from .targets import WhitenedTargets, project_onto, truncation_rank

__all__ = ["StepRunner", "LocalRunner", "DDPRunner", "FSDPRunner", "runner_for"]


def _all_spectra(mine: dict, names: list) -> list:
    """Singular values of every layer's W·L, in the order of ``names``: ``mine`` has those this rank
    computed (:meth:`WhitenedTargets.spectra`), the others come from their owners."""
    merged = {}
    for part in _dist.all_gather_objects(mine):
        merged.update(part)
    return [merged[n] for n in names]


class StepRunner:
    """What every mode shares: the layers, this rank's targets, the owners, the surrogate; the
    layers are visited in :attr:`rounds`, each with its owned layers' whole weights
    (:meth:`whole_weights`; the layers' own weights but under FSDP)."""

    def __init__(self, model, names: list, targets: WhitenedTargets | None, owner_of: dict, surrogate):
        self.model = model
        self.names = names
        self.targets = targets
        self.owner_of = owner_of
        self.surrogate = surrogate
        self.world = _dist.world_size()
        self.rounds = [names]
        self.task = None
        self.ranks = None

    @staticmethod
    def layers_to_whiten(names: list, own: list, surrogate) -> list:
        """The layers whose whitening factors this rank needs: its own."""
        return own

    @contextmanager
    def whole_weights(self, chunk):
        """The owned layers of ``chunk`` with their whole weights reachable through ``self.targets``."""
        yield

    def spectra(self) -> list:
        """Every layer's singular values of ``W·L`` (fp64, CPU), in the order of ``names``, on every rank."""
        mine = {}
        for chunk in self.rounds:
            with self.whole_weights(chunk):
                if self.targets is not None:
                    mine.update(self.targets.spectra())
        return _all_spectra(mine, self.names)

    def start(self, task, device: torch.device, factors: dict, keep_ratio, ranks: dict | None = None) -> None:
        """Before the first step: ``task(model, batch)`` is the task loss (under autocast if any);
        "compressed" truncates each layer to ``ranks[name]`` (None: stays dense) where ranks are
        given, else to the uniform rank of ``keep_ratio``."""
        self.task = task
        self.ranks = ranks

    def step(self, step: int, batch: dict, lam: float) -> tuple:
        """One step's forward and backward passes (the gradients are then ready for the optimizer);
        returns (task loss, surrogate, mean whitened stable rank, loss) as logged: the means over the
        global batch and all the layers. Raises :class:`PrehabError` if the task loss is not finite."""
        raise NotImplementedError

    def update_weights(self, fn) -> None:
        """``fn(targets)`` changes the held layers' whole weights on their owners; every rank then has
        the result."""
        raise NotImplementedError

    def stop(self) -> None:
        """After the last step."""

    def tracking_lag(self) -> dict:
        """``{layer: (sin θ_max, excess)}`` of the tracked truncation now (see
        :meth:`WhitenedTargets.tracking_lag`); empty where nothing is tracked."""
        return {}

    def _global_log(self, step: int, task_loss, reg_own: float, sr_own: float, per_layer: bool,
                    lam: float) -> tuple:
        """(task, surrogate, stable rank, loss) as the means over the global batch and all the
        layers, from this rank's task loss and sums over its own layers (per_layer False: its
        compressed-model loss); raise on every rank if the task loss is not finite."""
        task_sum, reg_sum, sr_sum = _dist.all_reduce_floats([task_loss.item(), reg_own, sr_own])
        task_g = task_sum / self.world
        if not math.isfinite(task_g):  # the same verdict on every rank
            raise PrehabError(f"the task loss is {task_g} (mean over the ranks) at step "
                              f"{step + 1}; lower the learning rate or train in float32")
        mean_reg = reg_sum / (len(self.names) if per_layer else self.world)
        sr = None if math.isnan(sr_sum) else sr_sum / len(self.names)
        return task_g, mean_reg, sr, task_g + lam * mean_reg


class _DataParallel(StepRunner):
    """Every rank holds the whole model: the loss (task and this rank's regularizer) is one module
    call, wrapped by :func:`prehab_svd.distributed.data_parallel` (DDP under a process group, the
    module itself without one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.projected = None  # "compressed": the WhitenedTargets whose truncation gives the model's
        self.step_fn = None

    @staticmethod
    def layers_to_whiten(names: list, own: list, surrogate) -> list:
        """Its own layers' factors; every layer's for "compressed" (each rank projects every layer)."""
        return names if not surrogate.per_layer and len(own) < len(names) else own

    def start(self, task, device, factors, keep_ratio, ranks=None) -> None:
        super().start(task, device, factors, keep_ratio, ranks)
        # "compressed": the regularizer is the task loss of the whole model as svd-llm would compress
        # it, so every rank needs every layer's projection (computed alike on each rank)
        if not self.surrogate.per_layer:
            if self.targets is not None and len(self.targets.names) == len(self.names):
                self.projected = self.targets  # one process: the same stacks
            else:
                self.projected = WhitenedTargets(self.model, self.names, factors, keep_ratio=keep_ratio,
                                                 ranks=ranks)
            self.projected.track = self.surrogate.track
        # DDP's construction broadcasts rank 0's parameters and buffers
        self.step_fn = _dist.data_parallel(_dist.LossModule(self.model, self._losses), device)

    def _losses(self, model, batch):
        """The task loss and this rank's surrogate values (one call, so DDP sees both); "compressed":
        each on its part of the batch (:meth:`CompressedTask.batches`)."""
        if self.projected is not None:
            dense, compressed = self.surrogate.batches(batch)
            return self.task(model, dense), self.surrogate.loss(self.projected, self.task, model, compressed)
        task_loss = self.task(model, batch)
        vals = self.surrogate.values(self.targets) if self.targets is not None else None
        return task_loss, vals

    def update_weights(self, fn) -> None:
        if self.targets is not None:
            fn(self.targets)
        _dist.broadcast_from_owners([(self.owner_of[n], [self.model.get_submodule(n).weight.data])
                                     for n in self.names])

    def _after_backward(self, step: int) -> None:
        """Tracked truncation: one block-power step of every subspace every ``track_every`` steps,
        before the weights change."""
        if self.projected is not None and self.projected.track:
            if (step + 1) % self.surrogate.track_every == 0:
                self.projected.advance()
            else:
                self.projected.skip_advance()

    def tracking_lag(self) -> dict:
        return self.projected.tracking_lag() if self.projected is not None and self.projected.track else {}

    def stop(self) -> None:
        self.step_fn = None  # DDP's gradient hooks go with it


class LocalRunner(_DataParallel):
    """One process holds every layer: the surrogate is the mean of all the layers' values."""

    def step(self, step, batch, lam):
        task_loss, vals = self.step_fn(batch)
        if not torch.isfinite(task_loss):
            raise PrehabError(f"the task loss is {task_loss.item()} at step {step + 1}; lower "
                              "the learning rate or train in float32")
        reg = vals.mean()
        # the logged stable rank is the one of the weights this step starts from
        srs = self.surrogate.stable_ranks(self.targets, vals, step)
        loss = task_loss.float() + lam * reg
        logged = (task_loss.item(), reg.item(), None if srs is None else srs.mean().item(), loss.item())
        loss.backward()
        self._after_backward(step)
        return logged


class DDPRunner(_DataParallel):
    """DDP averages the gradients over the ranks: the own-layer regularizer times the world size gives
    each layer's regularizer gradient once, as in the single-process mean. ("compressed" is a task
    loss of this rank's batch: averaged by DDP like the task.)"""

    def step(self, step, batch, lam):
        task_loss, vals = self.step_fn(batch)
        per_layer = self.surrogate.per_layer
        reg = (vals.sum() * (self.world / len(self.names) if per_layer else 1.0) if vals is not None
               else task_loss.new_zeros(()))
        reg_own = vals.sum().item() if vals is not None else 0.0
        srs = self.surrogate.stable_ranks(self.targets, vals, step) if self.targets is not None else None
        # the same step skips the log's stable rank on every rank (it depends on the step only)
        logs = self.surrogate.logs_stable_rank(step)
        sr_own = srs.sum().item() if srs is not None else (0.0 if logs else math.nan)
        loss = task_loss.float() + lam * reg
        logged = self._global_log(step, task_loss, reg_own, sr_own, per_layer, lam)
        loss.backward()
        self._after_backward(step)
        return logged


class FSDPRunner(StepRunner):
    """FSDP2: the owners see their layers' whole weights a few at a time (each round gathers
    :data:`prehab_svd.fsdp.GATHER_LAYERS_PER_RANK` layers per rank); the regularizer's gradient, the
    tail's proximal step and the projected weights are scattered back into the shards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds = _fsdp.rounds(self.names, self.world)
        self.keep_ratio = None

    @contextmanager
    def whole_weights(self, chunk):
        """The owned layers of ``chunk`` with their whole weights in ``targets.weights``."""
        full = _fsdp.gather_to_owners(self.model, chunk, self.owner_of)
        if self.targets is not None:
            self.targets.weights = full
        try:
            yield
        finally:
            if self.targets is not None:
                self.targets.weights = None

    def start(self, task, device, factors, keep_ratio, ranks=None) -> None:
        super().start(task, device, factors, keep_ratio, ranks)
        self.keep_ratio = keep_ratio

    def step(self, step, batch, lam):
        """The backward passes happen inside: gradients are ready.

        The task loss's forward and backward first (FSDP reduce-scatters its gradient); then, per
        surrogate, :meth:`_per_layer_grads` or :meth:`_compressed_grads` adds λ·regularizer's."""
        task_loss = self.task(self.model, batch)
        task_loss.float().backward()
        if self.surrogate.per_layer:
            reg_own, sr_own = self._per_layer_grads(lam)
        else:
            reg_own, sr_own = self._compressed_grads(batch, lam, step)
        return self._global_log(step, task_loss, reg_own, sr_own, self.surrogate.per_layer, lam)

    def _per_layer_grads(self, lam):
        """The per-layer surrogates. "stable"/"nuclear": each owner differentiates
        ``λ/len(names)·Σ R`` of its layers with respect to their whole weights and scatters that
        gradient into the shards (added, not averaged: each layer's regularizer counts once).
        "tail": the values only (the proximal step follows the optimizer step). Returns the sums over
        this rank's layers of the surrogate and of the whitened stable rank."""
        targets, surrogate = self.targets, self.surrogate
        reg_own = sr_own = 0.0
        for chunk in self.rounds:
            with self.whole_weights(chunk):
                grads = {}
                full = targets.weights if targets is not None else None
                if full:
                    if surrogate.in_loss:
                        for w in full.values():
                            w.requires_grad_(True)
                        vals = surrogate.values(targets)
                        (vals.sum() * (lam / len(self.names))).backward()
                        grads = {n: w.grad for n, w in full.items()}
                    else:
                        vals = surrogate.values(targets)
                    reg_own += vals.sum().item()
                    sr_own += surrogate.stable_ranks(targets, vals).sum().item()  # per-layer: every step
                if surrogate.in_loss:
                    _fsdp.scatter_from_owners(self.model, chunk, self.owner_of, grads, into="grad", add=True)
        return reg_own, sr_own

    def _compressed_grads(self, batch, lam, step=0):
        """The "compressed" surrogate: the projected layers' task gradients are set aside; each owner
        scatters its layers' projected weights ``U_r U_rᵀ W`` into the shards, the model runs forward
        and backward on ``λ·task``, the weights are restored, and each owner maps its layers'
        gradients back through the projection (``U_r U_rᵀ G``, U_r fixed: the chain rule of the
        single-process ``task(U_r U_rᵀ W)``) and scatters them; the task gradients are added back.
        The other parameters accumulate both backward passes' gradients as they are. Returns this
        rank's compressed-model loss and the sum of its own layers' whitened stable ranks."""
        model, targets, owner_of = self.model, self.targets, self.owner_of
        sr_own = 0.0 if self.surrogate.logs_stable_rank(step) else math.nan
        projected = [n for n in self.names  # the same list on every rank: from the shapes (or ranks) alone
                     if truncation_rank(n, model.get_submodule(n).weight.shape, self.keep_ratio,
                                        self.ranks) is not None]
        weights = {n: model.get_submodule(n).weight for n in projected}
        saved_w = _fsdp.local_copies(weights)
        saved_g = _fsdp.local_copies({n: p.grad for n, p in weights.items()})
        for p in weights.values():
            p.grad = None
        Urs = {}  # this rank's layers' projections, kept through the backward pass
        for chunk in self.rounds:
            with self.whole_weights(chunk):
                new = {}
                full = targets.weights if targets is not None else None
                if full:
                    here = targets.projections()
                    Urs.update(here)
                    new = {n: project_onto(Ur, full[n]) for n, Ur in here.items()}
                    srs = self.surrogate.stable_ranks(targets, None, step)
                    if srs is not None:
                        sr_own += srs.sum().item()
                _fsdp.scatter_from_owners(model, [n for n in chunk if n in weights], owner_of, new,
                                          into="weight")
        try:
            c_loss = self.task(model, batch).float()
            (lam * c_loss).backward()
        finally:
            _fsdp.restore_local(weights, saved_w)
        for chunk in self.rounds:
            part = [n for n in chunk if n in weights]
            g = _fsdp.gather_to_owners(model, part, owner_of, of="grad")
            _fsdp.scatter_from_owners(model, part, owner_of,
                                      {n: project_onto(Urs[n], gn) for n, gn in g.items()}, into="grad")
        with torch.no_grad():
            for n, p in weights.items():
                p.grad.to_local().add_(saved_g[n])
        return c_loss.item(), sr_own

    def update_weights(self, fn) -> None:
        """The owners change their layers' whole weights and scatter the shards."""
        for chunk in self.rounds:
            with self.whole_weights(chunk):
                if self.targets is not None:
                    fn(self.targets)
                _fsdp.scatter_from_owners(self.model, chunk, self.owner_of,
                                          self.targets.weights if self.targets is not None else {},
                                          into="weight")


def runner_for(use_fsdp: bool, world: int) -> type:
    """The runner class of a parallel mode: FSDP for a sharded model, else DDP for a process group of
    several ranks, else local."""
    if use_fsdp:
        return FSDPRunner
    return LocalRunner if world == 1 else DDPRunner
