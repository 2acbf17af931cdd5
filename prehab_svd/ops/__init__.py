"""The three numeric ops of prehab-svd, and the single point that dispatches them to a backend.

=====================  ===========================================================================
op                     what it computes
=====================  ===========================================================================
covariance_update      ``G += xᵀx`` and optionally ``C += xᵀy``, in place (calibration statistics)
stable_rank            rank surrogates of M = W L with gradients (the Prehab regularizer)
lowrank_linear         ``y = (x Vᵀ) Uᵀ + b`` (inference of a compressed layer)
=====================  ===========================================================================

Every function takes ``backend=`` one of ``"auto"`` (default), ``"torch"``, ``"triton"``, ``"cuda"``.
The ``PREHAB_SVD_BACKEND`` environment variable, read each time an op runs, overrides ``"auto"`` (not
an explicit choice): tests and benchmarks use it to force a backend. Three backends exist:

* ``"torch"`` -- plain torch (:mod:`prehab_svd.ops.reference`), every device and dtype;
* ``"triton"`` -- the kernels in :mod:`prehab_svd.kernels` (:mod:`prehab_svd.ops._triton`): CUDA
  tensors in fp32/fp16/bf16, or CPU tensors in fp32/fp16 under the Triton interpreter;
* ``"cuda"`` -- the CUDA C++ extension built from ``csrc/`` (:mod:`prehab_svd.ops._cuda`), registered
  only where it can exist in this process.

``"auto"`` picks the registered backend of highest priority that supports the tensors: torch, for now
(Triton and CUDA rank below it until a GPU benchmark in bench/ shows them faster). A backend asked for
by name that is not registered or cannot run the tensors raises :class:`BackendUnavailableError` (a
:class:`~prehab_svd.errors.PrehabError` and a ``NotImplementedError``). :func:`available_backends`
lists what can run; :func:`register_backend` adds an implementation (see
:mod:`prehab_svd.ops._registry`).

The ops are ``torch.library`` custom ops (``torch.ops.prehab_svd.*``, registered in
:mod:`prehab_svd.ops.library`), so they work under ``torch.compile`` and autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import PrehabError
from . import _registry, library, reference
from ._registry import (
    BACKENDS,
    ENV_VAR,
    VALID_BACKENDS,
    BackendUnavailableError,
    available_backends,
    registered_backends,
)
from ._registry import register as register_backend
from ._registry import unregister as unregister_backend
from . import _cuda, _triton

_triton.register_all()
_cuda.register_all()  # only where the CUDA extension can exist here; never builds or imports it

__all__ = [
    "covariance_update",
    "CovarianceAccumulator",
    "stable_rank",
    "stable_rank_loss",
    "lowrank_linear",
    "available_backends",
    "registered_backends",
    "register_backend",
    "unregister_backend",
    "BackendUnavailableError",
    "BACKENDS",
    "VALID_BACKENDS",
    "ENV_VAR",
    "reference",
]

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_ACC_DTYPES = (torch.float32, torch.float64)
_KINDS = ("stable", "nuclear")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, t, dtypes=_INPUT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise PrehabError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise PrehabError(f"{name} has dtype {t.dtype}; it must be one of {allowed}")


def _require_same_device(**tensors: Optional[torch.Tensor]) -> None:
    named = [(k, t) for k, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise PrehabError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device"
            )


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------
# covariance
# ---------------------------------------------------------------------------------------------


def covariance_update(
    G: torch.Tensor,
    x: torch.Tensor,
    C: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> None:
    """In place: ``G += xᵀx`` and, when C and y are given, ``C += xᵀy`` (one pass over x).

    x, y: [T, d] (same shape), bf16/fp16/fp32/fp64. G, C: [d, d] accumulators in fp32 or fp64 (the
    products are formed in the accumulator dtype). Rows of x are tokens. G is symmetric.
    """
    _registry.check_backend_name(backend)
    _require_tensor("x", x)
    if x.dim() != 2:
        raise PrehabError(
            f"x must be 2-D [tokens, d], got shape {_shape(x)}; flatten the leading dimensions with "
            f"x.reshape(-1, x.shape[-1]) (CovarianceAccumulator.update does this for you)"
        )
    d = x.shape[1]
    _require_tensor("G", G, _ACC_DTYPES)
    if G.shape != (d, d):
        raise PrehabError(f"G must be [d, d] = [{d}, {d}] to match x {_shape(x)}, got {_shape(G)}")
    if (C is None) != (y is None):
        raise PrehabError("pass C and y together (C += xᵀy) or neither")
    if C is not None:
        _require_tensor("C", C, _ACC_DTYPES)
        _require_tensor("y", y)
        if y.shape != x.shape:
            raise PrehabError(f"y must have the shape of x {_shape(x)}, got {_shape(y)}")
        if C.shape != (d, d):
            raise PrehabError(f"C must be [d, d] = [{d}, {d}] to match x {_shape(x)}, got {_shape(C)}")
        if C.dtype != G.dtype:
            raise PrehabError(f"C ({C.dtype}) and G ({G.dtype}) must have the same dtype")
        if _same_storage(C, G):
            raise PrehabError("C and G must be different tensors (they are accumulated separately)")
    _require_same_device(x=x, G=G, y=y, C=C)
    library.covariance_update_op(G, x, C, y, backend)


class CovarianceAccumulator:
    """Running sums ``G = Σ xᵀx`` (and ``C = Σ xᵀy`` with ``cross=True``) over token batches.

    >>> acc = CovarianceAccumulator(d, cross=False)
    >>> for x in batches:          # x: [..., d], any float dtype
    ...     acc.update(x)
    >>> gram = acc.gram()          # Σ xᵀx / tokens, float64

    ``dtype`` is the precision of each batch's product (``covariance_update``: fp32 accumulators in
    the kernels), ``sum_dtype`` that of the running sums across batches: by default float64, so the
    result does not depend on the order of the batches, on how they are split across ranks, or on
    which backend computed them beyond one product's rounding. The products go to a zeroed scratch
    buffer of ``dtype`` and are then added to the sums: two d² passes per batch next to the
    product's 2·tokens·d², and 12 bytes per entry of each sum instead of 4 (``sum_dtype=dtype``: the
    old in-place accumulation, 4 bytes, order-dependent). :attr:`noise_floor` is the rounding level
    the sums carry (see :func:`prehab_svd.linalg.rounding_floor`).
    """

    def __init__(
        self,
        d: int,
        *,
        cross: bool = False,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        backend: str = "auto",
        sum_dtype: Optional[torch.dtype] = torch.float64,
    ) -> None:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise PrehabError(f"d must be a positive int (the feature size), got {d!r}")
        if dtype not in _ACC_DTYPES:
            raise PrehabError(f"accumulator dtype must be torch.float32 or torch.float64, got {dtype}")
        sum_dtype = dtype if sum_dtype is None else sum_dtype
        if sum_dtype not in _ACC_DTYPES or torch.finfo(sum_dtype).eps > torch.finfo(dtype).eps:
            raise PrehabError(f"sum_dtype must be torch.float32 or torch.float64 and at least as precise as "
                              f"dtype ({dtype}), got {sum_dtype}")
        self.d = d
        self.dtype = dtype
        self.sum_dtype = sum_dtype
        self.backend = _registry.check_backend_name(backend)
        self._G = torch.zeros(d, d, dtype=sum_dtype, device=device)
        self._C = torch.zeros(d, d, dtype=sum_dtype, device=device) if cross else None
        self._scratch = None  # (G, C) buffers of dtype for one batch's products, when sum_dtype differs
        self.tokens = 0
        self.max_batch_tokens = 0  # the most tokens one product summed (for the noise floor)

    @property
    def noise_floor(self) -> float:
        """The rounding level of the sums, on the eigenvalues of the equilibrated Gram."""
        from ..linalg import rounding_floor

        return rounding_floor(self.d, self.dtype, max(self.max_batch_tokens, 1))

    @property
    def has_cross(self) -> bool:
        return self._C is not None

    @property
    def device(self) -> torch.device:
        return self._G.device

    def reset(self) -> None:
        """Zero the sums and the token count."""
        self._G.zero_()
        if self._C is not None:
            self._C.zero_()
        self.tokens = 0
        self.max_batch_tokens = 0

    def update(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        """Add the tokens of x [..., d] (and of the paired stream y, same shape, with cross=True)."""
        _require_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.d:
            raise PrehabError(f"x must be [..., {self.d}], got shape {_shape(x)}")
        if self._C is not None and y is None:
            raise PrehabError("this accumulator has cross=True: pass the paired stream, update(x, y)")
        if self._C is None and y is not None:
            raise PrehabError("y was given but the accumulator has cross=False; create it with cross=True")
        x2 = x.reshape(-1, self.d)
        y2 = None
        if y is not None:
            _require_tensor("y", y)
            if y.shape != x.shape:
                raise PrehabError(f"y must have the shape of x {_shape(x)}, got {_shape(y)}")
            y2 = y.reshape(-1, self.d)
        if x2.device != self.device:
            raise PrehabError(f"x is on {x2.device} but the accumulator is on {self.device}")
        if self.sum_dtype == self.dtype:
            covariance_update(self._G, x2, self._C, y2, backend=self.backend)
        else:
            if self._scratch is None:
                self._scratch = (torch.empty(self.d, self.d, dtype=self.dtype, device=self.device),
                                 None if self._C is None else
                                 torch.empty(self.d, self.d, dtype=self.dtype, device=self.device))
            sG, sC = self._scratch
            sG.zero_()
            if sC is not None:
                sC.zero_()
            covariance_update(sG, x2, sC, y2, backend=self.backend)
            self._G += sG
            if sC is not None:
                self._C += sC
        self.tokens += x2.shape[0]
        self.max_batch_tokens = max(self.max_batch_tokens, x2.shape[0])

    def _finite(self, S: torch.Tensor, what: str) -> torch.Tensor:
        # Checked once here, not per update(): update() stays free of host syncs, and NaN/Inf in any
        # token reaches the sums (NaN·0 is NaN, Inf·0 is NaN, Inf·x is ±Inf).
        if not torch.isfinite(S).all():
            hint = ("; or accumulate in float64 (dtype=torch.float64): the tokens' squares overflow "
                    "float32" if self.dtype == torch.float32 else "")
            raise PrehabError(
                f"{what}() has NaN or Inf: a token had NaN/Inf (check the activations and the model's "
                f"dtype){hint}"
            )
        return S

    def gram(self, normalize: bool = True) -> torch.Tensor:
        """``Σ xᵀx / tokens`` (a new, exactly symmetric tensor), or with normalize=False the raw sum
        (the live buffer: clone it before modifying). Raises PrehabError if a token was NaN/Inf or
        the sums overflowed (the raw sum is returned unchecked)."""
        if not normalize:
            return self._G
        if self.tokens == 0:
            raise PrehabError("no tokens accumulated yet; call update() before gram()")
        half = self._G * (0.5 / self.tokens)  # scaled first: G + Gᵀ could overflow where G does not
        return self._finite(half + half.mT, "gram")

    def cross(self, normalize: bool = True) -> torch.Tensor:
        """``Σ xᵀy / tokens`` (a new tensor), or with normalize=False the raw sum (the live buffer).
        Raises PrehabError like :meth:`gram`."""
        if self._C is None:
            raise PrehabError("this accumulator was created with cross=False; use cross=True for xᵀy")
        if not normalize:
            return self._C
        if self.tokens == 0:
            raise PrehabError("no tokens accumulated yet; call update() before cross()")
        return self._finite(self._C / self.tokens, "cross")

    def __repr__(self) -> str:
        return (
            f"CovarianceAccumulator(d={self.d}, cross={self.has_cross}, dtype={self.dtype}, "
            f"sum_dtype={self.sum_dtype}, "
            f"device={self.device}, tokens={self.tokens})"
        )


# ---------------------------------------------------------------------------------------------
# stable rank
# ---------------------------------------------------------------------------------------------


def _prepare_stable_rank(W, L, kind, state, iters, backend):
    """Validate and batch the arguments; returns (W3, L, state3, squeeze)."""
    _registry.check_backend_name(backend)
    if kind not in _KINDS:
        raise PrehabError(f"unknown kind {kind!r}; use 'stable' (‖M‖_F²/σ₁²) or 'nuclear' (‖M‖_*²/‖M‖_F²)")
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
        raise PrehabError(f"iters must be None or a non-negative int, got {iters!r}")
    _require_tensor("W", W)
    if W.dim() not in (2, 3):
        raise PrehabError(f"W must be [m, n] or a batch [B, m, n], got shape {_shape(W)}")
    squeeze = W.dim() == 2
    W3 = W.unsqueeze(0) if squeeze else W
    B, m, n = W3.shape
    if B == 0 or m == 0 or n == 0:
        raise PrehabError(f"W must not be empty, got shape {_shape(W)}")
    if L is not None:
        _require_tensor("L", L)
        if L.shape not in ((n, n), (B, n, n)) or (squeeze and L.dim() != 2):
            want = f"[{n}, {n}]" if squeeze else f"[{n}, {n}] or [{B}, {n}, {n}]"
            raise PrehabError(f"L must be {want} to whiten W {_shape(W)} (M = W @ L), got {_shape(L)}")
        if L.requires_grad:
            raise PrehabError(
                "L requires grad, but the whitening factor is treated as a constant; pass L.detach()"
            )
    if state is not None:
        if kind != "stable":
            raise PrehabError("state is only used by kind='stable' (power iteration); pass state=None")
        _require_tensor("state", state)
        want = (n,) if squeeze else (B, n)
        if state.shape != want:
            raise PrehabError(
                f"state must be {list(want)} (the right singular vectors returned by the previous call "
                f"for W {_shape(W)}), got {_shape(state)}; pass state=None to start afresh"
            )
        state = state.detach()
        if squeeze:
            state = state.unsqueeze(0)
    _require_same_device(W=W, L=L, state=state)
    return W3, L, state, squeeze


def _finish_state(new_state: torch.Tensor, kind: str, squeeze: bool) -> Optional[torch.Tensor]:
    if kind != "stable":
        return None
    return new_state[0] if squeeze else new_state


def stable_rank(
    W: torch.Tensor,
    L: Optional[torch.Tensor] = None,
    *,
    kind: str = "stable",
    state: Optional[torch.Tensor] = None,
    iters: Optional[int] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Rank surrogate of M = W L for a batch of matrices, and its gradient with respect to W.

    Args:
        W: [B, m, n] or [m, n].
        L: optional whitening factor (lower-triangular, e.g. the Cholesky factor of the input
            covariance), [n, n] or [B, n, n]; M = W @ L. Treated as a constant.
        kind: ``"stable"``: ‖M‖_F²/σ₁(M)², σ₁ and its singular pair by power iteration on MᵀM;
            ``"nuclear"``: ‖M‖_*²/‖M‖_F², polar factor U Vᵀ by Newton–Schulz.
        state: for ``"stable"``: the state returned by the previous call (right singular vectors
            [B, n] / [n]) to warm-start the power iteration; None starts from a fixed-seed random
            vector. Must be None for ``"nuclear"``.
        iters: power-iteration steps (default 32 cold, 4 warm) or Newton–Schulz steps (default 16).

    Returns:
        (value [B] or [], grad like W's shape, new state [B, n] / [n] or None for "nuclear"), in
        fp32 (fp64 for fp64 W). Nothing is recorded for autograd; use :func:`stable_rank_loss` in a
        training loss. A zero matrix has value 0 and gradient 0. NaN/Inf in W[b] make value[b]
        non-finite (never a plausible number) and leave the other matrices alone; in L they reach
        every matrix it whitens. Nothing is raised: that would need a host sync and would break
        ``torch.compile(fullgraph=True)``.
    """
    W3, L, state3, squeeze = _prepare_stable_rank(W, L, kind, state, iters, backend)
    with torch.no_grad():
        value, grad, new_state = library.stable_rank_op(W3, L, kind, state3, iters, backend)
    if squeeze:
        value, grad = value[0], grad[0]
    return value, grad, _finish_state(new_state, kind, squeeze)


