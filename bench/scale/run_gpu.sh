#!/usr/bin/env bash
# The scale benchmarks on one lent GPU (H100: torch 2.11, Triton 3.6, Python 3.12, no network).
#
#   bash bench/scale/run_gpu.sh compress   # ~8 min: compress 1-2 of the 32 blocks of a random LLaMA-7B
#                                          #   (aa-svd, svd-llm, and the GQA variant), extrapolated
#   bash bench/scale/run_gpu.sh kernels    # ~6 min: factorizations at 7B shapes, layer sweep + plot, profiles
#   bash bench/scale/run_gpu.sh infer      # ~8 min: prefill / decode of dense and compressed 7B models,
#                                          #   eager, CUDA graphs, torch.compile
#   bash bench/scale/run_gpu.sh one        # everything in ONE command under 10 minutes: each part gets a
#                                          #   share of a 540 s budget, so fewer blocks / variants / modes
#   bash bench/scale/run_gpu.sh all        # all three in one go (no 10-minute limit)
#
# For the first GPU check of the kernels (tests, sanitizer, op ratios) run bench/gpu_first.sh instead.
# Each part stays under 10 minutes (an internal budget stops starting measurements that would not fit)
# and writes under $OUT (default ./out/scale_gpu): scale_gpu_<part>.json, .md, .log, plus the layer
# plot (kernels) and the profiles' Chrome traces (kernels). Merge the parts afterwards with
#   python -m bench.scale.report merge scale_gpu_*.json --out results/scale_gpu
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-$PWD/out/scale_gpu}"
mkdir -p "$OUT"
part="${1:-all}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PY="${PYTHON:-python3}"

# The package (its Triton kernels live in prehab_svd/kernels/), then the CUDA
# extension (prehab_svd._C, sm_90a; minutes, unless already built, or PREHAB_SVD_NO_CUDA=1 is set), so
# that the "cuda" backend is measured too. The build's time comes off each part's budget.
# shellcheck source=bench/gpu_lib.sh
. bench/gpu_lib.sh
if ! gpu_install /tmp/prehab-install.log; then
    echo "run_gpu.sh: editable install failed; running from the source tree (no Triton backend)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
t_build=$(date +%s)
if [ -n "${PREHAB_SVD_NO_CUDA:-}" ]; then
    echo "run_gpu.sh: PREHAB_SVD_NO_CUDA is set: no CUDA extension (the cuda backend is not measured)"
elif "$PY" -c "import prehab_svd._C" 2>/dev/null; then
    echo "run_gpu.sh: the CUDA extension is built already"
else
    echo "run_gpu.sh: building the CUDA extension (log: /tmp/prehab-cuda-build.log, not under \$OUT: 8 files at most)"
    if timeout 300 bash -c ". bench/gpu_lib.sh; gpu_build_ext '/tmp/prehab-cuda-build.log' /tmp/prehab-ext" \
            && gpu_place_ext /tmp/prehab-ext; then
        export PREHAB_SVD_PTXAS_LOG="/tmp/prehab-cuda-build.log"
    else
        tail -n 10 "/tmp/prehab-cuda-build.log"
        echo "run_gpu.sh: the CUDA extension did not build; continuing without the cuda backend"
    fi
fi
spent=$(($(date +%s) - t_build))
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch, transformers, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"

run() {  # run PREFIX BUDGET PARTS...: BUDGET less the extension's build time (at least 60 s)
    local prefix=$1 budget=$(($2 - spent))
    [ $budget -lt 60 ] && budget=60
    shift 2
    "$PY" -m bench.scale.run --config gpu --parts "$@" --out "$OUT" --prefix "$prefix" \
        --budget-s "$budget" --traces "$OUT"
}
case "$part" in
    compress) run scale_gpu_compress 480 compress ;;
    kernels) run scale_gpu_kernels 360 factorize layers profile ;;
    infer) run scale_gpu_infer 500 inference ;;
    one) run scale_gpu 540 compress factorize layers profile inference ;;
    all) "$PY" -m bench.scale.run --config gpu --out "$OUT" --prefix scale_gpu --traces "$OUT" ;;
    *) echo "usage: bash bench/scale/run_gpu.sh {compress|kernels|infer|one|all}" >&2; exit 2 ;;
esac
