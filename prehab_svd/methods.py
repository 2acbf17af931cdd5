"""The per-layer factorizations of each method, given a layer's calibration statistics.

All methods return balanced factors ``(U [out, r], V [r, in])`` in W's dtype, computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PrehabError
from .linalg import (
    WhiteningFactor,
    _validate,
    anchored_lowrank,
    balanced_factors,
    equilibrate,
    objective,
    truncated_svd,
    whitened_lowrank,
    whitening_factor,
)

__all__ = ["LayerStats", "factorize", "group_factor", "relative_error", "asvd_scale"]


@dataclass
class LayerStats:
    """Normalized statistics of one layer input (float64).

    ``gram_x = xᵀx/N`` (original model), ``cross = xᵀx'/N`` and ``gram_xp = x'ᵀx'/N`` (compressed
    model's input x'); for single-stream methods x' = x and all three are the same tensor.
    ``abs_mean`` is mean |x| per input channel (ASVD).
    """

    gram_x: torch.Tensor
    cross: torch.Tensor
    gram_xp: torch.Tensor
    abs_mean: torch.Tensor | None
    tokens: int
    floor: float | None = None  # the statistics' rounding level (linalg.rounding_floor); None: float64

    def shrunk(self, alpha: float) -> "LayerStats":
        """The statistics shrunk toward their diagonals: ``A ← (1−α)·A + α·diag(A)`` for the grams and
        the cross term alike, so x' = x stays x' = x. The shrinkage target keeps every channel's own
        energy (and so the answer is unchanged by a per-channel rescaling of the inputs, unlike
        damping toward a multiple of I); it removes part of the correlations that a finite calibration
        set of one kind of text measures, which is what generalizes worst to other text. α = 0: the
        exact optimum on the calibration tokens; α = 1: a diagonal (ASVD-like, with exponent 1/2 of
        the second moment) scaling."""
        if not 0 <= alpha <= 1:
            raise PrehabError(f"shrinkage must be in [0, 1], got {alpha!r}")
        if alpha == 0:
            return self

        def shrink(A):
            return (1 - alpha) * A + alpha * torch.diag(torch.diagonal(A))

        gx = shrink(self.gram_x)
        same_c, same_p = self.cross is self.gram_x, self.gram_xp is self.gram_x
        return LayerStats(gx, gx if same_c else shrink(self.cross), gx if same_p else shrink(self.gram_xp),
                          self.abs_mean, self.tokens, self.floor)

    def oas_intensity(self) -> float:
        """The Oracle Approximating Shrinkage intensity (Chen, Wiesel, Eldar & Hero, 2010) of the
        equilibrated ``gram_xp`` toward its target (the identity there: each channel's own energy, the
        target of :meth:`shrunk`), from the statistics alone: with ``p`` live channels, ``n`` tokens,
        ``t = tr(Ĝ) = p`` and ``t₂ = tr(Ĝ²)``,
        ``ρ = min(1, ((1 − 2/p)·t₂ + t²) / ((n + 1 − 2/p)·(t₂ − t²/p)))``. It treats the tokens as
        independent draws, so for the correlated tokens of real text it is a lower bound on what
        would help; it is large only when the tokens are few for the width (``n`` ≲ ``p``)."""
        G = self.gram_xp.to(torch.float64)
        Gh, _, _ = equilibrate(0.5 * (G + G.T))
        p = Gh.shape[0]
        if p < 2 or self.tokens < 1:
            return 0.0
        t, t2 = float(p), float(Gh.square().sum())
        den = (self.tokens + 1 - 2 / p) * (t2 - t * t / p)
        if den <= 0:  # Ĝ = I exactly: nothing to shrink
            return 0.0
        return float(min(1.0, ((1 - 2 / p) * t2 + t * t) / den))


def group_factor(method: str, stats: LayerStats, damping: float = 0.0) -> WhiteningFactor | None:
    """The whitening factor shared by the layers of a group (same input), or None if unused."""
    if method in ("svd-llm", "aa-svd", "zs-svd"):
        return whitening_factor(stats.gram_xp, damping, floor=stats.floor)
    return None


def asvd_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's per-input-channel scale (mean |x|)^alpha, floored so dead channels stay invertible."""
    s = abs_mean.to(torch.float64).clamp_min(0) ** alpha
    floor = s.max() * 1e-6 if s.max() > 0 else torch.tensor(1.0, dtype=s.dtype)
    return s.clamp_min(floor)


_METHODS = ("svd", "asvd", "svd-llm", "aa-svd")


def _check_abs_mean(a: torch.Tensor, d: int) -> None:
    if a.shape != (d,):
        raise PrehabError(f"abs_mean must have one entry per input channel [{d}], got {list(a.shape)}")
    if not torch.isfinite(a).all() or (a < 0).any():
        raise PrehabError("abs_mean (mean |x| per input channel) must be finite and non-negative; "
                          "check the calibration activations")


def factorize(method: str, W: torch.Tensor, stats: LayerStats | None, rank: int, *, alpha=0.5,
              damping=0.0, factor=None):
    """Rank-``rank`` factors of W by ``method``."""
    if method not in _METHODS:
        raise PrehabError(f"unknown method {method!r}; use one of {', '.join(_METHODS)}")
    rank = _validate(W, rank)
    if method != "svd" and stats is None:
        raise PrehabError(f"{method} needs calibration statistics of the layer's input (stats=None given)")
    W64 = W.detach().to(torch.float64)
    if method == "svd":
        U, S, Vh = truncated_svd(W64, rank)
    elif method == "asvd":
        if stats.abs_mean is None:
            raise PrehabError("asvd needs the mean |x| of each layer's input from calibration")
        _check_abs_mean(stats.abs_mean, W.shape[1])
        s = asvd_scale(stats.abs_mean, alpha)
        U, S, Vh = truncated_svd(W64 * s, rank)
        Vh = Vh / s
    elif method == "svd-llm":
        return whitened_lowrank(W, stats.gram_x, rank, damping=damping, factor=factor)
    else:  # aa-svd
        return anchored_lowrank(W, stats.cross, stats.gram_xp, rank, damping=damping, factor=factor)
    return balanced_factors(U, S, Vh, rank, W.dtype, W.device)


def relative_error(W: torch.Tensor, W_new: torch.Tensor, stats: LayerStats) -> float:
    """``‖x Wᵀ − x' W_newᵀ‖_F / ‖x Wᵀ‖_F`` on the calibration tokens, from the statistics."""
    num = objective(W, W_new, stats.gram_x, stats.cross, stats.gram_xp)
    den = ((W.to(torch.float64) @ stats.gram_x) * W.to(torch.float64)).sum()
    if den <= 0:
        return 0.0
    return float(num.clamp_min(0) / den) ** 0.5
