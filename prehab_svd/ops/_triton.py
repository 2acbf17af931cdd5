"""The Triton backend: one kernel file per op in ``prehab_svd/kernels/`` (installed as ``prehab_svd.kernels``).

Registration is lazy: importing prehab_svd does not import Triton. Each op's Triton implementation
is looked up in its kernel module on first use. Where it can run:

* on CUDA tensors in fp32, fp16 and bf16 when Triton is installed and sees a GPU driver;
* on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``), in fp32 and fp16 only: the
  interpreter's bf16 ``tl.dot`` is wrong under TRITON_INTERPRET (measured with Triton 3.9: errors of ~1e10), so bf16 is tested on the GPU.

No kernel takes fp64 (tensor cores have no fp64 path; an fp64 FMA kernel would not beat cuBLAS's
DGEMM), so ``supports`` is False for it and for any other dtype: "auto" then falls back to torch, and
``backend="triton"`` raises BackendUnavailableError naming the backends that can run it, instead of
a launcher's TypeError.

Priority: below the torch backend (-10) until a GPU benchmark in bench/ shows the kernel faster on
the device; ``backend="triton"`` or ``PREHAB_SVD_BACKEND=triton`` selects it explicitly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import _registry

__all__ = ["register_all", "interpreting", "triton_available", "KERNEL_MODULES"]

# op name -> (module under prehab_svd.kernels, launcher function name)
KERNEL_MODULES = {
    "covariance_update": ("covariance", "covariance_update"),
    "stable_rank": ("stable_rank", "stable_rank"),
    "lowrank_linear": ("lowrank_linear", "lowrank_linear"),
}
PRIORITY = -10  # raise per op once bench/ shows it faster on the GPU (record the measurement here)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every kernel file takes
_INTERPRETER_DTYPES = (torch.float32, torch.float16)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _module_available(module: str) -> bool:
    return importlib.util.find_spec(f"prehab_svd.kernels.{module}") is not None


def _supports(module: str):
    def supports(device: torch.device, dtype: torch.dtype) -> bool:
        if not (triton_available() and _module_available(module)):
            return False
        if device.type == "cuda":
            return dtype in _CUDA_DTYPES and not interpreting()
        if device.type == "cpu":
            return interpreting() and dtype in _INTERPRETER_DTYPES
        return False

    return supports


def _lazy(module: str, fn_name: str):
    cache = {}

    def impl(*args):
        fn = cache.get("fn")
        if fn is None:
            fn = cache["fn"] = getattr(importlib.import_module(f"prehab_svd.kernels.{module}"), fn_name)
        return fn(*args)

    impl.__name__ = f"triton_{fn_name}"
    return impl


def register_all() -> list[str]:
    """Register the Triton implementation of every op whose kernel file exists; returns the ops."""
    done = []
    for op, (module, fn_name) in KERNEL_MODULES.items():
        if not _module_available(module):
            continue
        _registry.register(op, "triton", _lazy(module, fn_name), supports=_supports(module),
                           priority=PRIORITY, replace=True)
        done.append(op)
    return done
