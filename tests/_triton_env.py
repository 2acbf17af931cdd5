"""Shared set-up of the Triton kernel tests.

Where there is no GPU the kernels run in Triton's CPU interpreter, which must be chosen before triton
is imported (triton.jit reads it when it decorates), so the test modules import this first. On a GPU
machine the compiled kernels run. Ahead-of-time compilation runs in a subprocess with the interpreter
off: kernels defined while TRITON_INTERPRET=1 are InterpretedFunctions, which cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")


def interpret_on() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpret_on()
CUDA = torch.cuda.is_available() and not INTERPRET
DEV = "cuda" if CUDA else "cpu"

cannot_run = pytest.mark.skipif(
    not (CUDA or INTERPRET),
    reason="no CUDA GPU and the Triton interpreter is off (TRITON_INTERPRET was set to 0 before the "
           "tests were imported): the Triton kernels cannot run",
)


def needs_cuda_for(what: str):
    return pytest.mark.skipif(
        not CUDA, reason=f"needs a CUDA GPU with compiled Triton ({what}; the interpreter's bf16 tl.dot "
                         "is wrong)" + (" — TRITON_INTERPRET is on" if INTERPRET else ""))


def run_aot_script(script: str, timeout: int = 900) -> dict:
    """Run ``script`` (which prints one JSON line last) with the interpreter off; return the JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
