"""The causal-LM demo: compress the real SmolLM2-135M-Instruct with several methods, show perplexity
and what each compressed model answers.

Calibration: windows of the built-in corpus (Python's docstrings, train split). Perplexity, in
consecutive windows (the papers' protocol), on two held-out texts: the built-in corpus's held-out split
(the calibration's kind of text) and ``licenses`` (license texts: English of another kind). The answer:
the greedy reply to a fixed question through the model's chat template.

A method is ``METHOD`` (one of :data:`prehab_svd.METHODS`), ``zs-ranks+METHOD`` (zs-svd's zero-sum
allocation of the budget over the layers, ``METHOD``'s factors at those ranks) or either with
``+rehab`` (LoRA recovery on the calibration kind of text afterwards).
"""

from __future__ import annotations

import copy
import time

from .compression import ZS_MIN_RANK_CAUSAL
from .errors import PrehabError
from .utils import keep_ratio_list

__all__ = ["CAUSAL_DEMO_DEFAULT", "parse_causal_method", "heldout_sets", "run_causal_demo",
           "format_causal_demo"]

CAUSAL_DEMO_DEFAULT = ("svd-llm", "zs-ranks+aa-svd")  # the papers' uniform baseline and the CLI's default
ZS_OPTIONS = dict(grad_samples=32, min_rank_fraction=ZS_MIN_RANK_CAUSAL)
HELDOUT = {"builtin": "test", "licenses": "test"}  # the calibration's kind of text; another kind
REHAB_OPTIONS = dict(steps=60, lr=1e-4, lora_rank=8)


def parse_causal_method(name: str) -> tuple[str, dict, bool]:
    """``[zs-ranks+]METHOD[+rehab]`` -> (method, compress options, rehab after?)."""
    from .compression import METHODS
    from .methods import get as get_method

    parts = name.split("+")
    post = parts[-1] == "rehab"
    if post:
        parts = parts[:-1]
    opts: dict = {}
    if len(parts) == 2 and parts[0] == "zs-ranks":
        opts = dict(allocation="zs", **ZS_OPTIONS)
        parts = parts[1:]
    if len(parts) != 1 or parts[0] not in METHODS:
        raise PrehabError(f"unknown demo method {name!r}: use [zs-ranks+]METHOD[+rehab] with METHOD one of "
                          f"{', '.join(METHODS)}")
    method = parts[0]
    if get_method(method).allocation == "zs":
        if opts:
            raise PrehabError(f"zs-ranks+{method} is just {method}")
        opts = dict(ZS_OPTIONS)
    return method, opts, post


def heldout_sets(tokenizer, eval_len: int, eval_tokens: int) -> dict:
    """{text name: perplexity batches} of :data:`HELDOUT`: consecutive ``eval_len``-token windows,
    about ``eval_tokens`` tokens of each (at least one window), up to 4,096 tokens a batch."""
    from . import data

    per = max(1, min(4096 // eval_len, eval_tokens // eval_len))
    return {name: data.eval_lm_batches(tokenizer, data.load_texts(name, split), seq_len=eval_len, batch_size=per,
                                       max_batches=max(1, eval_tokens // (eval_len * per)))
            for name, split in HELDOUT.items()}


def run_causal_demo(methods=CAUSAL_DEMO_DEFAULT, keep_ratio=0.8, *, calib_windows=32, calib_len=256,
                    eval_len=2048, eval_tokens=4096, max_new_tokens=20, progress=True, model_name="smollm2",
                    targets=None):
    """Rows (dicts) of the demo table: the dense model first, then every method at every keep ratio
    (``targets``: name patterns of the layers to compress, default all in the blocks)."""
    from . import data, evaluate
    from .compression import compress
    from .pretrained import load_pretrained

    ratios = keep_ratio_list(keep_ratio)
    parsed = [(m, *parse_causal_method(m)) for m in methods]
    base, tok = load_pretrained(model_name)
    calib_texts = data.load_texts("builtin", "train")
    calib = data.causal_lm_batches(tok, calib_texts, num_samples=calib_windows, seq_len=calib_len,
                                   batch_size=8, seed=0)
    sets = heldout_sets(tok, eval_len, eval_tokens)
    train = None

    def measure(model, row):
        for name, batches in sets.items():
            res = evaluate.perplexity(model, batches)
            row[f"ppl_{name}"] = res.ppl
            row[f"tokens_{name}"] = res.tokens
        row["answer"] = evaluate.generate_text(model, tok, evaluate.DEFAULT_PROMPT, max_new_tokens=max_new_tokens)
        return row

    rows = [measure(base, {"method": "dense", "keep_ratio": 1.0, "params_kept": None, "seconds": 0.0})]
    if progress:
        print(format_causal_demo(rows[-1:], header=True), flush=True)
    for ratio in ratios:
        for name, method, opts, post in parsed:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            report = compress(model, method, ratio, calib, targets=targets, **opts)
            if post:
                from .training.rehab import rehab

                if train is None:
                    train = data.causal_lm_batches(tok, calib_texts, num_samples=8 * REHAB_OPTIONS["steps"],
                                                   seq_len=calib_len, batch_size=8, seed=1)
                rehab(model, train, **REHAB_OPTIONS)
            row = {"method": name, "keep_ratio": ratio, "params_kept": report.params_kept,
                   "params_dense": report.params_dense, "kept_fraction": report.kept_fraction,
                   "seconds": time.perf_counter() - t0}
            rows.append(measure(model, row))
            if progress:
                print(format_causal_demo(rows[-1:], header=False), flush=True)
            del model
    return rows


_HEAD = ("method", "keep", "ppl builtin", "ppl licenses", "params kept", "time (s)", "answer")
_WIDTHS = (18, 5, 11, 12, 11, 8)


def format_causal_demo(rows, header: bool = True) -> str:
    """Fixed-width lines (so rows can be printed as they come), the answer last."""
    def line(cells):
        first = [cells[0].ljust(_WIDTHS[0])] + [c.rjust(w) for c, w in zip(cells[1:6], _WIDTHS[1:])]
        return "  ".join(first + [cells[6]])

    out = []
    if header:
        out.append("SmolLM2-135M-Instruct; keep = fraction of the attention+MLP parameters kept; perplexity on "
                   "held-out builtin text (the calibration's kind) and on license texts (another kind)")
        out.append(line(_HEAD))
        out.append("-" * 100)
    for r in rows:
        kept = "dense" if r.get("params_kept") is None else f"{r['kept_fraction']:.3f}"
        out.append(line((r["method"], f"{r['keep_ratio']:g}", f"{r['ppl_builtin']:.2f}", f"{r['ppl_licenses']:.2f}",
                         kept, f"{r['seconds']:.0f}", repr(r["answer"]))))
    return "\n".join(out)
