"""AA-SVD: anchored to the original layer's outputs while seeing the inputs of the model compressed so
far (two streams on the same tokens), in closed form (:func:`prehab_svd.linalg.anchored_lowrank`).
The block driver compresses a block's groups in forward order, so ``o_proj`` sees the inputs produced
by the compressed q/k/v and ``down_proj`` those of the compressed gate/up."""

from __future__ import annotations

from dataclasses import dataclass

from ..linalg import anchored_lowrank, check_anchor
from .base import CovarianceOptions, register
from .svd_llm import Whitening

# The share of the upstream error the factors undo when none is given (AnchoredOptions): measured,
# results/anchor.md.
DEFAULT_ANCHOR = 0.5


@dataclass
class AnchoredOptions(CovarianceOptions):
    """aa-svd's options: those of every covariance method, and ``anchor`` = β in [0, 1], the target
    ``(β·x + (1−β)·x')·Wᵀ`` (:func:`prehab_svd.linalg.anchored_lowrank`). β = 1 is the paper's
    objective, which fits the calibration tokens best; the full correction of the upstream error
    is a regression fit on those tokens, and half of it generalizes better to held-out text: on
    MiniLM and SmolLM2 at keep 0.8/0.6/0.4 and two calibration sizes, β = 0.5 beat β = 1 and
    svd-llm (results/anchor.md)."""

    anchor: float = DEFAULT_ANCHOR

    def __post_init__(self):
        super().__post_init__()
        self.anchor = check_anchor(self.anchor)  # at once, not after the calibration passes


@register
class AASVD(Whitening):
    name = "aa-svd"
    streams = 2
    Options = AnchoredOptions

    def factorize(self, W, stats, rank, factor=None, *, extra=None):
        rank = self._check(W, stats, rank)
        return anchored_lowrank(W, stats.cross, stats.gram_xp, rank, damping=self.options.damping,
                                factor=factor, anchor=self.options.anchor)
