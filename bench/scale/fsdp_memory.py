"""What each rank holds during Prehab: one process, DDP and FSDP2 on 2 gloo ranks (CPU).

    python -m bench.scale.fsdp_memory --preset cpu-medium --out out/fsdp_memory \
        --md results/fsdp_memory_cpu.md

For each configuration a fresh job runs ``prehab`` for a few steps on a random LLaMA-shaped model:

* ``single``: one process, no process group;
* ``ddp``: ``torchrun`` with 2 ranks, every rank holding the whole model (``parallel="ddp"``);
* ``fsdp``: 2 ranks, the whole model built on every rank, then sharded by ``prehab(parallel="fsdp")``;
* ``fsdp-meta``: 2 ranks, the model built on the meta device, sharded with ``fully_shard`` and only
  then given storage (``to_empty``, random values): no rank ever holds it whole, the way a model that
  fits no device is set up;
* ``fsdp-meta-at-once``: the same, but with the calibration statistics of all blocks in one pass
  (``stats_blocks`` = all) and every owned layer gathered whole at once (one round): what the
  defaults (one block per pass, :data:`prehab_svd.fsdp.GATHER_LAYERS_PER_RANK` layers per round)
  save.

Each rank records the bytes it holds after training (its parameters, gradients and optimizer state:
the local shards under FSDP) and its peak resident set size (``ru_maxrss``: everything the process
ever held at once, the model build, the regularizer's gathered weights and the interpreter
included), next to the resident size after ``import torch, transformers`` (the baseline). On a GPU the
same comparison would use ``torch.cuda.max_memory_allocated``; no run here has had one.
"""

from __future__ import annotations

from . import common  # noqa: F401  (sets the environment before torch loads)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

MODES = ("single", "ddp", "fsdp", "fsdp-meta", "fsdp-meta-at-once")
# (mode, surrogate) pairs run by default
DEFAULT_RUNS = ("single:stable", "ddp:stable", "fsdp:stable", "fsdp-meta:stable", "fsdp-meta-at-once:stable",
                "ddp:compressed", "fsdp-meta:compressed", "fsdp-meta-at-once:compressed")
MB = 2 ** 20


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if t is not None)


