"""The CUDA C++ backend: the kernels in ``csrc/``, built as the extension ``prehab_svd._C``.

How the extension gets here:

* ``pip install --no-build-isolation -e .`` builds it (setup.py) when torch is a CUDA build and nvcc is
  found, for sm_90a (or ``TORCH_CUDA_ARCH_LIST``); otherwise the install prints one line saying it was
  skipped and how to build it.
* :func:`load` with ``jit=True`` (or ``backend="cuda"`` with ``PREHAB_SVD_CUDA_JIT=1`` in the
  environment) builds the same sources just in time with ``torch.utils.cpp_extension.load`` on a
  machine where the package was installed without it (minutes; cached by torch afterwards).

Importing prehab_svd never builds or imports the extension. The three ops are registered as backend
``"cuda"`` only where the extension can exist in this process: torch is a CUDA build and the built
module is present, or the just-in-time build was asked for; the module itself is imported on first use.
Elsewhere (a CPU build of torch, no built module) ``backend="cuda"`` raises
:class:`~prehab_svd.ops.BackendUnavailableError`, and :func:`status` says why.

``supports(device, dtype)`` is true for CUDA tensors in fp32/fp16/bf16 on a GPU of compute capability
≥ 8.0 once the module loads; fp64 goes to the torch backend (no fp64 kernels), and so do fp64
accumulators of the covariance op.

Priority: -20, below torch (0) and Triton (-10): raise once bench/ on the GPU shows it faster (no GPU
measurement of this backend exists yet); ``backend="cuda"`` or ``PREHAB_SVD_BACKEND=cuda`` selects it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

from . import _registry, reference

__all__ = ["load", "register_all", "status", "extension_available", "csrc_dir", "PRIORITY", "JIT_ENV",
           "GEMV_MAX_T", "DECODE_MAX_T"]

PRIORITY = -20  # raise once bench/ on the GPU shows it faster (record the measurement here)
JIT_ENV = "PREHAB_SVD_CUDA_JIT"
MODULE = "prehab_svd._C"
JIT_NAME = "prehab_svd_cuda_jit"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# token counts of the low-rank linear's regimes (csrc/prehab_svd.h): GEMV kernels, tensor-core
# decode kernels (16-bit), cuBLAS above
GEMV_MAX_T = 8
DECODE_MAX_T = 64

_state: dict = {"module": None, "error": None, "registered": False}


def _jit_requested() -> bool:
    return os.environ.get(JIT_ENV, "0") not in ("", "0")


def csrc_dir() -> Optional[Path]:
    """The folder with the extension's sources: shipped in the package, or the repository's csrc/."""
    here = Path(__file__).resolve().parent.parent  # prehab_svd/
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "bindings.cpp").is_file() and (cand / "common.cuh").is_file():
            return cand
    return None


def _built_module_present() -> bool:
    try:
        return importlib.util.find_spec(MODULE) is not None
    except (ImportError, ValueError):
        return False


def extension_available() -> bool:
    """True when the extension can be used in this process (imports it if needed; never builds)."""
    return load(jit=False) is not None


def status() -> str:
    """One line: whether the CUDA backend can run here, and if not why and how to get it."""
    from .._cuda_build import skip_hint

    if _state["module"] is not None:
        return f"loaded ({getattr(_state['module'], '__file__', JIT_NAME)})"
    if torch.version.cuda is None:
        return f"not built: torch {torch.__version__} is a CPU build; {skip_hint()}"
    if not _built_module_present():
        return f"not built: no {MODULE} in this install; {skip_hint()}"
    if _state["error"]:
        return f"not loadable: {_state['error']}"
    return f"built ({MODULE}), not loaded yet"


def _jit_build(verbose: bool = False):
    from torch.utils import cpp_extension

    from .. import _cuda_build as cfg

    src = csrc_dir()
    if src is None:
        raise RuntimeError("the CUDA sources (csrc/) are not shipped with this install of prehab_svd")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc / CUDA_HOME not found; set CUDA_HOME to the CUDA toolkit")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.DEFAULT_ARCH_LIST  # no GPU to ask: build for Hopper
    inc, lib = cfg.nvidia_dirs()
    return cpp_extension.load(
        name=JIT_NAME,
        sources=cfg.source_files(str(src)),
        extra_cflags=cfg.CXX_FLAGS,
        extra_cuda_cflags=cfg.NVCC_FLAGS,
        extra_include_paths=[str(src)] + inc,
        extra_ldflags=[f"-L{d}" for d in lib],
        verbose=verbose,
    )


def load(jit: bool = False, verbose: bool = False):
    """The extension module, importing ``prehab_svd._C`` if it was built; else, with ``jit=True``,
    building the sources just in time. Returns None (with :func:`status` saying why) when it cannot.
    Registers the "cuda" backend on success."""
    if _state["module"] is not None:
        return _state["module"]
    if torch.version.cuda is None:
        _state["error"] = f"torch {torch.__version__} is a CPU build"
        return None
    mod = None
    if _built_module_present():
        try:
            mod = importlib.import_module(MODULE)
        except Exception as e:  # e.g. built against another torch
            _state["error"] = f"{MODULE} does not import: {type(e).__name__}: {e}"
    if mod is None and jit:
        try:
            mod = _jit_build(verbose)
        except Exception as e:
            _state["error"] = f"just-in-time build failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
            _state["jit_failed"] = True
            raise
    if mod is None:
        return None
    _state["module"], _state["error"] = mod, None
    register_all(force=True)
    return mod


def _auto_jit() -> bool:
    """Build just in time on first use only when asked for, and not again after a failed build."""
    return _jit_requested() and not _state.get("jit_failed")


def _module():
    mod = load(jit=_auto_jit())
    if mod is None:
        raise _registry.BackendUnavailableError(f"the CUDA extension is not available: {status()}")
    return mod


def _capable(device: torch.device) -> bool:
    try:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(idx) >= (8, 0)
    except Exception:
        return False


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in _DTYPES:
        return False
    if load(jit=_auto_jit()) is None:
        return False
    return _capable(device)


# ---------------------------------------------------------------------------------------------
# the implementations (the op's tensor arguments, positionally; see prehab_svd.ops.library)
# ---------------------------------------------------------------------------------------------


def covariance_update(G, x, C=None, y=None) -> None:
    if G.dtype != torch.float32 or (C is not None and C.dtype != torch.float32) or x.dtype == torch.float64 \
            or (y is not None and y.dtype == torch.float64):
        # fp64 accumulators or inputs: no fp64 kernel (cuBLAS DGEMM through the reference)
        reference.covariance_update(G, x, C, y)
        return
    _module().covariance_update(G, x, C, y)


def stable_rank(W, L, kind, state, iters):
    if kind not in ("stable", "nuclear"):
        raise ValueError(f"unknown kind {kind!r}")
    if W.dtype == torch.float64:
        return reference.stable_rank(W, L, kind, state, iters)  # the compute dtype is fp64: the reference
    mod = _module()
    B, _, n = W.shape
    if kind == "stable":
        v0, iters = reference.power_start(state, B, n, W.device, torch.float32, iters)
        return mod.stable_rank(W, L, v0, False, int(iters))
    return mod.stable_rank(W, L, None, True, int(reference.NUCLEAR_ITERS if iters is None else iters))


def lowrank_linear(x, U, V, bias=None, path: int = 0):
    x2 = x.reshape(-1, x.shape[-1])
    y = _module().lowrank_linear(x2, U, V, bias, path)
    return y.reshape(*x.shape[:-1], U.shape[0])


_IMPLS = {"covariance_update": covariance_update, "stable_rank": stable_rank, "lowrank_linear": lowrank_linear}


def register_all(force: bool = False) -> list[str]:
    """Register the "cuda" backend of every op where the extension can exist in this process (see the
    module docstring); ``force`` registers regardless (after a successful load). Returns the ops."""
    if not force:
        if torch.version.cuda is None:
            return []
        if not (_built_module_present() or _jit_requested()):
            return []
    if _state["registered"]:
        return list(_IMPLS)
    for op, fn in _IMPLS.items():
        _registry.register(op, "cuda", fn, supports=_supports, priority=PRIORITY, replace=True)
    _state["registered"] = True
    return list(_IMPLS)
