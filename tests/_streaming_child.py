"""Run in a subprocess by test_streaming.py / test_resume.py: compress a model folder from disk.

Usage::

    python _streaming_child.py SRC DST METHOD KEEP [--stall-after K] [--memory] [--targets P ...]

Calibration: 3 batches of 2 x 24 random token ids (seed 0), or with --memory 4 batches of 2 x 64.
``--stall-after K`` sleeps for a long time once block K is checkpointed, so a test that waits for
block K-1 and kills the process always kills it before the end. ``--memory`` prints, as JSON, the
RSS just before compressing and the peak RSS of the process (``ru_maxrss``) after. Otherwise the
last line is the report as JSON.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import time
import warnings

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def calibration(memory: bool = False, vocab: int = 96) -> list:
    g = torch.Generator().manual_seed(0)
    n, tokens = (4, 64) if memory else (3, 24)
    return [{"input_ids": torch.randint(3, vocab, (2, tokens), generator=g),
             "attention_mask": torch.ones(2, tokens, dtype=torch.long)} for _ in range(n)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("method")
    p.add_argument("keep", type=float)
    p.add_argument("--stall-after", type=int, default=None)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--vocab", type=int, default=96)
    p.add_argument("--targets", nargs="*", default=None)
    args = p.parse_args()
    warnings.simplefilter("ignore")

    import transformers  # noqa: F401  (imported before the base RSS is read)
    from transformers import LlamaForCausalLM  # noqa: F401

    from prehab_svd import compress_pretrained

    batches = calibration(args.memory, args.vocab)

    def on_block(index, blocks):
        if args.stall_after is not None and index >= args.stall_after:
            time.sleep(600)

    base = rss_bytes()
    report = compress_pretrained(args.src, args.dst, args.method, args.keep, batches, on_block=on_block,
                                 targets=args.targets)
    if args.memory:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        print(json.dumps({"base": base, "peak": peak}))
    else:
        print(json.dumps(report.to_dict()))


if __name__ == "__main__":
    main()
