# Shell functions shared by bench/gpu_first.sh and bench/scale/run_gpu.sh (source it; bash).
#
#   gpu_install LOG          the package, editable, without the CUDA extension (seconds; no network)
#   gpu_build_ext LOG DIR    build the CUDA extension prehab_svd._C for sm_90a into DIR (minutes; the
#                            ptxas -v report of every kernel goes to LOG); no change to the tree
#   gpu_place_ext DIR        move the built module into prehab_svd/ (atomic rename), so that every
#                            later process imports it as prehab_svd._C (the ahead-of-time extension)
#   gpu_env_facts            GPU, driver, clocks, SMs, versions of python/torch/triton/CUDA/nvcc/tools
#
# The build writes into DIR and only gpu_place_ext makes it visible, so processes that run while it
# builds (the Triton tests) never see a half-written module.

: "${PY:=python3}"

gpu_install() {
    local log=$1
    if "$PY" -c "import prehab_svd.kernels" 2>/dev/null; then
        echo "install: prehab_svd is importable already ($("$PY" -c 'import prehab_svd, os; print(os.path.dirname(prehab_svd.__file__))'))"
        return 0
    fi
    if PREHAB_SVD_NO_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$log" 2>&1; then
        echo "install: editable install done (the CUDA extension is built separately)"
        return 0
    fi
    tail -n 5 "$log"
    echo "install: FAILED (log above)"
    return 1
}

gpu_build_ext() {
    local log=$1 dir=$2
    mkdir -p "$dir"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    if [ -z "${CUDA_HOME:-}" ]; then  # the toolkit's root (a wrapper script on PATH is not it)
        if [ -x /usr/local/cuda/bin/nvcc ]; then
            CUDA_HOME=/usr/local/cuda
        elif command -v nvcc >/dev/null 2>&1; then
            CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        fi
    fi
    export CUDA_HOME
    {
        echo "build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=$CUDA_HOME MAX_JOBS=$MAX_JOBS"
        "$PY" setup.py build_ext --build-lib "$dir/lib" --build-temp "$dir/tmp"
    } >"$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && grep -q "skipping the CUDA extension" "$log"; then
        grep "skipping the CUDA extension" "$log"
        return 2
    fi
    return $rc
}

gpu_place_ext() {
    local dir=$1 so
    so=$(find "$dir/lib" -name '_C*.so' -path '*prehab_svd*' 2>/dev/null | head -n 1)
    if [ -z "$so" ]; then
        echo "place: no built prehab_svd/_C*.so under $dir/lib"
        return 1
    fi
    cp "$so" "prehab_svd/.$(basename "$so").tmp" && mv -f "prehab_svd/.$(basename "$so").tmp" "prehab_svd/$(basename "$so")" || return 1
    "$PY" -c "import torch, prehab_svd._C as C; print('place: prehab_svd._C imports; arch list', C.arch_list())"
}

gpu_env_facts() {
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm); cpus: $(nproc)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    if command -v nvidia-smi >/dev/null 2>&1; then
        local q
        if q=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,persistence_mode,compute_mode \
                --format=csv 2>&1); then
            echo "$q" | sed 's/^/nvidia-smi: /'
        else
            echo "$q" | sed 's/^/nvidia-smi (query failed): /'
            nvidia-smi -L 2>&1 | sed 's/^/nvidia-smi: /'
        fi
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF' 2>&1
import importlib.util, platform
import torch
print("python:", platform.python_version(), "| torch:", torch.__version__, "| torch CUDA:", torch.version.cuda,
      "| cuDNN:", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
for name in ("triton", "transformers", "numpy", "pytest", "xdist", "ninja"):
    spec = importlib.util.find_spec(name)
    ver = None
    if spec is not None:
        try:
            ver = getattr(__import__(name), "__version__", "present")
        except Exception as e:  # noqa: BLE001
            ver = f"import fails: {type(e).__name__}"
    print(f"{name}: {ver}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name} | capability {p.major}.{p.minor} | SMs {p.multi_processor_count} | "
          f"memory {p.total_memory / 2**30:.1f} GiB | L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("gpu: none visible to torch")
EOF
    for tool in nvcc compute-sanitizer ncu cuobjdump ninja; do
        local path
        path=$(command -v "$tool" || ls /usr/local/cuda/bin/"$tool" 2>/dev/null || true)
        if [ -n "$path" ]; then
            echo "$tool: $path $("$path" --version 2>&1 | grep -iE 'release|version|^[0-9]' | tail -n 1)"
        else
            echo "$tool: not found"
        fi
    done
}
