"""Ahead-of-time compilation of every Triton kernel for a GPU target, with no GPU needed.

Each kernel module in ``kernels/`` exposes ``aot_specs()``: the configurations its launcher uses on
Hopper, each a dict with ``name``, ``fn`` (the ``@triton.jit`` kernel), ``signature`` (argument name ->
Triton type such as ``"*bf16"``, ``"i32"``, ``"fp32"`` or ``"constexpr"``), ``constexprs``, optional
``attrs`` (specialization hints such as 16-byte alignment, as the JIT would infer them),
``num_warps``, ``num_stages``, ``tensor_cores`` (True if the kernel must use the tensor cores) and a
short ``config`` label. :func:`compile_all` compiles each for ``GPUTarget("cuda", arch, 32)`` and reads
the shared memory, warps, and whether the PTX issues ``wgmma`` (Hopper's warpgroup MMA). This is how
a CPU-only CI proves that every kernel compiles for sm_90 and uses the tensor cores.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["AotResult", "compile_all", "format_table", "SHARED_LIMIT"]

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
    error: str = ""

    @property
    def failed(self) -> bool:
        return not self.ok or (self.tensor_cores and not self.wgmma)


def _modules():
    from .ops._triton import KERNEL_MODULES

    return [m for m, _ in KERNEL_MODULES.values()]


def compile_all(arch: int = 90, modules=None) -> list[AotResult]:
    """Compile every spec of ``modules`` (default: every kernel module) for sm_<arch>."""
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
    for module in (_modules() if modules is None else modules):
        try:
            mod = importlib.import_module(f"prehab_svd.kernels.{module}")
            specs = mod.aot_specs()
        except Exception as e:  # a missing or broken kernel module is a failure, reported
            results.append(AotResult(module, "-", "-", False, error=f"{type(e).__name__}: {e}"))
            continue
        for spec in specs:
            res = AotResult(module, spec["name"], spec.get("config", ""), False,
                            tensor_cores=bool(spec.get("tensor_cores")))
            try:
                # attrs (e.g. 16-byte alignment of pointers and strides) make the compiler build the
                # variant that runs on aligned shapes (pipelined loads), not the generic one.
                src = ASTSource(fn=spec["fn"], signature=spec["signature"],
                                constexprs=spec.get("constexprs", {}), attrs=spec.get("attrs"))
                k = triton.compile(src, target=target,
                                   options={"num_warps": spec.get("num_warps", 4),
                                            "num_stages": spec.get("num_stages", 3)})
                res.shared = int(k.metadata.shared)
                res.num_warps = int(k.metadata.num_warps)
                res.wgmma = "wgmma" in k.asm["ptx"]
                res.ok = limit is None or res.shared <= limit
                if not res.ok:
                    res.error = f"needs {res.shared} B of shared memory, over the {limit} B limit"
            except Exception as e:
                res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results.append(res)
    return results


def format_table(results: list[AotResult], arch: int = 90) -> str:
    rows = [("module", "kernel", "config", "shared (B)", "warps", "wgmma", "status")]
    for r in results:
        status = "ok"
        if not r.ok:
            status = "FAILED: " + r.error
        elif r.tensor_cores and not r.wgmma:
            status = "FAILED: no wgmma in a tensor-core kernel"
        rows.append((r.module, r.name, r.config, "-" if r.shared is None else str(r.shared),
                     "-" if r.num_warps is None else str(r.num_warps),
                     "-" if r.wgmma is None else ("yes" if r.wgmma else "no"), status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    n_bad = sum(r.failed for r in results)
    lines.append(f"sm_{arch}: {len(results)} kernel configurations, {n_bad} failed")
    return "\n".join(lines)
