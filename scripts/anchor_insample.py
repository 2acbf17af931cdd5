"""Why aa-svd's anchor 0.5 beats the paper's 1.0: in-sample against held-out fidelity on MiniLM.

Compresses all-MiniLM-L6-v2 with aa-svd at anchor 1.0, 0.5 and 0.0 on N calibration sentences of the
built-in corpus and measures the embedding cosine to the original on those very sentences and on
512 held-out ones (the demo's protocol). If the full anchor wins in-sample and loses held-out, its
extra correction is fit to the calibration tokens (overfitting), not a better objective.

Usage: python scripts/anchor_insample.py N KEEP[,KEEP...]     (one JSON line per row on stdout)
"""

from __future__ import annotations

import copy
import json
import sys

ANCHORS = (1.0, 0.5, 0.0)


def main(argv=None) -> int:
    import torch
    import transformers

    from prehab_svd import compress, data, evaluate
    from prehab_svd.pretrained import minilm_dir

    argv = sys.argv[1:] if argv is None else argv
    n, keeps = int(argv[0]), [float(k) for k in argv[1].split(",")]
    torch.manual_seed(0)
    path = str(minilm_dir())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path).eval()
    calib = data.sentence_batches(tok, data.load_texts("builtin", split="train")[:n], batch_size=32, max_length=128)
    held = data.sentence_batches(tok, data.load_texts("builtin", split="test")[:512], batch_size=32, max_length=128)

    def embed(model, batches):
        with torch.no_grad():
            return evaluate.sentence_embeddings(model, batches)

    ref_calib, ref_held = embed(base, calib), embed(base, held)
    for keep in keeps:
        for beta in ANCHORS:
            model = copy.deepcopy(base)
            compress(model, "aa-svd", keep, calib, anchor=beta)
            fc = evaluate.embedding_fidelity(ref_calib, embed(model, calib))
            fh = evaluate.embedding_fidelity(ref_held, embed(model, held))
            print(json.dumps({"n": n, "keep": keep, "anchor": beta, "calib_cos": round(fc["cosine"], 4),
                              "heldout_cos": round(fh["cosine"], 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
