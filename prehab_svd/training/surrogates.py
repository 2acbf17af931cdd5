"""Prehab's rank surrogates: what the fine-tuning pushes down, one small object each.

Each surrogate says how it enters a step; the step runners (:mod:`.runners`) and :func:`prehab_svd.prehab`
read these attributes instead of comparing names:

* ``per_layer``: one value per targeted layer (computed by the layer's owner from its whitened weight
  ``M = W·L``, logged as the mean over all the layers), or, for ``"compressed"``, one task loss of
  the whole model (each rank's, on its batch);
* ``in_loss``: added to the loss as ``λ_t·mean`` (differentiated), or, for ``"tail"``, applied after
  each optimizer step by its proximal step (:meth:`Surrogate.proximal_step`);
* ``needs_keep_ratio``: aims at the compression planned after Prehab (``keep_ratio``);
* ``default_lam``, ``default_lr``: what :func:`prehab_svd.prehab` uses when the caller passes none.

The per-layer values are computed by :meth:`prehab_svd.training.targets.WhitenedTargets.values`
(the batched op :func:`prehab_svd.ops.stable_rank_loss` for ``"stable"`` and ``"nuclear"``).
"""

from __future__ import annotations

import torch

__all__ = ["Surrogate", "StableRank", "NuclearRank", "TailEnergy", "CompressedTask", "SURROGATES", "split_batch",
           "resolve_surrogate"]


class Surrogate:
    """The common interface; the defaults are those of a per-layer penalty added to the loss."""

    name: str = ""
    per_layer = True
    in_loss = True
    needs_keep_ratio = False
    default_lam = 10.0
    default_lr = 2e-5
    track = False  # a model-level surrogate (per_layer False) with a tracked truncation
    track_every = 1

    def batches(self, batch: dict) -> tuple:
        """(the task term's batch, a model-level surrogate's batch): the whole batch for both."""
        return batch, batch

    def values(self, targets) -> torch.Tensor:
        """The held layers' values (:meth:`WhitenedTargets.values`), differentiable w.r.t. the weights
        when the surrogate is in the loss."""
        return targets.values(self.name, grad=self.in_loss)

    def logs_stable_rank(self, step: int) -> bool:
        """Whether the log of (0-based) ``step`` carries the whitened stable rank (every step here)."""
        return True

    def stable_ranks(self, targets, values, step: int = 0) -> torch.Tensor | None:
        """The held layers' whitened stable ranks for the log of (0-based) ``step``, given this step's
        ``values`` of the same weights: computed without gradient (advancing the warm-started power
        iteration); None where :meth:`logs_stable_rank` skips the step."""
        return targets.values("stable", grad=False) if self.logs_stable_rank(step) else None

    def proximal_step(self, targets, lam: float) -> None:
        """After an optimizer step, on the held layers' whole weights (surrogates not in the loss)."""
        raise NotImplementedError(f"the {self.name!r} surrogate has no proximal step")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StableRank(Surrogate):
    """``‖WL‖_F²/σ₁²``, σ₁ by power iteration warm-started from the previous step's vectors (the default)."""

    name = "stable"

    def stable_ranks(self, targets, values, step: int = 0) -> torch.Tensor:
        return values  # the surrogate is the stable rank itself


class NuclearRank(Surrogate):
    """``‖WL‖_*²/‖WL‖_F²`` (the polar factor by Newton–Schulz)."""

    name = "nuclear"


class TailEnergy(Surrogate):
    """``Σ_{i>r} σᵢ²/‖WL‖_F²`` at the rank r that ``keep_ratio`` gives the layer's shape: svd-llm's
    relative truncation error of the layer. Not added to the loss (its gradient in W is scaled down
    by the whitening, so the whitened tail, which lives in the inputs' low-variance directions, would
    hardly move; measured on MiniLM): after each optimizer step, its proximal step removes the
    fraction ``λ_t/(1+λ_t)`` of every layer's whitened tail."""

    name = "tail"
    in_loss = False
    needs_keep_ratio = True
    default_lam = 0.01

    def proximal_step(self, targets, lam: float) -> None:
        targets.shrink_tail(lam / (1.0 + lam))


