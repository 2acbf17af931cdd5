"""SVD-LLM: whiten by a factor of the input covariance, truncate W·L, map back with a solve
(:func:`prehab_svd.linalg.whitened_lowrank`); the layers of a group share the factor."""

from __future__ import annotations

from ..errors import PrehabError
from ..linalg import _validate, whitened_lowrank, whitening_factor
from .base import CovarianceOptions, Method, register


class Whitening(Method):
    """A method whose group shares the whitening factor of its (compressed-model) input covariance."""

    Options = CovarianceOptions

    def group_factor(self, stats):
        return whitening_factor(stats.gram_xp, self.options.damping, floor=stats.floor)

    def _check(self, W, stats, rank) -> int:
        rank = _validate(W, rank)
        if stats is None:
            raise PrehabError(f"{self.name} needs calibration statistics of the layer's input (stats=None given)")
        return rank


@register
class SVDLLM(Whitening):
    name = "svd-llm"

    def factorize(self, W, stats, rank, factor=None, *, extra=None):
        rank = self._check(W, stats, rank)
        return whitened_lowrank(W, stats.gram_x, rank, damping=self.options.damping, factor=factor)
