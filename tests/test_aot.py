"""Tests of the ahead-of-time compilation report (prehab_svd.aot) and of `prehab-svd kernels`' exit
status: the ptxas report parser, the PTX load-width scan, the JIT-specialization rule, a spill as a
failure, and a real kernel that must spill compiled for sm_90a (in a subprocess, interpreter off)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from prehab_svd import aot

LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'covariance_kernel' for 'sm_90a'
ptxas info    : Function properties for covariance_kernel
    48 bytes stack frame, 48 bytes spill stores, 72 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 144 bytes cmem[0]
"""


def test_parse_ptxas_log():
    assert aot.parse_ptxas_log(LOG) == {"registers": 255, "stack": 48, "spill_stores": 48, "spill_loads": 72}
    clean = LOG.replace("48 bytes stack frame, 48 bytes spill stores, 72 bytes spill loads",
                        "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads").replace("255", "168")
    assert aot.parse_ptxas_log(clean) == {"registers": 168, "stack": 0, "spill_stores": 0, "spill_loads": 0}
    assert aot.parse_ptxas_log("ptxas info    : 0 bytes gmem\n") is None  # no report: not "no spill"


def test_max_global_load_bytes():
    assert aot.max_global_load_bytes("\tcp.async.cg.shared.global [ %r570 + 0 ], [ %rd191 + 0 ], 0x10, %r571;") \
        == (16, "cp.async")
    assert aot.max_global_load_bytes("cp.async.ca.shared.global [%r1], [%rd2], 4, %r3;") == (4, "cp.async")
    assert aot.max_global_load_bytes("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];") == (16, "ld.global")
    assert aot.max_global_load_bytes("ld.global.nc.L1::evict_last.v2.b32 {%r1, %r2}, [%rd1];") == (8, "ld.global")
    assert aot.max_global_load_bytes("@%p1 ld.global.b16 {%rs1}, [%rd1 + 0];") == (2, "ld.global")
    assert aot.max_global_load_bytes("st.global.v4.b32 [%rd1], {%r1, %r2, %r3, %r4};") == (None, "")
    assert aot.max_global_load_bytes("cp.async.bulk.tensor.2d.shared::cluster.global [%r1], [%rd1, {%r2, %r3}];") \
        == (16, "tma")


def test_a_spill_or_a_missing_report_is_a_failure():
    ok = aot.AotResult("m", "k", "c", True, shared=1, num_warps=4, wgmma=False, registers=100,
                       spill_stores=0, spill_loads=0, load_bytes=16)
    assert not ok.failed and ok.problems() == []
    for change, word in ((dict(spill_stores=4), "spills"), (dict(spill_loads=8), "spills"),
                         (dict(registers=None), "no ptxas"), (dict(tensor_cores=True), "wgmma"),
                         (dict(vector_loads=True, load_bytes=4), "16-byte")):
        bad = aot.AotResult(**{**ok.__dict__, **change})
        assert bad.failed and word in "; ".join(bad.problems()), change
        assert "FAILED: " in aot.format_table([ok, bad]).splitlines()[3]
    table = aot.format_table([ok, aot.AotResult(**{**ok.__dict__, "spill_stores": 4, "spill_loads": 4})])
    assert table.splitlines()[-1].endswith("2 kernel configurations, 1 failed, 1 spill")


def test_jit_specialization_rule():
    fn = types.SimpleNamespace(arg_names=["x_ptr", "n", "s0", "s1", "s2", "big", "alpha", "BLOCK"], __name__="k")
    sig, ce, attrs = aot.jit_specialization(fn, dict(x_ptr="*bf16", n=4093, s0=4096, s1=1, s2=0, big=2 ** 31,
                                                     alpha=0.5), {"BLOCK": 64})
    assert sig == {"x_ptr": "*bf16", "n": "i32", "s0": "i32", "s1": "constexpr", "s2": "i32", "big": "i64",
                   "alpha": "fp32", "BLOCK": "constexpr"}
    assert ce == {"BLOCK": 64, "s1": 1}
    assert set(attrs) == {(0,), (2,), (4,), (5,)}  # the pointer, 4096, 0 and 2³¹: divisible by 16
    with pytest.raises(ValueError, match="no value"):
        aot.jit_specialization(fn, dict(x_ptr="*bf16"), {"BLOCK": 64})


def test_cli_kernels_exits_nonzero_on_a_spill(monkeypatch, capsys):
    from prehab_svd import cli, cuda_report

    clean = aot.AotResult("m", "k", "c", True, shared=1, num_warps=4, wgmma=False, registers=100,
                          spill_stores=0, spill_loads=0, load_bytes=16)
    monkeypatch.setattr(cuda_report, "cuda_report", lambda: ("CUDA backend: not built", True))
    monkeypatch.setattr(aot, "compile_all", lambda arch: [clean])
    assert cli.cmd_kernels(types.SimpleNamespace(arch=90)) == 0
    spilled = aot.AotResult(**{**clean.__dict__, "spill_stores": 8, "spill_loads": 8})
    monkeypatch.setattr(aot, "compile_all", lambda arch: [clean, spilled])
    assert cli.cmd_kernels(types.SimpleNamespace(arch=90)) == 1
    assert "FAILED: spills (8 B stores, 8 B loads)" in capsys.readouterr().out


_SPILLER = '''
import triton
import triton.language as tl


@triton.jit
def spiller(x_ptr, o_ptr, BLOCK: tl.constexpr):
    """One warp holds a BLOCK x BLOCK fp32 tile (512 values per thread at 128) live across a row
    reduction: more than the 255 registers a thread can have, so ptxas must spill."""
    offs = tl.arange(0, BLOCK)
    ptrs = offs[:, None] * BLOCK + offs[None, :]
    x = tl.load(x_ptr + ptrs)
    tl.store(o_ptr + ptrs, tl.sum(x * x, axis=1)[:, None] * x)
'''

_SCRIPT = '''
import json, sys
sys.path.insert(0, sys.argv[1])
from spiller_mod import spiller
from prehab_svd import aot
specs = [dict(name="spiller", fn=spiller, signature={"x_ptr": "*fp32", "o_ptr": "*fp32", "BLOCK": "constexpr"},
              constexprs={"BLOCK": b}, attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]},
              num_warps=1, num_stages=1, config=f"BLOCK {b}") for b in (16, 128)]
res = aot.compile_specs("test", specs)
print(json.dumps({"table": aot.format_table(res),
                  "rows": [dict(failed=r.failed, spills=r.spills, registers=r.registers, st=r.spill_stores,
                                ld=r.spill_loads, src=r.ptxas_source) for r in res]}))
'''


@pytest.mark.skipif(sys.platform != "linux", reason="Triton compiles for CUDA on Linux x86-64 only")
def test_a_kernel_that_must_spill_is_reported(tmp_path):
    """A real compile for sm_90a through compile_specs: the small tile fits (no spill, ok), the big
    one cannot fit in 255 registers and is reported as spilling and failed."""
    pytest.importorskip("triton")
    (tmp_path / "spiller_mod.py").write_text(_SPILLER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    small, big = out["rows"]
    assert not small["failed"] and not small["spills"] and small["registers"] < 255, out["table"]
    assert big["failed"] and big["spills"] and big["st"] > 0 and big["ld"] > 0, out["table"]
    assert small["src"] == big["src"] == "triton", out["table"]
