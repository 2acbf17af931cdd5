"""What ``prehab-svd kernels`` says about the CUDA backend (the extension ``prehab_svd._C``).

Built or not (and why not, and how to build it); where built: for which GPU architectures and, per
kernel, registers, shared memory, stack frame and spill bytes. Needs no GPU. The numbers come from
``cuobjdump --dump-resource-usage`` of the built shared object (found in CUDA_HOME, on PATH, or the copy
Triton ships); spill bytes come from the compiler's own ``-Xptxas -v`` report when the build log is at
hand (``build/cuda_build.log``, written by scripts/cuda_build_check.sh, or ``$PREHAB_SVD_PTXAS_LOG``),
else they are bounded by the stack frame: spills live in it, so a 0-byte stack frame proves none.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["KernelResources", "cuda_report", "resource_usage", "ptxas_spills", "find_cuobjdump", "so_path"]

MODULE = "prehab_svd._C"
PTXAS_LOG_ENV = "PREHAB_SVD_PTXAS_LOG"


@dataclass
class KernelResources:
    name: str          # demangled, shortened (kernel<template args>)
    mangled: str
    arch: str          # e.g. sm_90a
    registers: int
    shared: int        # static shared memory, bytes
    stack: int         # stack frame, bytes (where spills would live)
    local: int         # local memory, bytes
    spill: Optional[int] = None  # spill stores + loads from ptxas -v (None: not in a log at hand)

    @property
    def spill_bound(self) -> int:
        """Spill bytes: exact from ptxas when known, else the stack frame (an upper bound; 0 proves 0)."""
        return self.spill if self.spill is not None else self.stack + self.local


def so_path() -> Optional[str]:
    """Path of the built extension, without importing it (None when there is none)."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def find_cuobjdump() -> Optional[str]:
    cands = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cands.append(os.path.join(home, "bin", "cuobjdump"))
    which = shutil.which("cuobjdump")
    if which:
        cands.append(which)
    try:
        spec = importlib.util.find_spec("triton")
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                cands.append(os.path.join(loc, "backends", "nvidia", "bin", "cuobjdump"))
    except (ImportError, ValueError):
        pass
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, timeout=60,
                             check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    return {n: d for n, d in zip(names, out)} if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> str:
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    s = s.replace("prehab_svd::kern::", "").replace("prehab_svd::", "")
    depth = 0
    for i, ch in enumerate(s):  # cut the parameter list (the first "(" outside template brackets)
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return s[:i]
    return s


def resource_usage(so: str, cuobjdump: Optional[str] = None) -> list[KernelResources]:
    """Per kernel and architecture: registers, shared memory, stack and local bytes, from cuobjdump."""
    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA_HOME/bin, PATH, or Triton's bundled copy)")
    text = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, timeout=300,
                          check=True).stdout
    rows, arch, fn = [], "?", None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"arch\s*=\s*(\S+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"Function\s+(\S+?):?$", line)
        if m:
            fn = m.group(1)
            continue
        if fn is not None and line.startswith("REG:"):
            kv = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            rows.append(KernelResources(fn, fn, arch, int(kv.get("REG", 0)), int(kv.get("SHARED", 0)),
                                        int(kv.get("STACK", 0)), int(kv.get("LOCAL", 0))))
            fn = None
    names = _demangle(sorted({r.mangled for r in rows}))
    for r in rows:
        r.name = _short(names.get(r.mangled, r.mangled))
    return rows


def ptxas_spills(log_text: str) -> dict[tuple[str, str], int]:
    """(mangled name, arch) -> spill stores + loads in bytes, from ``-Xptxas -v`` output."""
    out, name, arch = {}, None, "?"
    for line in log_text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '([^']+)'", line)
        if m:
            name, arch = m.group(1), m.group(2)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name is not None:
            out[(name, arch)] = int(m.group(1)) + int(m.group(2))
    return out


def _ptxas_log() -> Optional[str]:
    cands = [os.environ.get(PTXAS_LOG_ENV, "")]
    cands.append(str(Path(__file__).resolve().parent.parent / "build" / "cuda_build.log"))
    for c in cands:
        if c and os.path.isfile(c):
            return c
    return None


def _table(rows: list[KernelResources]) -> list[str]:
    head = ("cuda kernel", "arch", "regs", "shared (B)", "stack (B)", "spill (B)", "status")
    body = []
    for r in rows:
        spill = r.spill_bound
        spill_txt = str(spill) if r.spill is not None or spill == 0 else f"<={spill}"
        body.append((r.name, r.arch, str(r.registers), str(r.shared), str(r.stack), spill_txt,
                     "ok" if spill == 0 else "SPILLS"))
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body]
    lines.insert(1, "  " + "-" * (len(lines[0]) - 2))
    return lines


def cuda_report() -> tuple[str, bool]:
    """(text, ok): ok is False only when the extension is built but does not load in a CUDA build of
    torch, or a kernel spills registers. Not built is ok (the line says why and how to build)."""
    import torch

    from .ops import _cuda

    title = "CUDA backend (prehab_svd._C)"
    so = so_path()
    if torch.version.cuda is None or so is None:
        return f"{title}: {_cuda.status()}", True
    mod = _cuda.load(jit=False)
    if mod is None:
        return f"{title}: built at {so} but {_cuda.status()}", False
    lines = [f"{title}: built, loads ({so})"]
    try:
        rows = resource_usage(so)
    except Exception as e:
        lines.append(f"  resource usage unavailable: {type(e).__name__}: {e}")
        return "\n".join(lines), True
    log = _ptxas_log()
    if log is not None:
        spills = ptxas_spills(Path(log).read_text(errors="replace"))
        for r in rows:
            r.spill = spills.get((r.mangled, r.arch))
    archs = sorted({r.arch for r in rows})
    lines.append(f"  architectures: {', '.join(archs) or 'none'} (nvcc __CUDA_ARCH_LIST__: {mod.arch_list() or '?'});"
                 f" spill bytes {'from ptxas -v in ' + log if log else 'bounded by the stack frame'}")
    lines += _table(rows)
    bad = [r for r in rows if r.spill_bound > 0]
    lines.append(f"cuda: {len(rows)} kernels for {', '.join(archs) or '-'}, {len(bad)} with spills")
    return "\n".join(lines), not bad and bool(rows)
