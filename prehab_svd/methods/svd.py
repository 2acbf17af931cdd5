"""Plain SVD: the truncated singular value decomposition of W; the data only measures the error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import _validate, balanced_factors, truncated_svd
from .base import Method, register


@dataclass
class SVDOptions:
    """svd takes no options."""


@register
class SVD(Method):
    name = "svd"
    Options = SVDOptions
    needs_calibration = False
    uses_covariance = False

    def factorize(self, W, stats, rank, factor=None, *, extra=None):
        rank = _validate(W, rank)
        U, S, Vh = truncated_svd(W.detach().to(torch.float64), rank)
        return balanced_factors(U, S, Vh, rank, W.dtype, W.device)
