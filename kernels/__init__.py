"""Triton kernels of prehab-svd, one file per op (installed as ``prehab_svd.kernels``).

This folder is mapped into the package by setup.py (``package_dir={"prehab_svd.kernels": "kernels"}``)
so that it never shadows the unrelated top-level ``kernels`` package; import it as
``prehab_svd.kernels``, never as ``kernels``.

Planned files (later issues), each holding the kernel, its launcher and the one-line registration
of the launcher as the op's ``"triton"`` backend (``prehab_svd.ops.register_backend``):

- ``covariance.py``: ``G += xᵀx`` and ``C += xᵀy`` in one pass over x, one triangle of G.
- ``stable_rank.py``: batched Newton–Schulz / power iteration for the rank surrogates.
- ``lowrank_linear.py``: ``y = (x Vᵀ) Uᵀ + b`` without writing the rank-r intermediate to memory.

The math they must reproduce is :mod:`prehab_svd.ops.reference`; tests compare against it and a
float64 oracle.
"""
