"""results/prehab_smollm2.md from the rows of ``scripts/methods_smollm2.py --out results/prehab_smollm2``
and the step costs of ``scripts/prehab_step_cost.py`` (results/prehab_step_cost.json), followed by
the hand-written reading in results/prehab_smollm2/reading.md.

Usage: python scripts/prehab_smollm2_table.py [--rows results/prehab_smollm2/methods_smollm2.json]
       [--cost results/prehab_step_cost.json] [--out results/prehab_smollm2.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZS = {"grad_samples": 64, "min_rank_fraction": 0.3}  # the CLI's zs settings for a causal LM
METHODS = [  # (label, method, options); aa-svd at the paper's full anchor and at the default 0.5
    ("svd-llm", "svd-llm", {}),
    ("aa-svd (anchor 1)", "aa-svd", {"anchor": 1.0}),
    ("aa-svd (anchor 0.5)", "aa-svd", {"anchor": 0.5}),
    ("zs-svd", "zs-svd", ZS),
    ("zs-ranks+aa-svd (anchor 1)", "aa-svd", {"allocation": "zs", **ZS, "anchor": 1.0}),
    ("zs-ranks+aa-svd (anchor 0.5)", "aa-svd", {"allocation": "zs", **ZS, "anchor": 0.5}),
]
# aa-svd rows without Prehab measured for results/anchor.md with the same script and sizes
MORE_ROWS = ROOT / "results/anchor_smollm2/methods_smollm2.json"


def prehab_task(r):
    """None without Prehab; "distill" or "causal_lm" for a Prehab at its defaults but (perhaps) the
    task; "other" for other settings. A row whose Prehab summary does not name the task ran before the
    default became distillation, with cross-entropy."""
    s = r["spec"]
    if "prehab" not in s:
        return None
    if set(s["prehab"]) - {"task"}:
        return "other"
    return s["prehab"].get("task") or r.get("prehab", {}).get("task") or "causal_lm"


def _find(rows, method, keep, options, prehab, rehab, rehab_task=None):
    """The row of ``method`` at ``keep`` with ``options``; ``prehab``: None (without Prehab) or the
    task of a Prehab at otherwise default settings; ``rehab_task``: None (rehab's default) or named."""
    for r in rows:
        s = r["spec"]
        if (s.get("method") == method and s.get("keep") == keep and s.get("options", {}) == options
                and prehab_task(r) == prehab and bool(s.get("rehab")) == rehab and "calib" not in s
                and "dense" not in s and s.get("rehab_task") == rehab_task):
            return r
    return None


TASKS = {"distill": "distillation", "causal_lm": "cross-entropy"}


def _ppl(r):
    return "-" if r is None else f"{r['ppl_builtin']:.2f} / {r['ppl_licenses']:.2f}"


def _gain(new, old):
    if new is None or old is None:
        return "-"
    changes = [100 * (new[k] / old[k] - 1) for k in ("ppl_builtin", "ppl_licenses")]
    return " / ".join(f"{c:+.1f} %" if abs(c) < 10 else f"{c:+.0f} %" for c in changes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=str(ROOT / "results/prehab_smollm2/methods_smollm2.json"))
    p.add_argument("--cost", default=str(ROOT / "results/prehab_step_cost.json"))
    p.add_argument("--out", default=str(ROOT / "results/prehab_smollm2.md"))
    args = p.parse_args(argv)
    doc = json.loads(Path(args.rows).read_text())
    rows = [r for r in doc["rows"] if "ppl_builtin" in r]
    if MORE_ROWS.is_file():
        more = json.loads(MORE_ROWS.read_text())
        def same(sizes):  # where the Prehab cache was kept is not a measurement setting
            return {k: v for k, v in sizes.items() if k != "prehab_cache"}

        if same(more["env"]["sizes"]) != same(doc["env"]["sizes"]):
            raise SystemExit(f"{MORE_ROWS} was measured with other sizes")
        rows += [r for r in more["rows"] if "ppl_builtin" in r]
    env = doc["env"]
    dense = _find(rows, "dense", None, {}, None, False) or next(r for r in rows if r["spec"] == {"method": "dense"})
    lines = ["# Prehab, heterogeneous ranks and anchored factors on SmolLM2-135M-Instruct (CPU)", "",
             f"Rows: `python scripts/methods_smollm2.py --out results/prehab_smollm2 ...` (each row's command is "
             f"in results/prehab_smollm2/methods_smollm2.json; every row a fresh process); table: "
             f"`python scripts/prehab_smollm2_table.py`. {env['date']}; Python {env['python']}, torch {env['torch']}, "
             f"transformers {env['transformers']}; {env['machine']} (later rows name their machine in the JSON).", "",
             f"Calibration {env['sizes']['calib_windows']} x {env['sizes']['calib_len']} tokens of the built-in "
             "corpus (train split); perplexity on consecutive 2048-token windows, 8,192 tokens each of `builtin` "
             "(the corpus's held-out split) and `licenses` (license texts: another kind), as builtin / licenses. "
             "Prehab: `prehab(model, calibration, train, keep_ratio=K)` with the defaults but the task: the "
             "compressed surrogate, tracked and split, λ 1, lr 1e-4, AdamW, 100 steps of 4 windows of 256 "
             "tokens drawn from the same train split with another seed, at the keep ratio of the "
             "compression that follows; the task is distillation to the original (`task=\"distill\"`, the "
             "default since it was measured here) or the cross-entropy of the training text "
             "(`task=\"causal_lm\"`, the default before). Rehab: LoRA rank 8 on the factors, causal-LM loss, "
             f"{env['sizes']['rehab_steps']} steps of 4 windows, lr 2e-4. zs settings: grad_samples 64, "
             "min_rank_fraction 0.3 (the CLI's for a causal LM).", ""]
    lines += ["| model | keep | ppl | vs dense |", "| --- | --- | --- | --- |",
              f"| dense | 1 | {_ppl(dense)} | - |"]
    for task in TASKS:
        for keep in (0.6, 0.4):
            pd = _find(rows, "dense", keep, {}, task, False)
            if pd is not None:
                lines.append(f"| Prehab-dense ({TASKS[task]}, for keep {keep}) | 1 | {_ppl(pd)} | {_gain(pd, dense)} |")
    for keep in (0.6, 0.4):
        lines += ["", f"## keep {keep}", "",
                  "| method | without Prehab | Prehab (distillation) | its change | Prehab (cross-entropy) | "
                  "its change |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label, method, opts in METHODS:
            base = _find(rows, method, keep, opts, None, False)
            kd = _find(rows, method, keep, opts, "distill", False)
            ce = _find(rows, method, keep, opts, "causal_lm", False)
            lines.append(f"| {label} | {_ppl(base)} | {_ppl(kd)} | {_gain(kd, base)} | {_ppl(ce)} | "
                         f"{_gain(ce, base)} |")
        lines += ["", f"Then rehab (keep {keep}); every change is against the method alone (the second "
                  "column above), but the last, Prehab's change when rehab follows (against +rehab):", "",
                  "| method | +rehab | its change | Prehab (distillation) + rehab | its change | "
                  "Prehab's change with rehab | Prehab (cross-entropy) + rehab | its change |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, method, opts in METHODS:
            base = _find(rows, method, keep, opts, None, False)
            reh = _find(rows, method, keep, opts, None, True)
            kd_reh = _find(rows, method, keep, opts, "distill", True)
            ce_reh = _find(rows, method, keep, opts, "causal_lm", True)
            if all(r is None for r in (reh, kd_reh, ce_reh)):
                continue
            lines.append(f"| {label} | {_ppl(reh)} | {_gain(reh, base)} | {_ppl(kd_reh)} | {_gain(kd_reh, base)} | "
                         f"{_gain(kd_reh, reh)} | {_ppl(ce_reh)} | {_gain(ce_reh, base)} |")
    lines += ["", "## Time per stage (seconds, 2 CPU cores)", "",
              "| row | keep | Prehab: whitening / spectra / steps | compression | rehab |",
              "| --- | --- | --- | --- | --- |"]
    for keep in (0.6, 0.4):
        for label, method, opts in [("Prehab-dense", "dense", {})] + METHODS:
            for prehab in (None, "causal_lm", "distill"):
                for rehab in (False, True):
                    r = _find(rows, method, keep, opts, prehab, rehab)
                    if r is None or (method == "dense" and not prehab):
                        continue
                    ph = r.get("prehab", {})
                    t = ph.get("timings", {})
                    pre_s = ("cached" if "cached" in ph and method != "dense" else
                             f"{t.get('whitening', 0):.0f} / {t.get('spectra', 0):.0f} / {t.get('steps', 0):.0f}") if ph else "-"
                    name = (f"prehab ({TASKS[prehab]})+" if prehab and method != "dense" else "") + label + (
                        f" ({TASKS[prehab]})" if method == "dense" else "") + ("+rehab" if rehab else "")
                    reh = f"{r['rehab_seconds']:.0f}" if "rehab_seconds" in r else "-"
                    lines.append(f"| {name} | {keep} | {pre_s} | {r.get('compress_seconds', 0):.0f} | {reh} |")
    tracking = [(r["spec"]["keep"], r["spec"]["prehab"], r["prehab"]) for r in rows
                if r["spec"].get("method") == "dense" and "prehab" in r and "tracking" in r["prehab"]]
    if tracking:
        lines += ["", "## How far the tracked truncation lags the exact one (after the last step)", "",
                  "The task and compressed losses are cross-entropies (nats per token) with the task "
                  "cross-entropy, KL divergences to the original with distillation.", "",
                  "| keep | Prehab settings | layers | sin θ_max: max / mean | excess truncation error: max / mean | "
                  "task loss first -> last | compressed loss first -> last |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for keep, settings, ph in tracking:
            t = ph["tracking"]
            named = settings if "task" in settings else settings | {"task": ph.get("task", "causal_lm")}
            lines.append(f"| {keep} | {json.dumps(named, sort_keys=True)} | {t['layers']} | "
                         f"{t['max_sin']:.3f} / {t['mean_sin']:.3f} | "
                         f"{t['max_excess']:.2e} / {t['mean_excess']:.2e} | {ph['task_loss'][0]:.3f} -> "
                         f"{ph['task_loss'][1]:.3f} | {ph['compressed_loss'][0]:.3f} -> {ph['compressed_loss'][1]:.3f} |")
    cost_path = Path(args.cost)
    if cost_path.is_file():
        cost = json.loads(cost_path.read_text())
        sec = cost["seconds_per_step"]
        plain = sec.get("plain (cross-entropy)", sec.get("plain"))  # the key before distillation was measured
        lines += ["", "## What a Prehab step costs", "",
                  f"`{cost['env']['command']}`, {cost['env']['date']}, {cost['env']['machine']}, "
                  f"{cost['env']['threads']} threads; the same 4 x 256-token batches, keep 0.6; x plain: "
                  "against a plain fine-tuning step with cross-entropy.", "",
                  "| step | s | x plain |", "| --- | --- | --- |"]
        for k, v in sec.items():
            if isinstance(v, (int, float)):
                lines.append(f"| {k} | {v:.2f} | {v / plain:.2f} |")
    reading = Path(args.rows).parent / "reading.md"  # the interpretation, written by hand
    if reading.is_file():
        lines += ["", reading.read_text().rstrip()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
