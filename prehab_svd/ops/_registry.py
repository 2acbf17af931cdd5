"""Backend registry: which implementation of which op runs.

The registry is a dict ``op name -> {backend name: BackendImpl}``. Every op has a plain-torch
implementation (registered by :mod:`prehab_svd.ops.library`); a Triton or CUDA implementation is added
later with one call, without touching any caller::

    from prehab_svd.ops._registry import register
    register("lowrank_linear", "triton", my_kernel_fn,
             supports=lambda device, dtype: device.type == "cuda", priority=10)

``backend="auto"`` (or the ``PREHAB_SVD_BACKEND`` environment variable, read at call time, which
overrides "auto" but never an explicit choice) picks the registered backend with the highest priority
whose ``supports(device, dtype)`` is true. Priorities encode "the measured fastest wins"; record the
measurement that justifies a priority next to the registration.

An implementation takes the op's tensor arguments positionally, exactly as the custom op receives
them (see :mod:`prehab_svd.ops.library` for each op's signature), and never the backend name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import PrehabError

__all__ = [
    "BACKENDS",
    "VALID_BACKENDS",
    "OPS",
    "ENV_VAR",
    "BackendImpl",
    "BackendUnavailableError",
    "register",
    "unregister",
    "registered_backends",
    "available_backends",
    "check_backend_name",
    "resolve",
    "get_impl",
]

OPS = ("covariance_update", "stable_rank", "lowrank_linear")
BACKENDS = ("torch", "triton", "cuda")
VALID_BACKENDS = ("auto",) + BACKENDS
ENV_VAR = "PREHAB_SVD_BACKEND"


class BackendUnavailableError(PrehabError, NotImplementedError):
    """The requested backend is not implemented (yet) or cannot run these tensors here."""


def _supports_everything(device: torch.device, dtype: torch.dtype) -> bool:
    return True


@dataclass(frozen=True)
class BackendImpl:
    """One implementation of one op.

    ``fn`` does the work; ``supports(device, dtype)`` says whether it can run tensors of that device
    and dtype in this process (check here that Triton imports, that the CUDA extension loaded, ...);
    ``priority`` orders the candidates for "auto" (higher wins).
    """

    fn: Callable
    supports: Callable[[torch.device, torch.dtype], bool] = _supports_everything
    priority: int = 0


_REGISTRY: dict[str, dict[str, BackendImpl]] = {op: {} for op in OPS}


def _check_op(op: str) -> dict[str, BackendImpl]:
    try:
        return _REGISTRY[op]
    except KeyError:
        raise PrehabError(f"unknown op {op!r}; the ops are {', '.join(OPS)}") from None


def register(
    op: str,
    backend: str,
    fn: Callable,
    *,
    supports: Optional[Callable[[torch.device, torch.dtype], bool]] = None,
    priority: int = 0,
    replace: bool = False,
) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    impls = _check_op(op)
    if backend not in BACKENDS:
        raise PrehabError(f"unknown backend {backend!r}; register one of {', '.join(BACKENDS)}")
    if backend in impls and not replace:
        raise PrehabError(
            f"backend {backend!r} of op {op!r} is already registered; pass replace=True to override it"
        )
    impls[backend] = BackendImpl(fn, supports or _supports_everything, int(priority))


def unregister(op: str, backend: str) -> None:
    """Remove a registration (tests use this to undo a stand-in backend)."""
    impls = _check_op(op)
    if backend not in impls:
        raise PrehabError(f"backend {backend!r} of op {op!r} is not registered")
    del impls[backend]


def registered_backends(op: str) -> list[str]:
    """Names of the backends registered for ``op`` (whether or not they can run here)."""
    return sorted(_check_op(op), key=lambda b: -_REGISTRY[op][b].priority)


def _runs(impl: BackendImpl, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> bool:
    if device is None and dtype is None:
        return True
    device = torch.device("cpu") if device is None else device
    dtype = torch.float32 if dtype is None else dtype
    try:
        return bool(impl.supports(device, dtype))
    except Exception:  # a broken availability check must not break dispatch
        return False


def available_backends(
    op: str, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None
) -> list[str]:
    """The backends that can run ``op`` here, best first (the first is what "auto" picks).

    With ``device``/``dtype`` given, only those that support tensors of that device and dtype.
    """
    impls = _check_op(op)
    dev = None if device is None else torch.device(device)
    names = [b for b, impl in impls.items() if _runs(impl, dev, dtype)]
    return sorted(names, key=lambda b: -impls[b].priority)


def check_backend_name(backend: str) -> str:
    """Validate a ``backend=`` argument; returns it unchanged."""
    if not isinstance(backend, str) or backend not in VALID_BACKENDS:
        raise PrehabError(
            f"unknown backend {backend!r}; use one of {', '.join(repr(b) for b in VALID_BACKENDS)}"
        )
    return backend


def _requested(backend: str) -> tuple[str, bool]:
    """Apply the environment override: returns (backend, whether it came from the variable)."""
    if backend != "auto":
        return check_backend_name(backend), False
    env = os.environ.get(ENV_VAR)
    if not env:
        return "auto", False
    env = env.strip().lower()
    if env not in VALID_BACKENDS:
        raise PrehabError(
            f"environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} is not a backend; set it to one of "
            f"{', '.join(VALID_BACKENDS)} or unset it"
        )
    return env, True


def _auto(impls: dict[str, BackendImpl], device: torch.device, dtype: torch.dtype) -> Optional[str]:
    best, best_priority = None, None
    for name, impl in impls.items():
        if (best_priority is None or impl.priority > best_priority) and (
            impl.supports is _supports_everything or _runs(impl, device, dtype)
        ):
            best, best_priority = name, impl.priority
    return best


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend name that runs ``op`` for these tensors (raises if the request cannot be met)."""
    impls = _check_op(op)
    name, from_env = _requested(backend)
    if name == "auto":
        best = _auto(impls, device, dtype)
        if best is not None:
            return best
        else:
            raise BackendUnavailableError(
                f"no backend of op {op!r} supports {device.type} tensors of dtype {dtype}"
                f" (registered: {', '.join(registered_backends(op)) or 'none'})"
            )
    impl = impls.get(name)
    source = f"{ENV_VAR}={name}" if from_env else f"backend={name!r}"
    if impl is None:
        raise BackendUnavailableError(
            f"the {name!r} backend of op {op!r} is not available yet ({source}); it has no implementation"
            f" in this version of prehab_svd. Available: {', '.join(available_backends(op)) or 'none'};"
            f" use backend='auto' or 'torch'" + (f", or unset {ENV_VAR}" if from_env else "")
        )
    if not _runs(impl, device, dtype):
        raise BackendUnavailableError(
            f"the {name!r} backend of op {op!r} is not available for {device.type} tensors of dtype {dtype}"
            f" ({source}); backends that can run them: "
            f"{', '.join(available_backends(op, device, dtype)) or 'none'}"
        )
    return name


def get_impl(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The implementation function that runs ``op`` for these tensors."""
    return _REGISTRY[op][resolve(op, backend, device, dtype)].fn
