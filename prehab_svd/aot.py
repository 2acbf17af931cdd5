"""Ahead-of-time compilation of every Triton kernel for a GPU target, with no GPU needed.

Each kernel module in ``prehab_svd/kernels/`` exposes ``aot_specs()``: the configurations its launcher uses on
Hopper, each a dict with ``name``, ``fn`` (the ``@triton.jit`` kernel), ``signature`` (argument name ->
Triton type such as ``"*bf16"``, ``"i32"``, ``"fp32"`` or ``"constexpr"``), ``constexprs``, optional
``attrs`` (specialization hints such as 16-byte alignment, as the JIT would infer them),
``num_warps``, ``num_stages``, ``tensor_cores`` (True if the kernel must use the tensor cores),
optional ``vector_loads`` (True if its global loads must be 16 bytes wide: the aligned variants) and a
short ``config`` label. :func:`compile_all` compiles each for ``GPUTarget("cuda", arch, 32)`` and
reads:

* shared memory and warps (the compiled kernel's metadata);
* whether the PTX issues ``wgmma`` (Hopper's warpgroup MMA);
* registers per thread and spill stores / loads, from ptxas's own report (``ptxas -v``). Triton's
  compiled kernel knows ``n_regs`` / ``n_spills`` only after it is loaded on a driver, so the report is
  taken from the ptxas run inside ``triton.compile`` (the exact ptxas, flags and cubin the GPU would
  run; ``TRITON_DUMP_PTXAS_LOG``, with the cache bypassed so ptxas runs); if that log is unavailable,
  from Triton's bundled ptxas run again on the PTX (``-v``, same target);
* the widest global load in the PTX, in bytes (``cp.async`` size, ``ld.global.v4`` ...; 16 means the
  loads are vectorized).

A configuration fails when it does not compile, exceeds the shared-memory limit, is a tensor-core
kernel without wgmma, spills registers (any spill store or load), or is marked ``vector_loads`` and
has no 16-byte global loads. This is how a CPU-only CI proves that every kernel compiles for sm_90,
uses the tensor cores and does not spill.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

__all__ = ["AotResult", "compile_all", "compile_specs", "format_table", "parse_ptxas_log", "max_global_load_bytes",
           "jit_specialization", "SHARED_LIMIT"]

# Hopper: up to 227 KiB of shared memory per block (opt-in), 228 KiB per SM.
SHARED_LIMIT = {90: 232448}


@dataclass
class AotResult:
    module: str
    name: str
    config: str
    ok: bool
    shared: int | None = None
    num_warps: int | None = None
    wgmma: bool | None = None
    tensor_cores: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    load_bytes: int | None = None      # widest global load (cp.async or ld.global), bytes
    load_kind: str = ""                # "cp.async", "ld.global" or "tma"
    vector_loads: bool = False         # the spec requires 16-byte loads
    ptxas_source: str = ""             # "triton" (its own ptxas run) or "rerun" (bundled ptxas on the PTX)
    error: str = ""

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores) or bool(self.spill_loads)

    @property
    def vectorized(self) -> bool | None:
        return None if self.load_bytes is None else self.load_bytes >= 16

    @property
    def failed(self) -> bool:
        return bool(self.problems())

    def problems(self) -> list[str]:
        if not self.ok:
            return [self.error or "did not compile"]
        out = []
        if self.tensor_cores and not self.wgmma:
            out.append("no wgmma in a tensor-core kernel")
        if self.registers is None or self.spill_stores is None or self.spill_loads is None:
            out.append("no ptxas register / spill report")
        elif self.spills:
            out.append(f"spills ({self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.vector_loads and not self.vectorized:
            out.append(f"global loads not 16-byte ({self.load_bytes} B widest)")
        return out


def jit_specialization(fn, values: dict, constexprs: dict | None = None) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, specialized as Triton's JIT specializes a
    call with these argument values: ``values`` maps every non-constexpr parameter of ``fn`` to a
    pointer type string (``"*bf16"``: a tensor; assumed 16-byte aligned, as fresh torch allocations
    are), an int, or a float. An int equal to 1 becomes the constant 1, an int divisible by 16 gets
    the ``tt.divisibility`` 16 attribute (what makes Triton vectorize and pipeline loads), other
    ints are ``i32`` (``i64`` past 2³¹), floats ``fp32``. ``constexprs``: the kernel's meta-parameters.
    """
    names = list(fn.arg_names)
    constexprs = dict(constexprs or {})
    missing = [n for n in names if n not in values and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for {missing}")
    sig, attrs = {}, {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
            continue
        v = values[n]
        if isinstance(v, str):
            sig[n] = v
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{fn.__name__}.{n}: expected a pointer type string, an int or a float, got {v!r}")
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif v == 1:
            sig[n] = "constexpr"
            constexprs[n] = 1
        else:
            sig[n] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def _modules():
    from .ops._triton import KERNEL_MODULES

    return [m for m, _ in KERNEL_MODULES.values()]


# ---- ptxas report -------------------------------------------------------------------------------

_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict | None:
    """``ptxas -v`` output -> {"registers", "spill_stores", "spill_loads", "stack"} of its (one) entry
    function; None if the log has no complete report. With several entries, the worst of each."""
    regs = [int(m) for m in _RE_REGS.findall(log)]
    spills = [tuple(int(v) for v in m) for m in _RE_SPILL.findall(log)]
    if not regs or not spills:
        return None
    return {"registers": max(regs), "stack": max(s[0] for s in spills),
            "spill_stores": max(s[1] for s in spills), "spill_loads": max(s[2] for s in spills)}


def _bundled_ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _rerun_ptxas(ptx: str, arch: int) -> str:
    """Triton's bundled ptxas on ``ptx`` with ``-v``; returns its report (stderr)."""
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_bundled_ptxas(), "-lineinfo", "-v", f"--gpu-name=sm_{arch}{suffix}", src,
                               "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-500:]}")
    return proc.stderr + proc.stdout


# ---- global load width in the PTX ----------------------------------------------------------------

_RE_CP_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_RE_LD_GLOBAL = re.compile(r"\bld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def max_global_load_bytes(ptx: str) -> tuple[int | None, str]:
    """(widest global -> register/shared load in bytes, its kind) in ``ptx``; (None, "") if none.
    A TMA bulk copy (cp.async.bulk.tensor) counts as 16 (it moves whole tiles)."""
    best, kind = None, ""
    for m in _RE_CP_ASYNC.finditer(ptx):
        size = int(m.group(1), 0)
        if best is None or size > best:
            best, kind = size, "cp.async"
    for m in _RE_LD_GLOBAL.finditer(ptx):
        size = (int(m.group(1)) if m.group(1) else 1) * int(m.group(2)) // 8
        if best is None or size > best:
            best, kind = size, "ld.global"
    if "cp.async.bulk.tensor" in ptx and (best is None or best < 16):
        best, kind = 16, "tma"
    return best, kind


# ---- compile -------------------------------------------------------------------------------------


def _compile_with_ptxas_log(triton, src, target, options):
    """triton.compile with ptxas's -v report captured from the compile itself (cache bypassed so
    that ptxas runs; Triton prints the log when TRITON_DUMP_PTXAS_LOG is on)."""
    from triton import knobs

    buf = io.StringIO()
    nvidia = getattr(knobs, "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        return triton.compile(src, target=target, options=options), ""
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(buf):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        k = triton.compile(src, target=target, options=options)
    return k, buf.getvalue()


def compile_all(arch: int = 90, modules=None) -> list[AotResult]:
    """Compile every spec of ``modules`` (default: every kernel module) for sm_<arch>."""
    results = []
    for module in (_modules() if modules is None else modules):
        try:
            mod = importlib.import_module(f"prehab_svd.kernels.{module}")
            specs = mod.aot_specs()
        except Exception as e:  # a missing or broken kernel module is a failure, reported
            results.append(AotResult(module, "-", "-", False, error=f"{type(e).__name__}: {e}"))
            continue
        results.extend(compile_specs(module, specs, arch))
    return results


def compile_specs(module: str, specs: list[dict], arch: int = 90) -> list[AotResult]:
    """Compile ``specs`` (the format of ``aot_specs()``) for sm_<arch>; one result per spec."""
    from .errors import PrehabError
    from .ops._triton import interpreting

    if interpreting():
        raise PrehabError("ahead-of-time compilation needs real (not interpreted) kernels: unset "
                          "TRITON_INTERPRET and run again")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    limit = SHARED_LIMIT.get(arch)
    results = []
    for spec in specs:
        res = AotResult(module, spec["name"], spec.get("config", ""), False,
                        tensor_cores=bool(spec.get("tensor_cores")),
                        vector_loads=bool(spec.get("vector_loads")))
        try:
            # attrs (e.g. 16-byte alignment of pointers and strides) make the compiler build the
            # variant that runs on aligned shapes (pipelined loads), not the generic one.
            src = ASTSource(fn=spec["fn"], signature=spec["signature"],
                            constexprs=spec.get("constexprs", {}), attrs=spec.get("attrs"))
            k, log = _compile_with_ptxas_log(
                triton, src, target, {"num_warps": spec.get("num_warps", 4),
                                      "num_stages": spec.get("num_stages", 3)})
            ptx = k.asm["ptx"]
            res.shared = int(k.metadata.shared)
            res.num_warps = int(k.metadata.num_warps)
            res.wgmma = "wgmma" in ptx
            res.load_bytes, res.load_kind = max_global_load_bytes(ptx)
            report, res.ptxas_source = parse_ptxas_log(log), "triton"
            if report is None:
                report, res.ptxas_source = parse_ptxas_log(_rerun_ptxas(ptx, arch)), "rerun"
            if report is not None:
                res.registers = report["registers"]
                res.spill_stores = report["spill_stores"]
                res.spill_loads = report["spill_loads"]
            res.ok = limit is None or res.shared <= limit
            if not res.ok:
                res.error = f"needs {res.shared} B of shared memory, over the {limit} B limit"
        except Exception as e:
            res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results.append(res)
    return results


def _dash(v) -> str:
    return "-" if v is None else str(v)


def format_table(results: list[AotResult], arch: int = 90) -> str:
    rows = [("module", "kernel", "config", "shared (B)", "warps", "wgmma", "regs", "spill st/ld (B)",
             "load (B)", "status")]
    for r in results:
        problems = r.problems()
        status = "ok" if not problems else "FAILED: " + "; ".join(problems)
        spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        load = "-" if r.load_bytes is None else f"{r.load_bytes} {r.load_kind}"
        rows.append((r.module, r.name, r.config, _dash(r.shared), _dash(r.num_warps),
                     "-" if r.wgmma is None else ("yes" if r.wgmma else "no"), _dash(r.registers), spill,
                     load, status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    n_bad = sum(r.failed for r in results)
    n_spill = sum(r.ok and r.spills for r in results)
    try:
        import triton

        version = f"triton {triton.__version__}, "
    except ImportError:  # pragma: no cover - compile_all needs triton anyway
        version = ""
    lines.append(f"sm_{arch} ({version}ptxas -v): {len(results)} kernel configurations, {n_bad} failed, "
                 f"{n_spill} spill")
    return "\n".join(lines)
