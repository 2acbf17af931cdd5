"""Golden outputs of every method, saved before a restructure and compared after it (issue 17).

``python tests/golden_outputs.py [--minilm]`` writes ``tests/data/golden_outputs.safetensors``: for each case
below, the compressed tiny GQA Llama's factors (U, V per compressed layer) and its logits on a fixed
batch; for the real all-MiniLM-L6-v2 (``--minilm``), the mean-pooled embeddings of a fixed set of
held-out sentences after each method. ``tests/test_golden.py`` recomputes every case with the current
code and compares; ``--check`` compares bit for bit instead of writing. The cases cover each method, both allocations, given ranks, shrinkage 0 / "oas",
damping, the zs correction, the no-calibration svd path, the streaming driver, and a few Prehab and
rehab steps.

Every case computes in float64 (the models, the statistics, the factors). In float32 the outputs of
the ill-conditioned cases (few calibration tokens for the width, shrinkage 0, the full anchor) move
with the rounding of the machine's BLAS kernels: the file recorded on an AMD EPYC (AVX2) and
recomputed on an Intel Xeon (AVX-512) differed by up to 6.7e-4 (aa_svd_exact's logits), whatever the
thread count or MKL's reproducibility mode. In float64 the same kernels' differences leave at most
4e-8 (tests/test_golden.py says where), so the comparison's 1e-6 catches a changed result and
nothing else.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden_outputs.safetensors"
sys.path.insert(0, str(HERE))

from conftest import tiny_model, token_batches  # noqa: E402

# The file was written with torch's intra-op thread count at 2 (the development machine's cores), and
# the cases compute with that count wherever they run, so that the machine that wrote the file
# reproduces it bit for bit (`--check`); `--threads N` computes with N instead, to measure what the
# thread count moves.
RECORDED_THREADS = 2
F64 = torch.float64


def _recorded_threads(fn):
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(RECORDED_THREADS)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return run

TINY_CASES = {
    "svd": ("svd", 0.6, {}),
    "svd_nocalib": ("svd", 0.6, {"no_calibration": True}),
    "asvd": ("asvd", 0.6, {}),
    "svd_llm": ("svd-llm", 0.6, {}),
    "svd_llm_exact": ("svd-llm", 0.6, {"shrinkage": 0.0}),
    "svd_llm_damped": ("svd-llm", 0.6, {"shrinkage": 0.0, "damping": 0.01}),
    "aa_svd": ("aa-svd", 0.6, {"anchor": 1.0}),  # recorded before the anchor option (1.0: as then)
    "aa_svd_exact": ("aa-svd", 0.4, {"shrinkage": 0.0, "anchor": 1.0}),
    "aa_svd_default": ("aa-svd", 0.6, {}),  # the measured default anchor (methods.aa_svd.DEFAULT_ANCHOR)
    "zs_svd": ("zs-svd", 0.6, {"grad_samples": 4}),
    "zs_svd_correction": ("zs-svd", 0.6, {"grad_samples": 4, "correction": True, "correction_grads": 2}),
    "aa_svd_zs_alloc": ("aa-svd", 0.6, {"allocation": "zs", "grad_samples": 4, "anchor": 1.0}),
    "svd_llm_given_ranks": ("svd-llm", 0.6, {"ranks": "half"}),
}
MINILM_METHODS = ["svd", "asvd", "svd-llm", "aa-svd", "zs-svd"]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.detach().clone()


def _factors(model, prefix: str) -> dict:
    from prehab_svd.layers import LowRankLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            out[f"{prefix}/{name}.U"] = mod.U.detach().contiguous().clone()
            out[f"{prefix}/{name}.V"] = mod.V.detach().contiguous().clone()
    return out


@_recorded_threads
def tiny_case(key: str) -> dict:
    import prehab_svd

    method, keep, opts = TINY_CASES[key]
    opts = dict(opts)
    model = tiny_model("llama", layers=2, hidden=64, intermediate=120, seed=1).to(F64)
    calib = token_batches(n=4, batch=2, tokens=24, seed=2, pad_last=5)
    probe = token_batches(n=1, batch=2, tokens=16, seed=3)[0]
    if opts.pop("no_calibration", False):
        calib = None
    if opts.get("ranks") == "half":
        ranks = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                ranks[name] = max(1, min(mod.weight.shape) // 2 - (len(ranks) % 3))
        opts["ranks"] = ranks
    torch.manual_seed(0)
    prehab_svd.compress(model, method, keep, calib, stats_dtype=F64, **opts)
    return {f"{key}/logits": _logits(model, probe), **_factors(model, key)}


@_recorded_threads
def streaming_case() -> dict:
    """compress_pretrained (the block-streaming driver) with aa-svd on a saved tiny Llama."""
    import prehab_svd

    model = tiny_model("llama", layers=2, hidden=64, intermediate=120, seed=1).to(F64)
    calib = token_batches(n=4, batch=2, tokens=24, seed=2)
    probe = token_batches(n=1, batch=2, tokens=16, seed=3)[0]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        model.save_pretrained(src)
        prehab_svd.compress_pretrained(src, dst, "aa-svd", 0.6, calib, anchor=1.0, dtype=F64, stats_dtype=F64)
        out = prehab_svd.load_compressed(dst)
        return {"streaming_aa_svd/logits": _logits(out, probe), **_factors(out, "streaming_aa_svd")}


@_recorded_threads
def prehab_rehab_case() -> dict:
    """Four Prehab steps with each surrogate; the "compressed" one then svd-llm at keep 0.6 and three
    rehab steps. The "compressed" surrogate as it was recorded: the exact projector on whole batches,
    lr 2e-5 and cross-entropy (its defaults now track the subspace, split the batches, use lr 1e-4
    and distil toward the original)."""
    import prehab_svd
    from prehab_svd import prehab, rehab
    from prehab_svd.training.surrogates import CompressedTask

    calib = token_batches(n=4, batch=2, tokens=24, seed=2)
    data = token_batches(n=3, batch=2, tokens=24, seed=4)
    probe = token_batches(n=1, batch=2, tokens=16, seed=3)[0]
    out = {}
    for surrogate in ("stable", "compressed", "tail"):
        m = tiny_model("llama", layers=2, hidden=64, intermediate=120, seed=1).to(F64)
        torch.manual_seed(0)
        kw = {} if surrogate == "stable" else {"keep_ratio": 0.6, "lam": 1.0 if surrogate == "compressed" else 0.01}
        if surrogate == "compressed":
            kw.update(surrogate=CompressedTask(track=False, split=False), lr=2e-5, task="causal_lm")
        prehab(m, calib, data, steps=4, **({"surrogate": surrogate} | kw))
        out[f"prehab_{surrogate}/logits"] = _logits(m, probe)
        if surrogate == "compressed":
            model = m
    prehab_svd.compress(model, "svd-llm", 0.6, calib, stats_dtype=F64)
    torch.manual_seed(0)
    rehab(model, data, steps=3)
    out["prehab_rehab/logits"] = _logits(model, probe)
    return out


@_recorded_threads
def minilm_case(method: str) -> dict:
    import prehab_svd
    from prehab_svd.pretrained import load_pretrained

    model, tok = load_pretrained("minilm")
    model.to(F64)
    from prehab_svd.data import builtin_corpus

    texts = builtin_corpus()
    calib_texts, probe_texts = texts[:32], texts[-8:]

    def enc(ts):
        return dict(tok(ts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    calib = [enc(calib_texts[i:i + 8]) for i in range(0, 32, 8)]
    torch.manual_seed(0)
    opts = {"grad_samples": 8} if method == "zs-svd" else {"anchor": 1.0} if method == "aa-svd" else {}
    prehab_svd.compress(model, method, 0.6, calib, stats_dtype=F64, **opts)
    batch = enc(probe_texts)
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return {f"minilm_{method}/embeddings": ((h * m).sum(1) / m.sum(1)).contiguous()}


def all_cases(minilm: bool) -> dict:
    out = {}
    for key in TINY_CASES:
        out.update(tiny_case(key))
    out.update(streaming_case())
    out.update(prehab_rehab_case())
    if minilm:
        for m in MINILM_METHODS:
            out.update(minilm_case(m))
    return out


def main(argv=None) -> int:
    from safetensors.torch import save_file

    global RECORDED_THREADS
    argv = sys.argv[1:] if argv is None else argv
    if "--threads" in argv:
        RECORDED_THREADS = int(argv[argv.index("--threads") + 1])
    out = all_cases(minilm="--minilm" in argv)
    if "--check" in argv:  # compare with the saved file instead of writing it
        from safetensors.torch import load_file

        want = load_file(str(GOLDEN))
        same = [k for k in out if k in want and torch.equal(out[k], want[k])]
        worst = max(((out[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-30)).item()
                    for k in out if k in want and out[k].shape == want[k].shape)
        missing = sorted(set(want) ^ set(out)) if "--minilm" in argv else sorted(set(out) - set(want))
        print(f"{len(same)} of {len(out)} tensors bit-identical; worst relative difference {worst:.3e}; "
              f"keys not in both: {missing}")
        return 0 if len(same) == len(out) and not missing else 1
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".golden.", dir=GOLDEN.parent)
    os.close(fd)
    save_file(out, tmp)
    os.replace(tmp, GOLDEN)
    print(f"wrote {len(out)} tensors to {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
