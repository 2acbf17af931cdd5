"""Prehab's rank surrogates: what the fine-tuning pushes down, one small object each.

Each surrogate says how it enters a step; the step runners (:mod:`.runners`) and :func:`prehab_svd.prehab`
read these attributes instead of comparing names:

* ``per_layer``: one value per targeted layer (computed by the layer's owner from its whitened weight
  ``M = W·L``, logged as the mean over all the layers), or, for ``"compressed"``, one task loss of
  the whole model (each rank's, on its batch);
* ``in_loss``: added to the loss as ``λ_t·mean`` (differentiated), or, for ``"tail"``, applied after
  each optimizer step by its proximal step (:meth:`Surrogate.proximal_step`);
* ``needs_keep_ratio``: aims at the compression planned after Prehab (``keep_ratio``).

The per-layer values are computed by :meth:`prehab_svd.training.targets.WhitenedTargets.values`
(the batched op :func:`prehab_svd.ops.stable_rank_loss` for ``"stable"`` and ``"nuclear"``).
"""

from __future__ import annotations

import torch

__all__ = ["Surrogate", "StableRank", "NuclearRank", "TailEnergy", "CompressedTask", "SURROGATES"]


class Surrogate:
    """The common interface; the defaults are those of a per-layer penalty added to the loss."""

    name: str = ""
    per_layer = True
    in_loss = True
    needs_keep_ratio = False

    def values(self, targets) -> torch.Tensor:
        """The held layers' values (:meth:`WhitenedTargets.values`), differentiable w.r.t. the weights
        when the surrogate is in the loss."""
        return targets.values(self.name, grad=self.in_loss)

    def stable_ranks(self, targets, values) -> torch.Tensor:
        """The held layers' whitened stable ranks for the log, given this step's ``values`` of the same
        weights: computed without gradient (advancing the warm-started power iteration)."""
        return targets.values("stable", grad=False)

    def proximal_step(self, targets, lam: float) -> None:
        """After an optimizer step, on the held layers' whole weights (surrogates not in the loss)."""
        raise NotImplementedError(f"the {self.name!r} surrogate has no proximal step")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StableRank(Surrogate):
    """``‖WL‖_F²/σ₁²``, σ₁ by power iteration warm-started from the previous step's vectors (the default)."""

    name = "stable"

    def stable_ranks(self, targets, values) -> torch.Tensor:
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

    def proximal_step(self, targets, lam: float) -> None:
        targets.shrink_tail(lam / (1.0 + lam))


class CompressedTask(Surrogate):
    """The task loss of the model as svd-llm would compress it at ``keep_ratio``: every targeted W
    replaced by ``U_r U_rᵀ W``, U_r the top-r left singular vectors of ``W·L`` held fixed within the
    step (:meth:`WhitenedTargets.truncated`). One value per rank, not per layer: under data
    parallelism every rank needs every layer's projection; under FSDP the owners project their
    layers and scatter the projected weights (:mod:`.runners`)."""

    name = "compressed"
    per_layer = False
    needs_keep_ratio = True

    def values(self, targets) -> torch.Tensor:
        raise TypeError("the 'compressed' surrogate has no per-layer values; see CompressedTask.loss")

    @staticmethod
    def loss(projected, task, model, batch) -> torch.Tensor:
        """``task(model, batch)`` (fp32, shape [1]) with ``projected``'s layers computing with their
        truncation (a :class:`~prehab_svd.training.targets.WhitenedTargets`)."""
        with projected.truncated():
            return task(model, batch).float().reshape(1)


SURROGATES = {s.name: s for s in (StableRank(), NuclearRank(), TailEnergy(), CompressedTask())}
