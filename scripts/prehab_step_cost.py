"""What a Prehab step costs against a plain fine-tuning step of the same batch, on SmolLM2 (CPU).

In one process, on the same 4 x 256-token batches of the built-in corpus: plain fine-tuning steps
(AdamW, gradient clipping: what ``prehab`` does around its regularizer) with the causal-LM
cross-entropy and with distillation to the original (next-token KL divergence: a forward pass of the
frozen original more), then ``prehab`` with the "compressed" surrogate at keep 0.6: the default
(tracked subspace, split batch, distillation), the same with cross-entropy (the default before),
tracked on the whole batch for both terms, and the exact projector (fp64 SVDs of every W·L every
step, both terms on the whole batch: the behaviour before tracking), the last two with cross-entropy.
A step's time is the mean of consecutive steps after the first (which includes the exact start).

Usage: python scripts/prehab_step_cost.py [--out results/prehab_step_cost.json] [--steps 11]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "prehab_step_cost.json"))
    p.add_argument("--steps", type=int, default=11, help="steps of the plain and default runs (the others: 4)")
    args = p.parse_args(argv)

    import torch
    import transformers

    from prehab_svd import data, prehab
    from prehab_svd.pretrained import load_pretrained
    from prehab_svd.tasks import LogitDistillation, causal_lm_loss
    from prehab_svd.training.surrogates import CompressedTask
    from prehab_svd.utils import write_atomic

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    base, tok = load_pretrained("smollm2")
    texts = data.load_texts("builtin", "train")
    calib = data.causal_lm_batches(tok, texts, num_samples=16, seq_len=256, batch_size=8, seed=0)
    train = data.causal_lm_batches(tok, texts, num_samples=4 * args.steps, seq_len=256, batch_size=4, seed=2)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    rows = {}

    def fresh():
        base.load_state_dict(state)
        return base

    for task_name, loss_fn in (("cross-entropy", causal_lm_loss), ("distillation", None)):
        model = fresh()
        if loss_fn is None:  # the frozen original, copied before training as prehab's default does
            loss_fn = LogitDistillation.of(model)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        stamps = []
        for b in train[:args.steps]:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, b).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            stamps.append(time.perf_counter())
        key = f"plain ({task_name})"
        rows[key] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        print(f"{key}: {rows[key]:.2f} s", flush=True)
        del opt, loss_fn
    variants = [("default (tracked, split, distillation)", CompressedTask(), "auto", args.steps),
                ("tracked, split, cross-entropy", CompressedTask(), "causal_lm", args.steps),
                ("tracked, whole batch, cross-entropy", CompressedTask(track=True, split=False), "causal_lm", 4),
                ("exact, whole batch, cross-entropy (before)", CompressedTask(track=False, split=False),
                 "causal_lm", 4)]
    for name, surr, task, steps in variants:
        stamps = []
        rep = prehab(fresh(), calib, train[:steps], steps=steps, keep_ratio=0.6, surrogate=surr, task=task,
                     callback=lambda _s: stamps.append(time.perf_counter()))
        rows[name] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        rows[name + " setup"] = {k: round(v, 1) for k, v in rep.timings.items()}
        plain = rows["plain (cross-entropy)"]
        print(f"{name}: {rows[name]:.2f} s a step, {rows[name] / plain:.2f}x plain; {rep.timings}", flush=True)
    env = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0],
           "command": " ".join(["python scripts/prehab_step_cost.py"] + (sys.argv[1:] if argv is None else argv))}
    write_atomic(Path(args.out), json.dumps({"env": env, "seconds_per_step": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
