#!/usr/bin/env bash
# CI: every Triton kernel compiled ahead of time for sm_90a, with the spill check, on a machine with
# no GPU, for the Triton versions the project supports at both ends:
#   * Triton 3.9 (the main venv, .venv, made by scripts/env.sh);
#   * Triton 3.6 (the lent GPU machine's version), installed with a numpy < 2.4 into build/triton36
#     (git-ignored) and put first on PYTHONPATH for these runs only; nothing else changes.
# Each run is `prehab-svd kernels`, which exits non-zero when a kernel configuration does not compile,
# exceeds the shared memory, is a tensor-core kernel without wgmma, spills a register (ptxas -v), or
# asks for 16-byte loads and has none. Then, under Triton 3.6, tests/test_aot.py and the interpreter tests of the covariance
# and stable-rank kernels (Triton 3.6's interpreter needs numpy < 2.4; setup.py's extra "triton36"
# declares that pair) and their AOT tests (the subprocess inherits PYTHONPATH: compiled by 3.6).
# The tables are written to build/aot_table_triton*.txt. About 4 minutes on 2 cores.
#
#   bash scripts/aot_check.sh            # ARCH=90 by default
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/env.sh"   # the main venv (created and installed when missing), cd "$ROOT"
ARCH="${ARCH:-90}"
T36="$ROOT/build/triton36"
export TRITON_DEFAULT_FP_FUSION=1   # Triton 3.9's default, stated (silences its warning)
start=$(date +%s)
mkdir -p "$ROOT/build"

have36() {
    PYTHONPATH="$T36" python -c "import sys, numpy, triton; from packaging.version import Version as V; \
sys.exit(not (triton.__version__ == '3.6.0' and V(numpy.__version__) < V('2.4') and triton.__file__.startswith('$T36')))" 2>/dev/null
}
if ! have36; then
    rm -rf "$T36"
    python -m pip install -q --no-deps --target "$T36" "triton==3.6.0" "numpy>=1.26,<2.4"
    have36 || { echo "aot_check: FAILED: Triton 3.6 did not install into $T36" >&2; exit 1; }
fi

status=0
for which in main 3.6; do
    if [ "$which" = main ]; then pp="${PYTHONPATH:-}"; else pp="$T36${PYTHONPATH:+:$PYTHONPATH}"; fi
    version=$(PYTHONPATH="$pp" python -c "import triton; print(triton.__version__)")
    out="$ROOT/build/aot_table_triton$version.txt"
    echo "aot_check: Triton $version, sm_$ARCH"
    if PYTHONPATH="$pp" prehab-svd kernels --arch "$ARCH" >"$out" 2>&1; then
        tail -n 1 "$out"
    else
        cat "$out" >&2
        echo "aot_check: FAILED with Triton $version (table above, also in $out)" >&2
        status=1
    fi
done
echo "aot_check: tests/test_aot.py and the interpreter + AOT tests of covariance and stable rank under Triton 3.6"
PYTHONPATH="$T36${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -q -p no:cacheprovider \
    -W ignore::DeprecationWarning tests/test_aot.py tests/test_triton_covariance.py tests/test_triton_stable_rank.py \
    || status=1
echo "aot_check: $([ $status = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s"
exit $status
