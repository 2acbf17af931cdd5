"""ASVD: scale W's input channels by (mean |x|)^α, truncate, unscale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PrehabError
from ..linalg import _validate, balanced_factors, truncated_svd
from .base import Method, register


@dataclass
class ASVDOptions:
    """alpha: the activation exponent of the channel scale (the paper's 0.5)."""

    alpha: float = 0.5


def asvd_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's per-input-channel scale (mean |x|)^alpha, floored so dead channels stay invertible."""
    s = abs_mean.to(torch.float64).clamp_min(0) ** alpha
    floor = s.max() * 1e-6 if s.max() > 0 else torch.tensor(1.0, dtype=s.dtype)
    return s.clamp_min(floor)


def _check_abs_mean(a: torch.Tensor, d: int) -> None:
    if a.shape != (d,):
        raise PrehabError(f"abs_mean must have one entry per input channel [{d}], got {list(a.shape)}")
    if not torch.isfinite(a).all() or (a < 0).any():
        raise PrehabError("abs_mean (mean |x| per input channel) must be finite and non-negative; "
                          "check the calibration activations")


@register
class ASVD(Method):
    name = "asvd"
    Options = ASVDOptions
    needs_abs_mean = True
    uses_covariance = False

    def factorize(self, W, stats, rank, factor=None, *, extra=None):
        rank = _validate(W, rank)
        if stats is None:
            raise PrehabError("asvd needs calibration statistics of the layer's input (stats=None given)")
        if stats.abs_mean is None:
            raise PrehabError("asvd needs the mean |x| of each layer's input from calibration")
        _check_abs_mean(stats.abs_mean, W.shape[1])
        s = asvd_scale(stats.abs_mean, self.options.alpha)
        U, S, Vh = truncated_svd(W.detach().to(torch.float64) * s, rank)
        return balanced_factors(U, S, Vh / s, rank, W.dtype, W.device)
