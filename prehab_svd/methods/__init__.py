"""The compression methods, one file each, behind one protocol (:mod:`.base`) and a registry.

``get(name)`` gives a method's class; ``names()`` the registered names in this order: svd, asvd,
svd-llm, aa-svd, zs-svd. A new method is one new file here (a :class:`~.base.Method` subclass
decorated with :func:`~.base.register`, imported below) plus its test; the block driver
(:mod:`prehab_svd.compression`) asks the method what it needs and never compares its name.
"""

from ..calibration import LayerStats
from .base import (
    DEFAULT_SHRINKAGE,
    CovarianceOptions,
    Method,
    build_options,
    check_shrinkage,
    get,
    names,
    option_names,
    register,
    relative_error,
    relative_errors,
)
from . import svd, asvd, svd_llm, aa_svd, zs_svd  # noqa: E402,F401  (registration order = names())
from .asvd import asvd_scale
from .zs_svd import ZSAllocation

__all__ = ["LayerStats", "Method", "CovarianceOptions", "DEFAULT_SHRINKAGE", "register", "get", "names",
           "option_names", "build_options", "check_shrinkage", "relative_error", "relative_errors", "asvd_scale",
           "factorize", "ZSAllocation", "ALLOCATIONS"]

ALLOCATIONS = ("uniform", "zs")  # how compress() spreads the budget when no ranks= are given


def factorize(method: str, W, stats, rank: int, **options):
    """Rank-``rank`` factors ``(U, V)`` of one layer's weight ``W`` by ``method``, from its input
    statistics (a :class:`LayerStats`; None for ``svd``), with the method's options."""
    m = get(method)
    if m.allocation is not None:
        raise ValueError(f"{method} chooses its ranks globally; use prehab_svd.compress")
    m = m(build_options({"method": m.Options}, options, method)["method"])
    return m.factorize(W, stats, rank)  # each closed form takes its own factor of the statistics
