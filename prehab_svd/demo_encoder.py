"""The encoder demo: compress the real all-MiniLM-L6-v2 with several methods and compare the
embeddings of held-out sentences with the original's (cosine, nearest-neighbour agreement).

Calibration and held-out sentences come from the built-in corpus (train and test splits); Prehab and
rehab train on built-in sentences disjoint from both. A method is ``[prehab+]METHOD[+rehab]`` (see
:func:`run_demo`). ``prehab-svd demo --model minilm`` runs it; the causal-LM demo (SmolLM2) is
:mod:`prehab_svd.demo_causal`.
"""

from __future__ import annotations

import copy
import time

from .errors import PrehabError
from .pretrained import minilm_dir
from .utils import keep_ratio_list

__all__ = ["DEMO_DEFAULT", "DEMO_PREHAB", "DEMO_REHAB", "DEMO_ZS", "DEMO_TRAIN", "demo_prehab_options",
           "parse_demo_method", "run_demo", "format_demo"]

DEMO_DEFAULT = ("svd", "asvd", "svd-llm", "aa-svd", "zs-svd", "zs-ranks+aa-svd", "prehab+svd-llm", "prehab+aa-svd")
# The demo's training settings (how they were chosen: results/methods_minilm.md). Prehab and rehab
# train on built-in sentences disjoint from the calibration and held-out ones.
# Prehab for the demo: task(dense) + λ·task(the model svd-llm makes at the smallest demo keep ratio)
# (tracked, split: the defaults with a keep_ratio; results/prehab_minilm.md).
DEMO_PREHAB = dict(steps=100, lam=1.0, surrogate="compressed", lr=1e-4, optimizer="adamw")
DEMO_REHAB = dict(steps=100, lr=1e-4, lora_rank=8)
DEMO_ZS = dict(grad_samples=64)  # min_rank_fraction: the default, 0.75·keep_ratio
DEMO_TRAIN = dict(batch_size=16, max_length=64)


def demo_prehab_options(options, ratios) -> dict:
    """The demo's Prehab settings with ``options`` applied; a surrogate that compresses at a planned
    keep ratio ("tail", "compressed") targets the smallest of ``ratios`` unless told otherwise."""
    opts = dict(DEMO_PREHAB, **(options or {}))
    if opts.get("surrogate") in ("tail", "compressed"):
        opts.setdefault("keep_ratio", min(ratios))
    else:
        opts.pop("keep_ratio", None)
    return opts


def parse_demo_method(name: str) -> tuple[bool, str, bool, bool]:
    """``"[prehab+][zs-ranks+]<method>[+rehab]"`` -> (prehab first?, compression method, zs-svd's
    ranks?, rehab after?). ``zs-ranks+METHOD``: zs-svd's zero-sum selection picks every layer's rank
    and METHOD its factors (``compress(..., allocation="zs")``)."""
    from .compression import METHODS
    from .methods import get as get_method

    parts = name.split("+")
    pre = parts[0] == "prehab"
    post = len(parts) > 1 and parts[-1] == "rehab"
    inner = parts[int(pre): len(parts) - int(post)]
    zs_ranks = len(inner) == 2 and inner[0] == "zs-ranks"
    inner = inner[int(zs_ranks):]
    if len(inner) != 1 or inner[0] not in METHODS:
        raise PrehabError(f"unknown demo method {name!r}: use [prehab+][zs-ranks+]METHOD[+rehab] with METHOD "
                          f"one of {', '.join(METHODS)}")
    if zs_ranks and get_method(inner[0]).allocation == "zs":
        raise PrehabError(f"zs-ranks+{inner[0]} is just {inner[0]}")
    return pre, inner[0], zs_ranks, post


