"""What every method shares: a layer group's statistics, the method protocol, the options mapping.

A method is one class in its own file of this package, registered by name (:func:`register`). It
declares

* ``Options``: a dataclass of the keyword options it takes (``compress(..., **options)`` maps the
  keywords onto it and rejects the others, naming the valid ones);
* what the block driver must collect for it: ``needs_calibration`` (False: ``svd`` can run without
  data), ``streams`` (1: the original model's layer inputs; 2: also the inputs of the model as
  compressed so far, on the same tokens, as AA-SVD anchors), ``needs_abs_mean`` (mean |x| per input
  channel, ASVD), ``uses_covariance`` (whether the covariance, and so ``shrinkage``, enters the factors);
* ``allocation``: None, or the name of the global rank allocation it always uses (zs-svd: "zs");

and implements ``group_factor(stats)`` (what the layers of one group share, e.g. a whitening factor)
and ``factorize(W, stats, rank, factor)``. All methods return balanced factors
``(U [out, r], V [r, in])`` in W's dtype, computed in float64.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import PrehabError
from ..calibration import LayerStats
from ..linalg import WhiteningFactor, check_damping, objective

__all__ = ["LayerStats", "Method", "CovarianceOptions", "relative_error", "relative_errors", "check_shrinkage",
           "DEFAULT_SHRINKAGE", "register", "get", "names", "option_names", "build_options"]

DEFAULT_SHRINKAGE = "oas"  # the covariance shrinkage when none is given (results/whitening_numerics.md)


def check_shrinkage(shrinkage):
    """``shrinkage`` as the factorization uses it: a float in [0, 1] or "oas"."""
    if shrinkage == "oas":
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
        raise PrehabError(f"shrinkage must be a number in [0, 1] or 'oas', got {shrinkage!r}")
    return float(shrinkage)


@dataclass
class CovarianceOptions:
    """The options of every method whose factors depend on the input covariance.

    damping: relative diagonal damping of the Gram matrices (0: exact optimum with a pseudo-inverse
    fallback). shrinkage: α in [0, 1]; the factors are fit to statistics shrunk toward their
    diagonals, ``(1−α)·G + α·diag(G)`` (:meth:`LayerStats.shrunk`); the reported errors use the
    unshrunk ones. ``"oas"`` (the default): α chosen per group from its statistics
    (:meth:`LayerStats.oas_intensity`), reported in ``report.details["shrinkage"]``."""

    damping: float = 0.0
    shrinkage: float | str = DEFAULT_SHRINKAGE

    def __post_init__(self):
        self.shrinkage = check_shrinkage(self.shrinkage)
        check_damping(self.damping)  # at once, not after the calibration passes

    def intensity(self, stats: LayerStats) -> float:
        """The shrinkage α for one group's statistics."""
        return stats.oas_intensity() if self.shrinkage == "oas" else self.shrinkage


class Method:
    """The protocol of a compression method (see the module docstring). Subclasses set the class
    attributes and override :meth:`factorize` (and :meth:`group_factor` when the layers of a group
    share something)."""

    name: ClassVar[str]
    Options: ClassVar[type] = CovarianceOptions
    needs_calibration: ClassVar[bool] = True
    streams: ClassVar[int] = 1
    needs_abs_mean: ClassVar[bool] = False
    uses_covariance: ClassVar[bool] = True
    allocation: ClassVar[str | None] = None

    def __init__(self, options=None):
        self.options = self.Options() if options is None else options

    def shrinkage(self, stats: LayerStats) -> float:
        """The shrinkage intensity this method fits one group's factors with (0: none)."""
        return self.options.intensity(stats) if self.uses_covariance else 0.0

    def group_factor(self, stats: LayerStats) -> WhiteningFactor | None:
        """What the layers of one group share, computed once per group (None: nothing)."""
        return None

    def factorize(self, W: torch.Tensor, stats: LayerStats | None, rank: int, factor=None, *, extra=None):
        """Rank-``rank`` factors ``(U, V)`` of ``W`` given its group's (shrunk) statistics and factor;
        ``extra``: per-layer data of the method's allocation (zs-svd: the correction's gradients)."""
        raise NotImplementedError


