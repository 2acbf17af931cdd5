"""How much of the upstream error aa-svd should undo, on the real all-MiniLM-L6-v2 (issue 15).

aa-svd's ``anchor`` = β fits ``(β·x + (1−β)·x')·Wᵀ`` from the partly compressed model's inputs x'
(1: the paper's full anchoring, 0: whitening by x'). This runs the demo's code path
(``prehab_svd.demo_encoder.run_demo``) for aa-svd at every β of ``ANCHORS`` and for svd-llm (the
peer aa-svd must not fall behind), at keep 0.8 / 0.6 / 0.4, with the demo's calibration size (256
sentences) and a quarter of it (64), every other option at its default, and writes
OUT/anchor_minilm.json (the rows; ``scripts/anchor_table.py`` makes the table).

Usage:  python scripts/anchor_minilm.py [OUT_DIR]      (about 15 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import sys
import time

from _rows import out_dir, write_rows

ANCHORS = [1.0, 0.75, 0.5, 0.25, 0.0]
RATIOS = [0.8, 0.6, 0.4]
CALIBRATION = [256, 64]  # sentences: the demo's default and a quarter of it


def main(argv=None) -> int:
    from prehab_svd import demo_encoder

    out = out_dir(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    rows = []
    runs = [("svd-llm", None)] + [("aa-svd", b) for b in ANCHORS]
    for n in CALIBRATION:
        for method, beta in runs:
            got = demo_encoder.run_demo([method], RATIOS, num_calib=n, progress=False,
                                        compress_options={} if beta is None else {"anchor": beta})
            for r in got:
                rows.append({"method": method, "anchor": beta, "keep_ratio": r["keep_ratio"], "calibration": n,
                             "cosine": r["cosine"], "nn_agreement": r["nn_agreement"], "seconds": r["seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    write_rows(out / "anchor_minilm.json", "python scripts/anchor_minilm.py", t0, rows)
    print(f"wrote {out}/anchor_minilm.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
