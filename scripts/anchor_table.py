"""results/anchor.md: aa-svd's anchor β against svd-llm, on MiniLM and SmolLM2 (issue 15).

Reads the MiniLM rows of ``scripts/anchor_minilm.py`` (results/anchor/anchor_minilm.json) and the
SmolLM2 rows of ``scripts/methods_smollm2.py`` (results/anchor_smollm2, and the rows already measured
with the same protocol in results/shrinkage_smollm2 and results/prehab_smollm2), every one with the
default shrinkage (OAS), and appends the hand-written reading results/anchor/reading.md.

Usage: python scripts/anchor_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = [1.0, 0.75, 0.5, 0.25, 0.0]
SMOLLM2_ROWS = ["results/anchor_smollm2/methods_smollm2.json", "results/shrinkage_smollm2/methods_smollm2.json",
                "results/prehab_smollm2/methods_smollm2.json"]


def _load(rel):
    path = ROOT / rel
    return json.loads(path.read_text()) if path.is_file() else {"rows": [], "env": {}}


def _recorded(method, keep, calib, anchor):
    """A row of shrinkage_smollm2_table.RECORDED (same script, 2026-12-02, JSON not kept; aa-svd then
    had the full anchor), marked †."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from shrinkage_smollm2_table import RECORDED

    got = RECORDED.get((method, keep, calib, "oas")) if anchor in (None, 1.0) else None
    return ({"ppl_builtin": got[0], "ppl_licenses": got[1]}, "recorded") if got else (None, None)


def _smollm2_row(rows, method, keep, calib, anchor):
    for r, src in rows:
        s = r["spec"]
        o = dict(s.get("options", {}))
        if o.pop("shrinkage", "oas") != "oas" or "prehab" in s or s.get("rehab") or "dense" in s:
            continue
        if (s.get("method"), s.get("keep"), s.get("calib", 64)) != (method, keep, calib):
            continue
        if o == ({} if anchor is None else {"anchor": anchor}):
            return r, src
    return _recorded(method, keep, calib, anchor)


def main() -> int:
    from prehab_svd.methods.aa_svd import DEFAULT_ANCHOR

    def label(b):
        return f"β = {b:g}" + (" (the paper)" if b == 1 else " (default)" if b == DEFAULT_ANCHOR else "")

    mini = _load("results/anchor/anchor_minilm.json")
    lines = ["# aa-svd's anchor: how much of the upstream error the factors undo", "",
             "aa-svd with `anchor=β` fits `(β·x + (1−β)·x')·Wᵀ` from the partly compressed model's inputs x' "
             "(`prehab_svd.linalg.anchored_lowrank`): β = 1 is the paper's objective (anchored to the original "
             "outputs), β = 0 whitens by x' and fits the compressed model's own outputs. Every other option at "
             "its default (OAS shrinkage). Table: `python scripts/anchor_table.py`.", ""]
    if mini["rows"]:
        env = mini["env"]
        key = {(r["method"], r["anchor"], r["keep_ratio"], r["calibration"]): r for r in mini["rows"]}
        anchors = [b for b in ANCHORS if any(k[1] == b for k in key)]
        lines += ["## MiniLM (all-MiniLM-L6-v2)", "",
                  f"`{env['command']}` ({env['seconds'] / 60:.0f} min, {env['date']}; Python {env['python']}, torch "
                  f"{env['torch']}, transformers {env['transformers']}; {env['machine']}): the demo's code path. "
                  "Held-out embedding cosine to the original / nearest-neighbour agreement, 512 held-out "
                  "sentences of the built-in corpus; the best aa-svd cosine of a row in bold.", "",
                  "| calibration | keep | svd-llm | " + " | ".join(f"aa-svd {label(b)}" for b in anchors) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in anchors) + " |"]
        for n in sorted({k[3] for k in key}, reverse=True):
            for k in sorted({k[2] for k in key}, reverse=True):
                base = key.get(("svd-llm", None, k, n))
                cells = [key.get(("aa-svd", b, k, n)) for b in anchors]
                best = max((c["cosine"] for c in cells if c), default=None)

                def fmt(c):
                    if c is None:
                        return "-"
                    s = f"{c['cosine']:.4f} / {c['nn_agreement']:.3f}"
                    return f"**{s}**" if c["cosine"] == best else s
                lines.append(f"| {n} sentences | {k:g} | {fmt(base)} | " + " | ".join(fmt(c) for c in cells) + " |")
        lines.append("")
    ins = ROOT / "results/anchor/insample.jsonl"
    if ins.is_file():
        got = [json.loads(line) for line in ins.read_text().splitlines() if line.strip()]
        lines += ["### Why: in-sample against held-out", "",
                  "`python scripts/anchor_insample.py N 0.8,0.6,0.4` for N = 256 and 64 (rows in "
                  "results/anchor/insample.jsonl): the embedding cosine on the calibration sentences themselves "
                  "and on the 512 held-out ones, and the gap between them.", "",
                  "| calibration | keep | β | in-sample | held-out | gap |", "| --- | --- | --- | --- | --- | --- |"]
        for r in got:
            lines.append(f"| {r['n']} sentences | {r['keep']:g} | {r['anchor']:g} | {r['calib_cos']:.4f} | "
                         f"{r['heldout_cos']:.4f} | {r['calib_cos'] - r['heldout_cos']:.4f} |")
        lines.append("")
    rows = [(r, rel) for rel in SMOLLM2_ROWS for r in _load(rel)["rows"] if "ppl_builtin" in r]
    if rows:
        lines += ["## SmolLM2-135M-Instruct", "",
                  "`python scripts/methods_smollm2.py --out results/anchor_smollm2 --suite none --extra SPEC` (each "
                  "row's spec and environment in results/anchor_smollm2/methods_smollm2.json); rows marked * were "
                  "measured with the same script and protocol for results/shrinkage_smollm2 or results/prehab_smollm2 "
                  "(aa-svd there: β = 1, before the option existed), rows marked † with the same script on 2026-12-02 "
                  "(numbers in results/whitening_numerics.md, JSON not kept). Perplexity on consecutive 2048-token windows, "
                  "8,192 tokens each: builtin (held-out text of the calibration's kind) / licenses (another kind); "
                  "dense 32.04 / 14.08. Calibration: windows of 256 tokens of the built-in corpus.", "",
                  "| calibration | keep | svd-llm | " + " | ".join(f"aa-svd {label(b)}" for b in ANCHORS[:-1]) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in ANCHORS[:-1]) + " |"]
        for calib in (64, 16):
            for keep in (0.8, 0.6, 0.4):
                cells = [_smollm2_row(rows, "svd-llm", keep, calib, None)] + [
                    _smollm2_row(rows, "aa-svd", keep, calib, b) for b in ANCHORS[:-1]]

                def fmt(c):
                    r, src = c
                    if r is None:
                        return "-"
                    mark = "" if src == SMOLLM2_ROWS[0] else "†" if src == "recorded" else "*"
                    return f"{r['ppl_builtin']:.2f} / {r['ppl_licenses']:.2f}{mark}"
                lines.append(f"| {calib} x 256 | {keep:g} | " + " | ".join(fmt(c) for c in cells) + " |")
        lines.append("")
    reading = ROOT / "results/anchor/reading.md"
    if reading.is_file():
        lines += [reading.read_text().rstrip(), ""]
    from prehab_svd.utils import write_atomic

    write_atomic(ROOT / "results/anchor.md", "\n".join(lines))
    print("wrote results/anchor.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
