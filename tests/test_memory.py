"""Peak memory of compress() grows with one block, not with the number of blocks."""

import json
import pathlib
import subprocess
import sys

import pytest

PROBE = pathlib.Path(__file__).with_name("_memory_probe.py")
HIDDEN, INTERMEDIATE = 128, 1536  # as in _memory_probe.py


def probe(layers: int, method: str) -> dict:
    out = subprocess.run([sys.executable, "-W", "ignore", str(PROBE), str(layers), method],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("method,accumulators", [("svd-llm", 1), ("aa-svd", 3)])
def test_peak_memory_is_per_block(method, accumulators):
    # Bytes of one block's float32 statistics: q/k/v, o, gate/up inputs of width HIDDEN and
    # down_proj's input of width INTERMEDIATE; AA-SVD keeps xᵀx, xᵀx' and x'ᵀx' for each.
    per_block = accumulators * 4 * (3 * HIDDEN**2 + INTERMEDIATE**2)
    p2, p8 = probe(2, method), probe(8, method)
    mib = 2**20
    print(f"{method}: live tensors at peak {p2['live'] / mib:.1f} MiB (2 blocks) vs {p8['live'] / mib:.1f} "
          f"MiB (8 blocks); peak RSS growth {p2['growth'] / mib:.1f} vs {p8['growth'] / mib:.1f} MiB; one "
          f"block's statistics {per_block / mib:.1f} MiB")
    assert p2["live"] > per_block, "the probe no longer sees the statistics"
    # Deterministic: what is alive while a block's statistics are finalized does not depend on the
    # number of blocks. Holding every block's statistics would add at least 6 x per_block.
    assert p8["live"] - p2["live"] < per_block // 2, (p2, p8, per_block)
