#!/usr/bin/env bash
# The first GPU check: ONE command, under 9 minutes on the lent H100/H200 (PyTorch 2.11, Triton 3.6,
# Python 3.12, no network). Every stage has its own timeout; a failing or hanging stage is recorded and
# the next one runs. Results under $OUT (8 files at most); the summary table is printed LAST.
#
#   bash bench/gpu_first.sh             # on the device machine (device tool: run, timeout_s 560)
#   bash bench/gpu_first.sh --dry-run   # any machine, about a minute: every stage wired, run small on CPU
#
# Stages (cap in seconds; the whole run stops starting work after GPU_FIRST_BUDGET_S, default 520):
#   env        GPU, driver, clocks, SMs, versions (python, torch, triton, CUDA, nvcc, sanitizer)     20
#   install    the package, editable, without the extension (PREHAB_SVD_NO_CUDA=1, no network)       90
#   build      the CUDA extension for sm_90a IN THE BACKGROUND (setup.py build_ext into a scratch
#              folder; ptxas -v in build.log), placed into prehab_svd/ only when done   300 from its start
#   triton     tests/test_triton_*.py on the GPU (bf16/fp16/fp32, odd shapes, NaN-prefilled outputs;
#              the AOT compile tests are left to the CPU CI)                                         150
#   sanitize   compute-sanitizer memcheck over bench/sanitize_ops.py (every op, backend and path once),
#              the Triton and torch paths while the extension still builds                         150
#   cuda       tests/test_cuda_ext.py against the built extension                                   100
#   sanitize-cuda  the same memcheck over the CUDA extension's paths (appended to sanitizer.log)    150
#              (neither sanitizer stage eats into the 170 s kept for the ratios)
#   ratios     bench/ratios.py at LLaMA-7B shapes: every backend against the strongest torch path (and
#              the dense layer), eager and CUDA graphs, rel. error vs float64         what is left - 15
#
# $OUT: gpu_first.log (this console), build.log, tests_triton.log, tests_cuda.log, sanitizer.log,
# ratios.json, ratios.log, summary.md (environment, stage table, ratio table: commit it as
# results/gpu_first_<device>.md, see README "Running the GPU check").
# GPU_FIRST_BUILD=jit builds with torch.utils.cpp_extension.load instead (PREHAB_SVD_CUDA_JIT=1 for the
# later stages); GPU_FIRST_STAGES="triton ratios" runs only those (env and install always run).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$ROOT/out/gpu_first}"
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_first.XXXXXX")
export PY="${PYTHON:-python3}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
BUDGET=${GPU_FIRST_BUDGET_S:-520}
RATIO_RESERVE=${GPU_FIRST_RATIO_RESERVE_S:-170}
BUILD_MODE=${GPU_FIRST_BUILD:-aot}
WANT=${GPU_FIRST_STAGES:-build triton cuda sanitize ratios}
START=$(date +%s)
# shellcheck source=bench/gpu_lib.sh
. "$ROOT/bench/gpu_lib.sh"

declare -a ROWS=()
FAILED=0

left() { echo $((BUDGET - ($(date +%s) - START))); }
wanted() { [[ " $WANT " == *" $1 "* ]]; }
record() {  # record STAGE STATUS SECONDS NOTE
    ROWS+=("| $1 | $2 | $3 | $4 |")
    [ "$2" = ok ] || [ "$2" = skipped ] || FAILED=1
    echo "== stage $1: $2 (${3} s) $4"
}
run_stage() {  # run_stage NAME CAP LOG CMD... : runs under `timeout`, output to LOG (tail on failure)
    local name=$1 cap=$2 log=$3
    shift 3
    local t
    t=$(left)
    [ "$cap" -lt "$t" ] && t=$cap
    if [ "$t" -lt 10 ]; then
        record "$name" skipped 0 "no budget left"
        return 0
    fi
    echo "== stage $name: up to ${t} s: $*"
    local t0 rc status note
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    note="$(basename "$log"): $(grep -E '^=* ?[0-9]+ (passed|failed|errors?|skipped|deselected|tests? collected)|collected|^sanitize_ops:|ERROR SUMMARY|^complete:' "$log" | tail -n 2 | tr '\n' ' ' | cut -c1-200)"
    [ "$rc" -ne 0 ] && tail -n 15 "$log"
    record "$name" "$status" $(($(date +%s) - t0)) "$note"
    return 0
}

