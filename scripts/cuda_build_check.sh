#!/usr/bin/env bash
# CI: build the CUDA extension (prehab_svd._C, csrc/) for sm_90a against the CUDA build of torch, on a
# machine with no GPU, in a separate virtual environment (.venv-cuda, git-ignored); then print the
# kernels' resource report (`prehab-svd kernels`) and run tests/test_cuda_ext.py there.
#
# Idempotent: a second run reuses the environment and rebuilds only when csrc/, setup.py or the build
# settings changed (a stamp of their hash). Fails loudly when the build fails, when the module does not
# import, or when ptxas reports register spills in any kernel.
#
#   bash scripts/cuda_build_check.sh            # PREHAB_SVD_CUDA_VENV, TORCH_CUDA_ARCH_LIST override
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PREHAB_SVD_CUDA_VENV:-$ROOT/.venv-cuda}"
PY="${PYTHON:-python3}"
TORCH_SPEC="torch==2.14.1"  # a local CUDA 13 build of torch (pip takes it from this machine in ~1 min); CPU torch cannot build it
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-2}"
LOG="$ROOT/build/cuda_build.log"
STAMP="$VENV/.prehab-svd-cuda-build"
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') and torch.version.cuda else 1)" 2>/dev/null; then
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q "$TORCH_SPEC"   # first: the package's torch range is then satisfied
fi
python -m pip install -q ninja numpy        # ninja: parallel, incremental extension builds

cd "$ROOT"
hash=$( (cat csrc/* setup.py prehab_svd/_cuda_build.py; echo "$TORCH_CUDA_ARCH_LIST") | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$hash" ] || ! python -c "import prehab_svd._C" 2>/dev/null; then
    mkdir -p "$(dirname "$LOG")"
    echo "cuda_build_check: building prehab_svd._C for $TORCH_CUDA_ARCH_LIST (log: $LOG)"
    rm -f prehab_svd/_C.*.so
    if ! python -m pip install -v --no-build-isolation -e ".[test]" >"$LOG" 2>&1; then
        tail -n 80 "$LOG" >&2
        echo "cuda_build_check: FAILED: the CUDA extension did not build (full log: $LOG)" >&2
        exit 1
    fi
    if grep -qE "prehab-svd: skipping the CUDA extension" "$LOG"; then
        grep -E "prehab-svd: skipping" "$LOG" >&2
        echo "cuda_build_check: FAILED: setup.py skipped the CUDA extension" >&2
        exit 1
    fi
    # ptxas -v: every kernel must report "0 bytes spill stores, 0 bytes spill loads"
    n_entries=$(grep -c "Compiling entry function" "$LOG" || true)
    if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$LOG" >&2; then
        echo "cuda_build_check: FAILED: ptxas reports register spills (above)" >&2
        exit 1
    fi
    echo "cuda_build_check: built; ptxas compiled $n_entries kernels, none spills"
    echo "$hash" > "$STAMP"
else
    echo "cuda_build_check: prehab_svd._C is up to date (sources unchanged), not rebuilt"
fi

python -c "import torch, prehab_svd._C as C; print('cuda_build_check: prehab_svd._C imports; arch list', C.arch_list(), 'torch', torch.__version__)"
prehab-svd kernels
python -m pytest tests/test_cuda_ext.py -q
echo "cuda_build_check: passed in $(( $(date +%s) - start )) s"