def _init_meta_built(model) -> None:
    """Random values for a model materialized with ``to_empty`` (each rank fills its own shards), and
    the rotary embedding's buffers recomputed (``to_empty`` leaves buffers uninitialized)."""
    g = torch.Generator().manual_seed(1234 + int(os.environ.get("RANK", "0")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            loc = _local(p)
            if p.dim() == 1:  # norms
                loc.fill_(1.0)
            else:
                loc.copy_(torch.randn(loc.shape, generator=g) * 0.02)
        for name, mod in model.named_modules():
            if hasattr(mod, "inv_freq"):  # LlamaRotaryEmbedding
                fresh = type(mod)(config=model.config)
                for bname, buf in fresh.named_buffers(recurse=False):
                    getattr(mod, bname).copy_(buf)


def worker(args) -> None:
    import torch.distributed as dist

    import transformers  # noqa: F401  (in the baseline)
    from prehab_svd import prehab

    baseline = _rss_mb()
    p = common.preset(args.preset)
    distributed = args.mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        extra = {}
        if args.mode == "fsdp-meta-at-once":
            from prehab_svd import fsdp

            fsdp.GATHER_LAYERS_PER_RANK = 10 ** 9  # one round: every owned layer at once
            extra["stats_blocks"] = args.blocks
        if args.mode.startswith("fsdp-meta"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            model = common.build_llama(p, "meta", torch.float32, layers=args.blocks)
            mesh = init_device_mesh("cpu", (world,))
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.to_empty(device="cpu")
            _init_meta_built(model)
        else:
            model = common.build_llama(p, "cpu", torch.float32, layers=args.blocks)
        after_build = _rss_mb()
        calib = common.token_batches(p.vocab, args.sequences, args.seq_len, 2, "cpu", seed=1)
        train = common.token_batches(p.vocab, 2 * args.batch * world, args.seq_len, args.batch * world,
                                     "cpu", seed=2)
        train = [b[rank * args.batch:(rank + 1) * args.batch] for b in train]
        held = {}

        def make_opt(params):
            params = list(params)
            held["optimizer"] = torch.optim.AdamW(params, lr=1e-5)
            held["params"] = params
            return held["optimizer"]

        t0 = time.perf_counter()
        rep = prehab(model, calib[rank::world], train, steps=args.steps, surrogate=args.surrogate,
                     keep_ratio=0.6 if args.surrogate in ("tail", "compressed") else None,
                     lam=1.0, warmup_steps=0, optimizer=make_opt,
                     parallel="fsdp" if args.mode.startswith("fsdp") else "ddp", **extra)
        seconds = time.perf_counter() - t0
        opt = held["optimizer"]
        params = held["params"]
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        full_params = sum(p_.numel() for p_ in model.parameters())  # DTensor numel: the whole tensor
        out = {
            "mode": args.mode, "rank": rank, "world": world, "surrogate": args.surrogate,
            "preset": p.name, "blocks": args.blocks, "steps": args.steps,
            "model_params": full_params, "model_mb": full_params * 4 / MB,
            "params_mb": _bytes(params) / MB,
            "grads_mb": _bytes(q.grad for q in params) / MB,
            "optimizer_mb": _bytes(state) / MB,
            "baseline_rss_mb": baseline, "after_build_rss_mb": after_build,
            "peak_rss_mb": common.peak_rss_gb() * 1e9 / MB,
            "prehab_s": seconds, "task_loss": [s.task_loss for s in rep.steps],
        }
        out["held_mb"] = out["params_mb"] + out["grads_mb"] + out["optimizer_mb"]
        path = Path(args.out) / f"{args.mode}-{args.surrogate}-rank{rank}.json"
        common.write_json(path, out)
    finally:
        if distributed:
            dist.destroy_process_group()


def run_all(args) -> list:
    rows = []
    for run in args.runs:
        mode, surrogate = run.split(":")
        launch = ([sys.executable] if mode == "single" else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
        cmd = launch + ["-m", "bench.scale.fsdp_memory", "--worker", "--mode", mode,
                        "--surrogate", surrogate, "--preset", args.preset, "--blocks", str(args.blocks),
                        "--steps", str(args.steps), "--sequences", str(args.sequences),
                        "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--out", args.out]
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[2])  # where bench/ imports from
        if proc.returncode != 0:
            raise SystemExit(f"{mode}/{surrogate} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        for r in range(1 if mode == "single" else 2):
            rows.append(json.loads((Path(args.out) / f"{mode}-{surrogate}-rank{r}.json").read_text()))
    return rows


def render(rows: list, env: dict, command: str) -> str:
    lines = ["# Prehab memory per rank: one process, DDP and FSDP2 (CPU, gloo)", "",
             f"- date: {env['date']}", f"- device: {env['device']} ({env['cpu_cores']} cores visible)",
             f"- versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
             f"- command: `{command}`",
             "- Held after training: the rank's parameters, gradients and AdamW state (local shards under "
             "FSDP). Peak RSS: `ru_maxrss` of the rank's process (model build, gathered weights, "
             "activations, the interpreter); baseline: the resident size after importing torch and "
             "transformers. MiB.", "",
             "| mode | surrogate | rank | model MiB (whole, fp32) | params | grads | AdamW | held | baseline RSS | "
             "peak RSS | peak − baseline | prehab s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['surrogate']} | {r['rank']}/{r['world']} | {r['model_mb']:.0f} | "
            f"{r['params_mb']:.0f} | {r['grads_mb']:.0f} | {r['optimizer_mb']:.0f} | {r['held_mb']:.0f} | "
            f"{r['baseline_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {r['prehab_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, default="single", help=argparse.SUPPRESS)
    ap.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                    help=f"mode:surrogate pairs (modes: {', '.join(MODES)})")
    ap.add_argument("--surrogate", default="stable", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="cpu-medium")
    ap.add_argument("--blocks", type=int, default=None, help="blocks of the model (default: the preset's)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=4, help="calibration sequences (all ranks together)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="training sequences per rank and step")
    ap.add_argument("--out", default="out/fsdp_memory", help="folder of the per-rank JSON files")
    ap.add_argument("--md", default=None, help="also write the table here (and the JSON next to it)")
    args = ap.parse_args(argv)
    if args.blocks is None:
        args.blocks = common.preset(args.preset).layers
    if args.worker:
        worker(args)
        return
    for run in args.runs:
        mode, _, surrogate = run.partition(":")
        if mode not in MODES or surrogate not in ("stable", "nuclear", "tail", "compressed"):
            raise SystemExit(f"bad run {run!r}: use mode:surrogate, modes {', '.join(MODES)}")
    rows = run_all(args)
    env = common.environment("cpu")
    command = "python -m bench.scale.fsdp_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(rows, env, command)
    print(text)
    if args.md:
        md = Path(args.md)
        common.write_json(md.with_suffix(".json"), {"environment": env, "command": command, "rows": rows})
        tmp = md.with_name(f".{md.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, md)


if __name__ == "__main__":
    main()