def stable_rank_loss(
    W: torch.Tensor,
    L: Optional[torch.Tensor] = None,
    *,
    kind: str = "stable",
    state: Optional[torch.Tensor] = None,
    iters: Optional[int] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Like :func:`stable_rank` but returns (value, new_state) with value differentiable w.r.t. W.

    The backward pass reuses the gradient computed in the forward pass (no second power iteration
    or Newton–Schulz): dW = grad_value · grad. Keep ``new_state`` and pass it as ``state`` next step.
    """
    W3, L, state3, squeeze = _prepare_stable_rank(W, L, kind, state, iters, backend)
    value, _grad, new_state = library.stable_rank_op(W3, L, kind, state3, iters, backend)
    if squeeze:
        value = value[0]
    return value, _finish_state(new_state, kind, squeeze)


# ---------------------------------------------------------------------------------------------
# low-rank linear
# ---------------------------------------------------------------------------------------------


def _autocast(x, U, V, bias):
    """Under torch.autocast, run in the autocast dtype like nn.Linear would."""
    dev = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except (TypeError, RuntimeError):  # device type without autocast support
        return x, U, V, bias
    if not enabled or x.dtype == torch.float64:  # autocast leaves fp64 alone, like nn.Linear
        return x, U, V, bias
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), U.to(dt), V.to(dt), None if bias is None else bias.to(dt)


def lowrank_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = (x Vᵀ) Uᵀ + bias``: x [..., in], V [r, in], U [out, r], bias [out] -> y [..., out].

    Differentiable with respect to x, U, V and bias; one custom op under ``torch.compile``.
    """
    _registry.check_backend_name(backend)
    _require_tensor("x", x)
    _require_tensor("U", U)
    _require_tensor("V", V)
    if bias is not None:
        _require_tensor("bias", bias)
    if U.dim() != 2 or V.dim() != 2:
        raise PrehabError(f"U must be [out, r] and V [r, in]; got U {_shape(U)}, V {_shape(V)}")
    if U.shape[1] != V.shape[0]:
        raise PrehabError(f"rank mismatch: U {_shape(U)} has rank {U.shape[1]}, V {_shape(V)} has {V.shape[0]}")
    if x.dim() < 1 or x.shape[-1] != V.shape[1]:
        raise PrehabError(f"x must be [..., {V.shape[1]}] (V is {_shape(V)}), got {_shape(x)}")
    if bias is not None and bias.shape != (U.shape[0],):
        raise PrehabError(f"bias must be [{U.shape[0]}] (U is {_shape(U)}), got {_shape(bias)}")
    _require_same_device(x=x, U=U, V=V, bias=bias)
    x, U, V, bias = _autocast(x, U, V, bias)
    for name, t in (("U", U), ("V", V), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise PrehabError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    return library.lowrank_linear_op(x, U, V, bias, backend)
