"""AA-SVD: anchored to the original layer's outputs while seeing the inputs of the model compressed so
far (two streams on the same tokens), in closed form (:func:`prehab_svd.linalg.anchored_lowrank`).
The block driver compresses a block's groups in forward order, so ``o_proj`` sees the inputs produced
by the compressed q/k/v and ``down_proj`` those of the compressed gate/up."""

from __future__ import annotations

from ..linalg import anchored_lowrank
from .base import register
from .svd_llm import Whitening


@register
class AASVD(Whitening):
    name = "aa-svd"
    streams = 2

    def factorize(self, W, stats, rank, factor=None, *, extra=None):
        rank = self._check(W, stats, rank)
        return anchored_lowrank(W, stats.cross, stats.gram_xp, rank, damping=self.options.damping,
                                factor=factor)
