"""Peak memory of compress() grows with one block, not with the number of blocks."""

import json
import pathlib
import subprocess
import sys

import pytest

PROBE = pathlib.Path(__file__).with_name("_memory_probe.py")
HIDDEN, INTERMEDIATE = 128, 1536  # as in _memory_probe.py


def growth(layers: int, method: str) -> int:
    out = subprocess.run([sys.executable, "-W", "ignore", str(PROBE), str(layers), method],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("method,accumulators", [("svd-llm", 1), ("aa-svd", 3)])
def test_peak_memory_is_per_block(method, accumulators):
    # Bytes of one block's float32 statistics: q/k/v, o, gate/up inputs of width HIDDEN and
    # down_proj's input of width INTERMEDIATE; AA-SVD keeps xᵀx, xᵀx' and x'ᵀx' for each.
    per_block = accumulators * 4 * (3 * HIDDEN**2 + INTERMEDIATE**2)
    g2, g8 = growth(2, method), growth(8, method)
    print(f"{method}: peak RSS growth 2 blocks {g2 / 2**20:.1f} MiB, 8 blocks {g8 / 2**20:.1f} MiB, "
          f"one block's statistics {per_block / 2**20:.1f} MiB")
    assert g2 > per_block, "the probe no longer sees the statistics"
    # Holding every block's statistics would add at least 6 x per_block going from 2 to 8 blocks
    # (more with their float64 copies); RSS sampling and allocator reuse vary by about 1 x per_block.
    assert g8 - g2 < 3 * per_block, (g2, g8, per_block)
