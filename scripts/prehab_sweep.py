"""Prehab settings on the real all-MiniLM-L6-v2: does Prehab + a method beat the method alone?

For each setting (a JSON dict of ``prehab()`` keyword arguments, plus optional "bs"/"ml": training
batch size and max tokens), fine-tunes a copy of MiniLM with Prehab (distillation to the original's
sentence embeddings + the rank surrogate) on built-in training sentences 256.. (disjoint from the 256
calibration and the 512 held-out ones), then compresses it with each method at keep_ratio 0.6 and
0.4, and prints the held-out embedding fidelity to the ORIGINAL model (cosine, nearest-neighbour
agreement). BASE=1 also prints the methods without Prehab. METHODS=svd-llm,aa-svd picks methods.

Usage: BASE=1 METHODS=svd-llm,aa-svd python scripts/prehab_sweep.py '{"surrogate": "compressed",
       "keep_ratio": 0.6, "lam": 1.0, "lr": 1e-4, "optimizer": "adamw", "steps": 100}' ...
       (about 6 minutes of training per setting on 2 cores, and 1-2 minutes per compression;
       results/prehab_minilm.md has the settings measured)
"""

import copy
import json
import os
import sys
import time

import torch
import transformers

from prehab_svd import data, evaluate
from prehab_svd.pretrained import minilm_dir
from prehab_svd.compression import compress
from prehab_svd import prehab


def main(settings):
    torch.manual_seed(0)
    path = str(minilm_dir())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path).eval()
    train_texts, test_texts = data.load_texts("builtin", "train"), data.load_texts("builtin", "test")
    calib = data.sentence_batches(tok, train_texts[:256], batch_size=32, max_length=128)
    held = data.sentence_batches(tok, test_texts[:512], batch_size=32, max_length=128)
    with torch.no_grad():
        e_ref = evaluate.sentence_embeddings(base, held)

    def fidelity(model):
        with torch.no_grad():
            f = evaluate.embedding_fidelity(e_ref, evaluate.sentence_embeddings(model, held))
        return round(f["cosine"], 4), round(f["nn_agreement"], 4)

    methods = os.environ.get("METHODS", "svd-llm").split(",")
    if os.environ.get("BASE"):
        for ratio in (0.6, 0.4):
            for method in methods:
                model = copy.deepcopy(base)
                compress(model, method, ratio, calib)
                print("no prehab", method, ratio, fidelity(model), flush=True)
    for setting in settings:
        kw = json.loads(setting)
        bs, ml = kw.pop("bs", 16), kw.pop("ml", 64)
        steps = kw.get("steps", 100)
        train = data.sentence_batches(tok, train_texts[256:256 + bs * steps], batch_size=bs, max_length=ml)
        tuned = copy.deepcopy(base)
        t0 = time.time()
        rep = prehab(tuned, calib, train, **kw)
        print(setting, f"prehab {time.time() - t0:.0f}s", f"stable rank {rep.mean_stable_rank_before:.2f}"
              f"->{rep.mean_stable_rank_after:.2f}", f"task {rep.steps[-1].task_loss:.4f}",
              "fine-tuned", fidelity(tuned), flush=True)
        for ratio in (0.6, 0.4):
            for method in methods:
                model = copy.deepcopy(tuned)
                compress(model, method, ratio, calib)
                print("  prehab +", method, ratio, fidelity(model), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
