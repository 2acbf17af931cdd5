"""What the measurement scripts share: the output folder from the command line, and writing the rows
with the environment they were measured in (atomically: a temporary file, then a rename)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def machine() -> str:
    """The CPU's model name, architecture and core count (perplexities agree across CPUs only to
    rounding, and seconds not at all)."""
    import sys

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.scale.common import cpu_model

    return f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs"


def out_dir(argv, default: str = "results") -> Path:
    """The folder named by the first argument (else ``default``), created if missing."""
    out = Path(argv[0] if argv else default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_rows(path: Path, command: str, t0: float, rows: list) -> dict:
    """Write ``{"env": ..., "rows": rows}`` to ``path``; returns the environment (date, versions,
    machine, command, seconds since ``t0``)."""
    import torch
    import transformers

    from prehab_svd.utils import write_atomic

    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "machine": machine(),
           "command": command, "seconds": round(time.time() - t0, 1)}
    write_atomic(path, json.dumps({"env": env, "rows": rows}, indent=1))
    return env