def run_demo(methods, keep_ratio=0.6, num_calib=256, num_eval=512, max_length=128, batch_size=32,
             progress=True, prehab_options=None, rehab_options=None, zs_options=None, artifacts=None,
             compress_options=None):
    """The embedded default: compress the real MiniLM with each method; returns table rows.

    ``keep_ratio`` may be a list (every method at every ratio). A method is
    ``[prehab+][zs-ranks+]METHOD[+rehab]``: "prehab+" first fine-tunes a copy of the model with Prehab
    (distillation to the original's embeddings + the task loss of the model svd-llm makes at the
    smallest keep ratio; done once and shared, and reported as the row "prehab (dense)"), "+rehab" ends with LoRA recovery (distillation to the original).
    ``artifacts``, a dict, receives the reports: ``(method, keep_ratio) -> CompressionReport`` and
    ``"prehab" -> PrehabReport``. ``compress_options``: keywords for every ``compress`` call (e.g.
    ``{"shrinkage": 0.0}``; each method gets those it takes).
    """
    import torch
    import transformers

    from . import data, evaluate
    from .compression import compress, method_options
    from .methods import get as get_method

    ratios = keep_ratio_list(keep_ratio)
    parsed = [(m, *parse_demo_method(m)) for m in methods]
    path = str(minilm_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path).eval()
    calib_texts = data.load_texts("builtin", split="train")
    eval_texts = data.load_texts("builtin", split="test")
    if len(calib_texts) < num_calib or len(eval_texts) < num_eval:
        raise PrehabError("the built-in corpus is smaller than the requested sample counts")
    calib = data.sentence_batches(tokenizer, calib_texts[:num_calib], batch_size=batch_size,
                                  max_length=max_length)
    held = data.sentence_batches(tokenizer, eval_texts[:num_eval], batch_size=batch_size,
                                 max_length=max_length)
    pre_opts = demo_prehab_options(prehab_options, ratios)
    re_opts = dict(DEMO_REHAB, **(rehab_options or {}))
    zs_opts = dict(DEMO_ZS, **(zs_options or {}))
    n_train = DEMO_TRAIN["batch_size"] * max(pre_opts["steps"], re_opts["steps"])
    train = data.sentence_batches(tokenizer, calib_texts[num_calib:num_calib + n_train],
                                  batch_size=DEMO_TRAIN["batch_size"], max_length=DEMO_TRAIN["max_length"])
    with torch.no_grad():
        e_ref = evaluate.sentence_embeddings(base, held)

    def fidelity(model):
        with torch.no_grad():
            return evaluate.embedding_fidelity(e_ref, evaluate.sentence_embeddings(model, held))

    rows = []
    prehabbed = None
    for ratio in ratios:
        for name, pre, method, zs_ranks, post in parsed:
            t0 = time.perf_counter()
            if pre and prehabbed is None:
                from .prehab import prehab

                prehabbed = copy.deepcopy(base)
                rep = prehab(prehabbed, calib, train, progress=progress, **pre_opts)
                if artifacts is not None:
                    artifacts["prehab"] = rep
                fid = fidelity(prehabbed)
                rows.append({"method": "prehab (dense)", "keep_ratio": 1.0, "cosine": fid["cosine"],
                             "nn_agreement": fid["nn_agreement"], "params_kept": None,
                             "params_dense": None, "kept_fraction": 1.0,
                             "seconds": time.perf_counter() - t0,
                             "stable_rank": [rep.mean_stable_rank_before, rep.mean_stable_rank_after]})
                t0 = time.perf_counter()
            model = copy.deepcopy(prehabbed if pre else base)
            allocation = "zs" if zs_ranks else "uniform"
            valid = method_options(method, allocation)
            options = {k: v for k, v in (compress_options or {}).items() if k in valid}
            if zs_ranks or get_method(method).allocation == "zs":
                options.update(zs_opts)  # the demo's zs settings win over compress_options
            report = compress(model, method, ratio, calib, progress=progress, allocation=allocation, **options)
            if post:
                from .rehab import rehab

                rehab(model, train, reference=base, progress=progress, **re_opts)
            if artifacts is not None:
                artifacts[(name, ratio)] = report
            fid = fidelity(model)
            rows.append({"method": name, "keep_ratio": ratio, "cosine": fid["cosine"],
                         "nn_agreement": fid["nn_agreement"], "params_kept": report.params_kept,
                         "params_dense": report.params_dense, "kept_fraction": report.kept_fraction,
                         "seconds": time.perf_counter() - t0,
                         "ranks": sorted({str(layer.rank) for layer in report.layers})
                         if get_method(method).allocation or zs_ranks else None})
    return rows


def format_demo(rows, keep_ratio=None) -> str:
    head = ("method", "keep", "embed cosine", "NN agreement", "params kept", "time (s)")
    lines = [head]
    for r in rows:
        kept = ("dense" if r["params_kept"] is None else
                f"{r['params_kept']:,} / {r['params_dense']:,} ({r['kept_fraction']:.3f})")
        lines.append((r["method"], f"{r['keep_ratio']:g}", f"{r['cosine']:.4f}", f"{r['nn_agreement']:.4f}",
                      kept, f"{r['seconds']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    title = ("all-MiniLM-L6-v2, keep_ratio = fraction of the attention+MLP parameters kept, built-in "
             "corpus (held-out sentences)")
    return title + "\n" + "\n".join(out)