main() {
    echo "gpu_first: $(date -u +%H:%M:%S) budget ${BUDGET} s, out $OUT$([ $DRY = 1 ] && echo ', DRY RUN (CPU, small)')"

    # -- env ------------------------------------------------------------------------------------
    timeout 20 bash -c ". bench/gpu_lib.sh; gpu_env_facts" >"$WORK/env.txt" 2>&1
    cat "$WORK/env.txt"
    record env ok $(($(date +%s) - START)) "env facts in summary.md"

    # -- install --------------------------------------------------------------------------------
    local t0
    t0=$(date +%s)
    if [ $DRY = 1 ]; then
        "$PY" -c "import prehab_svd.kernels" && record install ok 0 "dry run: importable, nothing installed" \
            || record install FAILED 0 "prehab_svd.kernels does not import"
    elif timeout 90 bash -c ". bench/gpu_lib.sh; gpu_install '$WORK/install.log'"; then
        record install ok $(($(date +%s) - t0)) ""
    else
        record install FAILED $(($(date +%s) - t0)) "running from the tree (PYTHONPATH)"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi

    # -- build (background) ---------------------------------------------------------------------
    local build_pid="" build_t0
    build_t0=$(date +%s)
    if wanted build; then
        echo "== stage build: started in the background (${BUILD_MODE}; log build.log)"
        if [ $DRY = 1 ]; then  # the same wiring, no compiler: the sources and build settings load
            (timeout 60 "$PY" -c "from prehab_svd import _cuda_build as c; print('dry run: sources', c.source_files('csrc')); print('nvcc flags', c.NVCC_FLAGS)" \
                >"$OUT/build.log" 2>&1; echo $? >"$WORK/build.rc") &
        elif [ "$BUILD_MODE" = jit ]; then
            (timeout 300 "$PY" -c "from prehab_svd.ops import _cuda; m = _cuda.load(jit=True, verbose=True); print('jit build loaded:', m)" \
                >"$OUT/build.log" 2>&1; echo $? >"$WORK/build.rc") &
        else
            (timeout 300 bash -c ". bench/gpu_lib.sh; gpu_build_ext '$OUT/build.log' '$WORK/ext'"; echo $? >"$WORK/build.rc") &
        fi
        build_pid=$!
    fi

    # -- Triton tests ---------------------------------------------------------------------------
    local tri=(tests/test_triton_covariance.py tests/test_triton_lowrank_linear.py tests/test_triton_stable_rank.py)
    local popts=(-q -rs -p no:cacheprovider -k "not aot")
    if wanted triton; then
        if [ $DRY = 1 ]; then
            run_stage triton 120 "$OUT/tests_triton.log" "$PY" -m pytest --collect-only "${popts[@]}" "${tri[@]}"
        else
            local par=()
            "$PY" -c "import xdist" 2>/dev/null && par=(-n 4)
            "$PY" -c "import pytest_timeout" 2>/dev/null && par+=(-o timeout=90)
            run_stage triton 150 "$OUT/tests_triton.log" "$PY" -m pytest "${popts[@]}" "${par[@]}" "${tri[@]}"
        fi
    fi

    # -- compute-sanitizer memcheck, part 1: the Triton and torch paths (while the build runs) ---------
    local san
    san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
    sanitize() {  # sanitize STAGE CAP LOG BACKENDS...
        local stage=$1 cap=$2 log=$3
        shift 3
        if [ $DRY = 1 ]; then
            run_stage "$stage" 60 "$log" "$PY" bench/sanitize_ops.py --list --backends "$@"
        elif [ -z "$san" ]; then
            record "$stage" FAILED 0 "compute-sanitizer not found"
        elif [ "$cap" -lt 20 ]; then
            record "$stage" skipped 0 "no budget left before the ratios"
        else
            run_stage "$stage" "$cap" "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck \
                --error-exitcode 3 --print-limit 40 "$PY" bench/sanitize_ops.py --backends "$@"
        fi
    }
    if wanted sanitize; then
        local cap=$(($(left) - RATIO_RESERVE - 100))  # leaves time for the CUDA tests and part 2
        [ $cap -gt 150 ] && cap=150
        sanitize sanitize "$cap" "$OUT/sanitizer.log" triton torch
    fi

    # -- wait for the build ---------------------------------------------------------------------
    if [ -n "$build_pid" ]; then
        local waited=0
        while [ ! -f "$WORK/build.rc" ] && [ $(($(date +%s) - build_t0)) -lt 310 ] && [ "$(left)" -gt 60 ]; do
            sleep 2
            waited=$((waited + 2))
        done
        if [ ! -f "$WORK/build.rc" ]; then
            pkill -TERM -P "$build_pid" 2>/dev/null  # its `timeout`, which passes the signal on
            kill "$build_pid" 2>/dev/null
            record build TIMEOUT $(($(date +%s) - build_t0)) "waited ${waited} s after the Triton tests"
        else
            local brc note
            brc=$(cat "$WORK/build.rc")
            note="ptxas: $(grep -c 'Compiling entry function' "$OUT/build.log") kernels, $(grep -cE '[1-9][0-9]* bytes spill (stores|loads)' "$OUT/build.log") with spills; waited ${waited} s"
            if [ "$brc" != 0 ]; then
                tail -n 20 "$OUT/build.log"
                record build "FAILED (rc $brc)" $(($(date +%s) - build_t0)) "$note"
            elif [ $DRY = 1 ]; then
                record build ok $(($(date +%s) - build_t0)) "dry run: build settings load"
            elif [ "$BUILD_MODE" = jit ]; then
                export PREHAB_SVD_CUDA_JIT=1
                record build ok $(($(date +%s) - build_t0)) "$note; JIT (PREHAB_SVD_CUDA_JIT=1 from here on)"
            elif gpu_place_ext "$WORK/ext" >>"$OUT/build.log" 2>&1; then
                tail -n 1 "$OUT/build.log"
                record build ok $(($(date +%s) - build_t0)) "$note"
            else
                tail -n 5 "$OUT/build.log"
                record build "FAILED (place)" $(($(date +%s) - build_t0)) "$note"
            fi
        fi
    fi
    export PREHAB_SVD_PTXAS_LOG="$OUT/build.log"

    # -- CUDA extension tests -------------------------------------------------------------------
    if wanted cuda; then
        if [ $DRY = 1 ]; then
            run_stage cuda 60 "$OUT/tests_cuda.log" "$PY" -m pytest --collect-only -q -p no:cacheprovider tests/test_cuda_ext.py
        else
            run_stage cuda 100 "$OUT/tests_cuda.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_ext.py
        fi
    fi

    # -- compute-sanitizer memcheck, part 2: the CUDA extension's paths ---------------------------
    if wanted sanitize; then
        local cap=$(($(left) - RATIO_RESERVE))
        [ $cap -gt 150 ] && cap=150
        sanitize sanitize-cuda "$cap" "$WORK/sanitizer_cuda.log" cuda
        if [ -f "$WORK/sanitizer_cuda.log" ]; then
            { echo; echo "==== part 2: the CUDA extension (bench/sanitize_ops.py --backends cuda)"; cat "$WORK/sanitizer_cuda.log"; } \
                >>"$OUT/sanitizer.log"
        fi
    fi

    # -- ratios ---------------------------------------------------------------------------------
    if wanted ratios; then
        local t=$(($(left) - 15))
        if [ $DRY = 1 ]; then
            run_stage ratios 120 "$OUT/ratios.log" "$PY" bench/ratios.py --sizes tiny --device cpu --isolate \
                --target-s 0.002 --samples 3 --json "$OUT/ratios.json" --budget-s 100
        else
            run_stage ratios "$t" "$OUT/ratios.log" "$PY" bench/ratios.py --sizes 7b --isolate \
                --json "$OUT/ratios.json" --budget-s $((t - 25))
        fi
    fi

    # -- summary (printed last) -----------------------------------------------------------------
    rm -f "$OUT"/.*.tmp  # a JSON write cut off by a stage's timeout: not one of the 8 files
    {
        echo "# gpu_first: $(grep -m1 '^gpu:' "$WORK/env.txt" | cut -d'|' -f1 | sed 's/^gpu: //')"
        echo
        echo "Command: \`bash bench/gpu_first.sh$([ $DRY = 1 ] && echo ' --dry-run')\` ($(($(date +%s) - START)) s; budget ${BUDGET} s)."
        echo
        echo '```'
        cat "$WORK/env.txt"
        echo '```'
        echo
        echo "| stage | status | seconds | note |"
        echo "|---|---|---|---|"
        printf '%s\n' "${ROWS[@]}"
        echo
        if command -v nvidia-smi >/dev/null 2>&1; then
            echo "After the run: $(nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tr '\n' ' ')"
            echo
        fi
        if [ -f "$OUT/ratios.json" ]; then
            "$PY" bench/ratios.py --render "$OUT/ratios.json" 2>&1
        else
            echo "ratios: no ratios.json (the stage did not run or wrote nothing)"
        fi
    } >"$OUT/summary.md"
    # the console: the stage table, then the compact ratio table last (summary.md has the full one)
    echo
    echo "| stage | status | seconds | note |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    if [ -f "$OUT/ratios.json" ]; then
        "$PY" bench/ratios.py --render "$OUT/ratios.json" --compact 2>&1
    fi
    echo
    echo "gpu_first: $([ $FAILED = 0 ] && echo 'all stages ok' || echo 'SOME STAGES FAILED (table above)') in $(($(date +%s) - START)) s"
    return $FAILED
}

main 2>&1 | tee "$OUT/gpu_first.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
