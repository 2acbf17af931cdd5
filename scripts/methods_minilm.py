"""The training-based methods on the real all-MiniLM-L6-v2 (CPU, built-in corpus, held-out sentences).

Runs every method of the table at keep_ratio 0.6 and 0.4 through ``prehab_svd.demo_encoder.run_demo``
(the demo's code path and settings) and writes, into the folder given (default results/):

* methods_minilm.md / .json -- the table, with the command, versions and machine;
* ranks_zs-svd_0.4.png -- the per-layer ranks zs-svd chose at keep_ratio 0.4;
* spectra_prehab.png -- whitened singular value spectra before and after Prehab (when a Prehab row runs).

Usage:  python scripts/methods_minilm.py [OUT_DIR]      (about 15 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

# Prehab rows are measured separately (scripts/prehab_sweep.py, results/prehab_minilm.md): each
# Prehab setting costs ~10 minutes of training on 2 cores.
METHODS = ["aa-svd", "zs-svd", "svd-llm+rehab"]  # svd-llm alone: results/prehab_minilm.md
RATIOS = [0.6, 0.4]


def main(argv=None) -> int:
    import torch
    import transformers

    from prehab_svd import demo_encoder
    from prehab_svd.plots import plot_ranks, plot_spectra
    from prehab_svd.utils import write_atomic

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "results")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    art: dict = {}
    rows = demo_encoder.run_demo(METHODS, RATIOS, progress=False, artifacts=art)
    table = demo_encoder.format_demo(rows)
    print(table)
    pre = art.get("prehab")
    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "command": "python scripts/methods_minilm.py", "seconds": round(time.time() - t0, 1),
           "settings": {"prehab": demo_encoder.DEMO_PREHAB, "rehab": demo_encoder.DEMO_REHAB,
                        "zs-svd": demo_encoder.DEMO_ZS, "train_batches": demo_encoder.DEMO_TRAIN}}
    write_atomic(out / "methods_minilm.json", json.dumps(
        {"env": env, "rows": rows, "prehab": pre.to_dict() if pre else None}, indent=1))
    lines = ["# Training-based methods on all-MiniLM-L6-v2 (CPU)", "",
             f"Command: `{env['command']}` ({env['seconds'] / 60:.0f} min); {env['date']}; Python "
             f"{env['python']}, torch {env['torch']}, transformers {env['transformers']}; {env['machine']}.",
             "", "Settings: " + json.dumps(env["settings"]), ""]
    if pre:
        lines += [f"Prehab: mean whitened stable rank {pre.mean_stable_rank_before:.2f} -> "
                  f"{pre.mean_stable_rank_after:.2f}; task loss (1 - cos to the original) "
                  f"{pre.steps[0].task_loss:.4f} -> {pre.steps[-1].task_loss:.4f}.", ""]
    lines += ["```", table, "```", ""]
    write_atomic(out / "methods_minilm.md", "\n".join(lines))
    if pre:
        plot_spectra(pre.layers, pre.spectra_before, pre.spectra_after, out / "spectra_prehab.png")
    if ("zs-svd", 0.4) in art:
        plot_ranks(art[("zs-svd", 0.4)], out / "ranks_zs-svd_0.4.png")
    print(f"wrote {out}/methods_minilm.md, .json and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
