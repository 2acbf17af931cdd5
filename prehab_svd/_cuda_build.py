"""Build settings of the CUDA extension, shared by setup.py (ahead of time) and
:func:`prehab_svd.ops._cuda.load` (just in time), so both compile the same way.

Kept free of package imports: setup.py loads this file by path, before the package is installed.
"""

from __future__ import annotations

import glob
import importlib.util
import os

__all__ = ["NVCC_FLAGS", "CXX_FLAGS", "DEFAULT_ARCH_LIST", "source_files", "nvidia_dirs", "skip_hint"]

# -lineinfo: source lines in ncu / compute-sanitizer reports at no run-time cost. -Xptxas -v: the
# compiler's per-kernel resource report (registers, shared memory, spill bytes) in the build log.
# No --use_fast_math: the reductions divide and take square roots in IEEE fp32, like the reference.
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
CXX_FLAGS = ["-O3"]
# Hopper with its arch-specific features (the target of the kernels); TORCH_CUDA_ARCH_LIST, when
# set, wins (e.g. "8.0;9.0a" for A100 + H100; the kernels need compute capability >= 8.0).
DEFAULT_ARCH_LIST = "9.0a"


def source_files(csrc: str) -> list[str]:
    """The translation units of the extension in folder ``csrc`` (sorted, so builds are stable)."""
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))


def nvidia_dirs() -> tuple[list[str], list[str]]:
    """(include dirs, library dirs) of the CUDA wheels installed beside a CUDA build of torch.

    A pip-installed CUDA 13 torch brings cuBLAS and friends as the ``nvidia/cu13`` wheel (headers such
    as cublas_v2.h and cusparse.h live there, not in a bare CUDA_HOME); older wheels use one folder per
    library (``nvidia/cublas/include``). Missing folders are skipped.
    """
    inc, lib = [], []
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return inc, lib
    for root in spec.submodule_search_locations:
        for sub in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            base = os.path.join(root, sub)
            if os.path.isdir(os.path.join(base, "include")) and (sub.startswith("cu") or sub in
                                                                ("cublas", "cusparse", "cuda_runtime")):
                inc.append(os.path.join(base, "include"))
            for libdir in ("lib", "lib64"):
                if os.path.isdir(os.path.join(base, libdir)) and (sub.startswith("cu") or sub in
                                                                 ("cublas", "cusparse", "cuda_runtime")):
                    lib.append(os.path.join(base, libdir))
    return inc, lib


def skip_hint() -> str:
    return ("to build it, install a CUDA build of torch and re-run `pip install --no-build-isolation -e .` "
            "(with CUDA_HOME set), or call prehab_svd.ops._cuda.load(jit=True)")
