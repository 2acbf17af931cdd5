"""Why aa-svd's anchor 0.5 beats the paper's 1.0: in-sample against held-out fidelity on MiniLM.

Compresses all-MiniLM-L6-v2 with aa-svd at anchor 1.0, 0.5 and 0.0 on N calibration sentences of the
built-in corpus and measures the embedding cosine to the original on those very sentences and on
512 held-out ones (the demo's protocol). If the full anchor wins in-sample and loses held-out, its
extra correction is fit to the calibration tokens (overfitting), not a better objective.

Usage: python scripts/anchor_insample.py N KEEP[,KEEP...]     (one JSON line per row on stdout)
"""
import copy, json, sys
import torch, transformers
from prehab_svd import data, evaluate, compress
from prehab_svd.pretrained import minilm_dir
torch.manual_seed(0)
path = str(minilm_dir())
tok = transformers.AutoTokenizer.from_pretrained(path)
base = transformers.AutoModel.from_pretrained(path).eval()
n = int(sys.argv[1])
tr = data.load_texts("builtin", split="train")[:n]; te = data.load_texts("builtin", split="test")[:512]
calib = data.sentence_batches(tok, tr, batch_size=32, max_length=128)
held = data.sentence_batches(tok, te, batch_size=32, max_length=128)
with torch.no_grad():
    ref_c, ref_h = evaluate.sentence_embeddings(base, calib), evaluate.sentence_embeddings(base, held)
for keep in [float(k) for k in sys.argv[2].split(",")]:
    for beta in (1.0, 0.5, 0.0):
        m = copy.deepcopy(base)
        compress(m, "aa-svd", keep, calib, anchor=beta)
        with torch.no_grad():
            fc = evaluate.embedding_fidelity(ref_c, evaluate.sentence_embeddings(m, calib))
            fh = evaluate.embedding_fidelity(ref_h, evaluate.sentence_embeddings(m, held))
        print(json.dumps({"n": n, "keep": keep, "anchor": beta, "calib_cos": round(fc["cosine"], 4), "heldout_cos": round(fh["cosine"], 4)}), flush=True)
