"""Triton kernels of prehab-svd, one file per op, each holding the kernel, its launcher and the
registration of the launcher as the op's ``"triton"`` backend (``prehab_svd.ops.register_backend``):

- ``covariance.py``: ``G += xᵀx`` and ``C += xᵀy`` in one pass over x, one triangle of G.
- ``stable_rank.py``: batched Newton–Schulz / power iteration for the rank surrogates.
- ``lowrank_linear.py``: ``y = (x Vᵀ) Uᵀ + b``, a split-r decode path and a two-GEMM path.

They live inside the package, so no top-level ``kernels`` module exists to shadow the unrelated PyPI
package of that name (which transformers >= 5.25 imports).

The math they must reproduce is :mod:`prehab_svd.ops.reference`; tests compare against it and a
float64 oracle.
"""