class CompressedTask(Surrogate):
    """The task loss of the model as svd-llm would compress it at ``keep_ratio``: every targeted W
    replaced by ``U_r U_rᵀ W``, U_r the top-r left singular vectors of ``W·L`` held fixed within the
    step (:meth:`WhitenedTargets.truncated`). One value per rank, not per layer: under data
    parallelism every rank needs every layer's projection; under FSDP the owners project their
    layers and scatter the projected weights (:mod:`.runners`).

    ``track`` (default True): U_r is tracked, not recomputed: one block-power step every
    ``track_every`` optimizer steps from the previous U_r (:meth:`WhitenedTargets.advance`), exact
    fp64 SVDs only at the start; the compressed forward runs on the two factors. False: fp64 SVDs of
    every ``W·L`` at every step (the exact projector; ~6x a plain step on SmolLM2).
    ``track_every`` (default 2): on SmolLM2 a block-power step of every layer (its products and
    thin QRs) costs about a third of a plain step; one every other step halves that, and the lag it
    adds is measured (``PrehabReport.tracking``, results/prehab_smollm2.md).

    ``split`` (default True): a batch of two or more sequences is split in halves: the first half's
    task loss is the dense term and the second half's, through the truncation, the compressed one,
    so a step costs one forward and backward pass over the batch, like plain fine-tuning (both terms
    are unbiased estimates of the same objective as the whole batch's). False: both on the whole
    batch (two passes). FSDP always runs both terms on the whole batch with exact projections.

    Not added to the stable rank every step (forming every ``W·L`` would cost more than the
    regularizer, about a third of a plain step on SmolLM2): the log carries the whitened stable rank
    every :attr:`STABLE_RANK_EVERY` steps."""

    name = "compressed"
    per_layer = False
    needs_keep_ratio = True
    default_lam = 1.0
    default_lr = 1e-4
    STABLE_RANK_EVERY = 25

    def __init__(self, track: bool = True, split: bool = True, track_every: int = 2):
        if isinstance(track_every, bool) or not isinstance(track_every, int) or track_every < 1:
            raise ValueError(f"track_every must be a positive int, got {track_every!r}")
        self.track = bool(track)
        self.split = bool(split)
        self.track_every = track_every

    def __repr__(self) -> str:
        return f"CompressedTask(track={self.track}, split={self.split}, track_every={self.track_every})"

    def values(self, targets) -> torch.Tensor:
        raise TypeError("the 'compressed' surrogate has no per-layer values; see CompressedTask.loss")

    def logs_stable_rank(self, step: int) -> bool:
        return step % self.STABLE_RANK_EVERY == 0

    def batches(self, batch: dict) -> tuple:
        """(the dense term's batch, the compressed term's batch): the halves of ``batch`` when
        splitting and it has two or more sequences, else the whole batch twice."""
        halves = split_batch(batch) if self.split else None
        return halves if halves is not None else (batch, batch)

    @staticmethod
    def loss(projected, task, model, batch) -> torch.Tensor:
        """``task(model, batch)`` (fp32, shape [1]) with ``projected``'s layers computing with their
        truncation (a :class:`~prehab_svd.training.targets.WhitenedTargets`)."""
        with projected.truncated():
            return task(model, batch).float().reshape(1)


def split_batch(batch: dict) -> tuple | None:
    """The two halves (first ⌈b/2⌉ sequences, the rest) of a dict batch whose tensors share the
    leading batch size b ≥ 2; None for a single sequence. Values that are not such tensors are
    shared by both halves."""
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1 or next(iter(sizes)) < 2:
        return None
    h = (next(iter(sizes)) + 1) // 2

    def part(sl):
        return {k: (v[sl] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
    return part(slice(0, h)), part(slice(h, None))


SURROGATES = {s.name: s for s in (StableRank(), NuclearRank(), TailEnergy(), CompressedTask())}


def resolve_surrogate(surrogate, keep_ratio):
    """The surrogate object for ``prehab``'s ``surrogate`` argument: a :class:`Surrogate` as it is,
    a name of :data:`SURROGATES`, or None: ``"compressed"`` when a ``keep_ratio`` is planned (the
    only surrogate measured to improve the compressed model: results/prehab_minilm.md,
    results/prehab_smollm2.md), else ``"stable"``. Raises ValueError for anything else."""
    if isinstance(surrogate, Surrogate):
        return surrogate
    if surrogate is None:
        return SURROGATES["compressed" if keep_ratio is not None else "stable"]
    if isinstance(surrogate, str) and surrogate in SURROGATES:
        return SURROGATES[surrogate]
    raise ValueError(f"surrogate must be one of {', '.join(map(repr, SURROGATES))}, a "
                     f"prehab_svd.training.surrogates.Surrogate, or None, got {surrogate!r}")