_REGISTRY: dict = {}


def register(cls):
    """Class decorator: make a :class:`Method` available by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple:
    return tuple(_REGISTRY)


def get(name: str):
    """The method class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PrehabError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def option_names(*option_types) -> list:
    """The keyword options the given option dataclasses accept, in declaration order."""
    out = []
    for t in option_types:
        out += [f.name for f in dataclasses.fields(t) if f.name not in out]
    return out


def build_options(option_types: dict, given: dict, what: str) -> dict:
    """Map keyword options onto dataclasses: ``option_types`` = {role: dataclass}; a keyword goes to
    every dataclass that declares it. Unknown keywords raise, naming the valid ones."""
    valid = option_names(*option_types.values())
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise PrehabError(f"{what} takes no option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"its options are: {', '.join(valid) if valid else '(none)'}")
    out = {}
    for role, t in option_types.items():
        fields = {f.name for f in dataclasses.fields(t)}
        out[role] = t(**{k: v for k, v in given.items() if k in fields})
    return out


def relative_error(W: torch.Tensor, W_new: torch.Tensor, stats: LayerStats) -> float:
    """``‖x Wᵀ − x' W_newᵀ‖_F / ‖x Wᵀ‖_F`` on the calibration tokens, from the statistics."""
    num = objective(W, W_new, stats.gram_x, stats.cross, stats.gram_xp)
    den = ((W.to(torch.float64) @ stats.gram_x) * W.to(torch.float64)).sum()
    if den <= 0:
        return 0.0
    return float(num.clamp_min(0) / den) ** 0.5


def relative_errors(W: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None,
                    stats: LayerStats) -> tuple[float, float]:
    """``(before, after)``: :func:`relative_error` of ``W`` itself and of ``W' = U V`` (U, V None: a
    dense layer, ``after = before``), the same numbers from fewer products, all in float64.

    ``t1 = tr(W G_x Wᵀ)`` (also the denominator) comes from ``WG = W G_x``, the one [out, d, d]
    product of single-stream statistics (``cross`` and ``gram_xp`` the very tensor ``gram_x``, as
    :meth:`GroupStats.finalize` gives them), where ``before`` is exactly 0 and
    ``tr(W C W'ᵀ) = ⟨WG Vᵀ, U⟩``; two streams add ``W C`` and ``W G_x'`` for ``before``. The last
    term takes [r, d] and [r, r] products only: ``tr(W' G_x' W'ᵀ) = ⟨UᵀU, V G_x' Vᵀ⟩``.
    """
    f64 = torch.float64
    W64 = W.detach().to(f64)
    gx = stats.gram_x.to(f64)
    WG = W64 @ gx
    den = (WG * W64).sum()
    if den <= 0:
        return 0.0, 0.0
    same_c, same_p = stats.cross is stats.gram_x, stats.gram_xp is stats.gram_x
    WC = WG if same_c else W64 @ stats.cross.to(f64)
    if same_c and same_p:
        before = 0.0 if math.isfinite(float(den)) else math.nan  # t1 − 2·t1 + t1
    else:
        t3 = den if same_p else ((W64 @ stats.gram_xp.to(f64)) * W64).sum()
        before = float((den - 2 * (WC * W64).sum() + t3).clamp_min(0) / den) ** 0.5
    if U is None:
        return before, before
    U64, V64 = U.detach().to(f64), V.detach().to(f64)
    gxp = gx if same_p else stats.gram_xp.to(f64)
    t2 = ((WC @ V64.T) * U64).sum()
    t3 = ((U64.T @ U64) * ((V64 @ gxp) @ V64.T)).sum()
    after = float((den - 2 * t2 + t3).clamp_min(0) / den) ** 0.5
    return before, after
