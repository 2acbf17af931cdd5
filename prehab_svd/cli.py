"""The ``prehab-svd`` command: ``compress``, ``prehab``, ``eval``, ``demo``, ``kernels`` and ``profile``.

Every user mistake ends with one line ``prehab-svd: error: ...`` and exit status 2, no traceback, and
no partial output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from .errors import PrehabError

from .io import load_model, load_tokenizer, read_config
from .pretrained import MODELS, resolve_model_path
from .utils import check_keep_ratio, is_causal_config, keep_ratio_list


def _config_is_causal(path: Path) -> bool:
    return is_causal_config(read_config(path))


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
    from .methods import get as get_method

    import torch

    from . import data
    from .compression import compress
    from .io import save_compressed

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise PrehabError(f"output folder '{out}' already exists; choose another --out or pass --overwrite")
    check_keep_ratio(args.keep_ratio, "--keep-ratio")
    _check_low_memory_flags(args)
    path = resolve_model_path(args.model)
    causal = _config_is_causal(path)
    compress_defaults(args, causal)
    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else path)
    calibration = None
    if get_method(args.method).needs_calibration or not args.no_calibration:
        # Data problems are found before the (possibly large) model is loaded.
        texts = data.load_texts(args.data, split="train")
        calibration = _batches(tokenizer, texts, causal, args, calibration=True)
    rehab_batches = None
    if args.rehab:
        texts = data.load_texts(args.data, split="train")
        rehab_batches = _training_batches(tokenizer, texts, causal, args, args.rehab_samples,
                                          skip=args.num_samples)
    if args.low_memory:
        return _compress_low_memory(args, path, out, causal, tokenizer, calibration)
    model, causal = load_model(path, args.dtype)
    model.to(args.device)
    original = copy.deepcopy(model) if args.rehab and not causal else None
    report = compress(model, args.method, args.keep_ratio, calibration,
                      targets=args.targets, exclude=args.exclude, allocation=args.allocation, ranks=args.ranks,
                      stats_dtype=torch.float64 if args.fp64_stats else torch.float32, progress=not args.quiet,
                      pause_forwards=args.pause_forwards, **_method_options(args))
    print(report.table())
    extra = {"base_model": str(path.resolve()), "original_model": _original_of(path)}
    if args.rehab:
        from .training.rehab import rehab

        rep = rehab(model, rehab_batches, steps=args.rehab_steps, lr=args.rehab_lr,
                    lora_rank=args.lora_rank, reference=original, progress=not args.quiet)
        print(rep.summary())
        extra["rehab"] = rep.to_dict()
    save_compressed(model, out, report, tokenizer=tokenizer, overwrite=args.overwrite, extra=extra,
                    extra_files={"ranks.png": lambda p: _plot_ranks(report, p)})
    print(f"saved to {out} (ranks plot: {out / 'ranks.png'})")
    return 0


def _method_options(args) -> dict:
    """The method options of the command line that the chosen method (and allocation) takes; the
    flags of other methods are left out (they keep their defaults there)."""
    from .compression import method_options

    given = dict(alpha=args.alpha, damping=args.damping, shrinkage=args.shrinkage, anchor=args.anchor,
                 task=args.task, grad_samples=args.grad_samples, correction=args.correction,
                 min_rank_fraction=args.min_rank_fraction)
    valid = method_options(args.method, getattr(args, "allocation", "uniform"))
    # an unset flag (None) leaves the method's own default
    return {k: v for k, v in given.items() if k in valid and not (k in ("shrinkage", "anchor") and v is None)}


# What `compress` does when the user passes nothing but a model and --out: the best of the measured
# settings, on SmolLM2 and MiniLM alike (results/default_method.md): aa-svd's factors at zs-svd's ranks.
DEFAULT_METHOD, DEFAULT_ALLOCATION = "aa-svd", "zs"
DEFAULT_METHOD_LOW_MEMORY = "aa-svd"  # uniform ranks: zs-svd's need the whole model's task gradient
CAUSAL_CALIBRATION = dict(num_samples=64, seq_len=256)  # 16k tokens: windows of the calibration text
ENCODER_CALIBRATION = dict(num_samples=128, seq_len=128)  # sentences, truncated to 128 tokens


def compress_defaults(args, causal: bool) -> None:
    """Fill the options left unset (None) with the defaults for this kind of model."""
    from .methods import get as get_method

    if args.method is None:
        if args.low_memory:
            args.method = DEFAULT_METHOD_LOW_MEMORY
        else:
            args.method = DEFAULT_METHOD
            if args.allocation is None:
                args.allocation = DEFAULT_ALLOCATION
    if args.allocation is None:
        args.allocation = "uniform"
    if args.low_memory and get_method(args.method).allocation is not None:
        raise PrehabError(f"--low-memory cannot run {args.method} (it needs the task gradient of the whole model); "
                          "choose --method svd-llm or aa-svd, or drop --low-memory")
    if args.min_rank_fraction is None and causal:
        from .compression import ZS_MIN_RANK_CAUSAL

        args.min_rank_fraction = ZS_MIN_RANK_CAUSAL
    for key, value in (CAUSAL_CALIBRATION if causal else ENCODER_CALIBRATION).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _check_low_memory_flags(args) -> None:
    if not args.low_memory:
        if args.resume is not None:
            raise PrehabError("--resume / --no-resume apply to --low-memory compression only")
        return
    if args.rehab:
        raise PrehabError("--rehab fine-tunes the whole compressed model, which --low-memory never holds "
                          "in memory; drop --low-memory, or run rehab on the saved model afterwards")
    if args.no_calibration:
        raise PrehabError("--low-memory needs calibration data; drop --no-calibration")
    if args.pause_forwards:
        raise PrehabError("--pause-forwards holds every batch's activations at once, against the point of "
                          "--low-memory; drop one of them")
    if args.allocation not in (None, "uniform") or args.ranks:
        raise PrehabError("--allocation and --ranks are not available with --low-memory yet; "
                          "drop them or compress in memory")


def _compress_low_memory(args, path: Path, out: Path, causal: bool, tokenizer, calibration) -> int:
    """--low-memory: one block in memory at a time, read from the safetensors; resumable."""
    import torch
    import transformers

    from .streaming import checkpoint_dir, compress_pretrained

    dtype = None
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise PrehabError(f"--dtype {args.dtype!r} is not a torch dtype (float32, bfloat16, float16, ...)")
    try:
        report = compress_pretrained(
            path, out, args.method, args.keep_ratio, calibration, resume=args.resume is not False,
            overwrite=args.overwrite, device=args.device, dtype=dtype, targets=args.targets,
            exclude=args.exclude, **_method_options(args), stats_dtype=torch.float64 if args.fp64_stats else torch.float32,
            model_class=transformers.AutoModelForCausalLM if causal else transformers.AutoModel,
            tokenizer=tokenizer, extra={"base_model": str(path.resolve()), "original_model": _original_of(path)},
            extra_files={"ranks.png": lambda p, rep: _plot_ranks(rep, p)}, progress=not args.quiet)
    except KeyboardInterrupt:
        if checkpoint_dir(out).is_dir():
            print(f"prehab-svd: the finished blocks are kept in {checkpoint_dir(out)}; run the same "
                  "command again to continue from there", file=sys.stderr)
        raise
    print(report.table())
    if "resumed_at_block" in report.details:
        print(f"resumed at block {report.details['resumed_at_block']} from the checkpoint in "
              f"{checkpoint_dir(out)}")
    print(f"saved to {out} (ranks plot: {out / 'ranks.png'})")
    return 0


def _original_of(path: Path) -> str:
    """The uncompressed, un-fine-tuned model a folder descends from (itself for a plain HF folder)."""
    meta = path / "prehab_svd.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return m.get("original_model") or m.get("base_model") or str(path.resolve())
    return str(path.resolve())


def _plot_ranks(report, path):
    from .plots import plot_ranks

    plot_ranks(report, path)


def _training_batches(tokenizer, texts, causal, args, num, *, skip: int):
    """``num`` training sequences from ``texts`` after the first ``skip`` (the calibration ones), or
    from the start when the text is too short to hold both."""
    from . import data

    if num < 1:
        raise PrehabError(f"the number of training samples must be positive, got {num}")
    if causal:
        return data.causal_lm_batches(tokenizer, texts, num_samples=num, seq_len=args.seq_len,
                                      batch_size=args.batch_size, seed=args.seed + 1)
    pool = texts[skip:] if len(texts) - skip >= num else texts
    if len(pool) < num:
        raise PrehabError(f"the training text has {len(pool)} passages, fewer than the {num} asked; pass "
                          "more text with --data or ask for fewer samples")
    return data.sentence_batches(tokenizer, pool[:num], batch_size=args.batch_size, max_length=args.seq_len)


def _surrogate_arg(args):
    """--surrogate, or a CompressedTask when --exact-subspace/--no-split shape the compressed one."""
    from .training.surrogates import CompressedTask, resolve_surrogate

    if not (args.exact_subspace or args.no_split):
        return args.surrogate
    try:
        chosen = resolve_surrogate(args.surrogate, args.keep_ratio)
    except ValueError as e:
        raise PrehabError(str(e)) from None
    if chosen.name != "compressed":
        raise PrehabError("--exact-subspace and --no-split shape the compressed surrogate; pass --keep-ratio "
                          f"(and no --surrogate, or --surrogate compressed), not --surrogate {chosen.name}")
    return CompressedTask(track=not args.exact_subspace, split=not args.no_split)


def cmd_prehab(args) -> int:
    """Prehab: fine-tune the dense model toward low rank; save it with its log and a spectra plot."""
    import torch

    from . import data
    from .io import save_compressed
    from .training.prehab import prehab

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise PrehabError(f"output folder '{out}' already exists; choose another --out or pass --overwrite")
    path = resolve_model_path(args.model)
    causal = _config_is_causal(path)
    tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else path)
    texts = data.load_texts(args.data, split="train")
    calibration = _batches(tokenizer, texts, causal, args, calibration=True)
    train = _training_batches(tokenizer, texts, causal, args, args.train_samples, skip=args.num_samples)
    model, causal = load_model(path, args.dtype)
    model.to(args.device)
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.train_dtype]
    report = prehab(model, calibration, train, steps=args.steps, lam=args.lam, lam_start=args.lam_start,
                    warmup_steps=args.warmup_steps, surrogate=_surrogate_arg(args),
                    keep_ratio=args.keep_ratio, ranks=args.ranks, task=args.task, lr=args.lr,
                    optimizer=args.optimizer,
                    grad_clip=args.grad_clip if args.grad_clip > 0 else None,
                    dtype=dtype, targets=args.targets, exclude=args.exclude, damping=args.damping,
                    log_every=0 if args.quiet else args.log_every, progress=not args.quiet)
    print(report.summary())

    def spectra(p):
        from .plots import plot_spectra

        plot_spectra(report.layers, report.spectra_before, report.spectra_after, p)

    def log(p):
        Path(p).write_text(json.dumps(report.to_dict(), indent=1))

    save_compressed(model, out, None, tokenizer=tokenizer, overwrite=args.overwrite,
                    extra={"base_model": str(path.resolve()), "original_model": _original_of(path),
                           "stage": "prehab",
                           "prehab": {k: v for k, v in report.to_dict().items() if k != "steps"}},
                    extra_files={"spectra.png": spectra, "prehab_log.json": log})
    print(f"saved the fine-tuned dense model to {out} (spectra plot: {out / 'spectra.png'}); compress it "
          f"next, e.g. prehab-svd compress {out} --method aa-svd --out ...")
    return 0


EVAL_SEQ_LEN = 2048  # the papers' perplexity window; capped by the model's context
EVAL_TOKENS = 65536  # tokens scored by default (about a minute for SmolLM2 on 2 CPU cores); 0: all


def _context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def eval_windows(args, model) -> tuple[int, int, int | None]:
    """(seq_len, batch_size, max_batches) of a causal perplexity run: --seq-len or the papers' 2048
    capped by the model's context; --batch-size or as many windows as make 4,096 tokens; at most
    --max-tokens tokens (or --max-eval-batches batches)."""
    ctx = _context_length(model)
    seq = args.seq_len or (min(EVAL_SEQ_LEN, ctx) if ctx else EVAL_SEQ_LEN)
    if ctx and seq > ctx:
        raise PrehabError(f"--seq-len {seq} is longer than the model's context ({ctx} tokens)")
    batch = args.batch_size or max(1, 4096 // seq)
    limit = args.max_eval_batches
    if limit is None and args.max_tokens:
        windows = args.max_tokens // seq
        if windows < 1:
            raise PrehabError(f"--max-tokens {args.max_tokens} is shorter than one window of {seq} tokens")
        batch = min(batch, windows)
        limit = windows // batch
    return seq, batch, limit


def _reference_of(path: Path, given) -> str | None:
    """--reference, else the original model ``path`` descends from (None for an original itself)."""
    if given is not None:
        return given
    ref = _original_of(path)
    return None if Path(ref).resolve() == path.resolve() else ref


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
    ref_path = _reference_of(path, args.reference)
    args.prompt = args.prompt or evaluate.DEFAULT_PROMPT
    if causal:
        seq, batch, limit = eval_windows(args, model)
        batches = data.eval_lm_batches(tokenizer, texts, seq_len=seq, batch_size=batch, max_batches=limit)
        rows = []
        models = [("model", str(path), lambda: model)]
        if ref_path is not None and not args.no_reference:
            models.append(("dense original", ref_path, lambda: load_model(resolve_model_path(ref_path))[0]))
        for label, where, get in models:
            m = get().to(args.device)
            res = evaluate.perplexity(m, batches, progress=not args.quiet)
            gen = evaluate.generate_text(m, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
            rows.append({"model": label, "path": where, "perplexity": res.ppl, "nll": res.nll,
                         "tokens": res.tokens, "nonfinite_batches": res.nonfinite_batches,
                         "prompt": args.prompt, "generation": gen})
            del m
        print(f"perplexity on {args.data} ({args.split}), {len(batches) and batches[0]['input_ids'].shape[1]}-token "
              f"windows; greedy answer to {args.prompt!r}")
        width = max(len(r["model"]) for r in rows)
        for r in rows:
            print(f"{r['model'].ljust(width)}  ppl {r['perplexity']:10.4f} over {r['tokens']:,} tokens  "
                  f"-> {r['generation']!r}")
            if r["nonfinite_batches"]:
                print(f"WARNING: non-finite loss in batches {r['nonfinite_batches']} of {r['model']} "
                      "(counted, not dropped)")
        line = dict(rows[0], reference=rows[1] if len(rows) > 1 else None)
    else:
        args.seq_len, args.batch_size = args.seq_len or 128, args.batch_size or 8
        batches = _batches(tokenizer, texts, causal, args, calibration=False)
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


def cmd_demo(args) -> int:
    keep_ratio_list(args.keep_ratio or [], "--keep-ratio")  # before any model is loaded
    if args.model == "smollm2":
        from .demo_causal import CAUSAL_DEMO_DEFAULT, format_causal_demo, run_causal_demo

        rows = run_causal_demo(args.methods or list(CAUSAL_DEMO_DEFAULT), args.keep_ratio or [0.8],
                               calib_windows=args.num_calib or 32, eval_tokens=args.eval_tokens,
                               progress=not args.quiet)
        if args.quiet:
            print(format_causal_demo(rows))
    else:
        from .demo_encoder import DEMO_DEFAULT, format_demo, run_demo

        rows = run_demo(args.methods or list(DEMO_DEFAULT), args.keep_ratio or [0.6], args.num_calib or 256,
                        args.num_eval, progress=not args.quiet)
        print(format_demo(rows, args.keep_ratio))
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_profile(args) -> int:
    """Run one stage under torch.profiler: write a Chrome trace, print the top ops with achieved
    TFLOP/s and GB/s against the device's measured peaks (see prehab_svd/profiling.py)."""
    import json as _json

    from .profiling import profile_stage

    opts = {k: v for k, v in dict(
        in_features=args.in_features, out_features=args.out_features, rank=args.rank, tokens=args.tokens,
        keep_ratio=args.keep_ratio, backend=args.backend, batch_size=args.batch_size, seq_len=args.seq_len,
        model=args.model, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
        heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab).items() if v is not None}
    if args.keep_ratio is not None:
        check_keep_ratio(args.keep_ratio, "--keep-ratio")
    res = profile_stage(args.stage, args.trace, device=args.device, dtype=args.dtype, steps=args.steps,
                        warmup=args.warmup, overwrite=args.overwrite, **opts)
    print(res.table(args.top))
    if args.json:
        print(_json.dumps(res.to_dict()))
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


def _shrinkage_arg(text: str):
    if text.strip().lower() == "oas":
        return "oas"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'oas', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .compression import METHODS
    from .methods import DEFAULT_SHRINKAGE
    from .methods.aa_svd import DEFAULT_ANCHOR
    from .methods.zs_svd import ZS_DEFAULT_SHRINKAGE

    p = argparse.ArgumentParser(prog="prehab-svd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common_data(sp, default_batch, default_seq=128, seq_help="tokens per sequence"):
        sp.add_argument("--data", default="builtin",
                        help="'builtin', 'licenses', a local .txt/.jsonl file or folder, or wikitext2/ptb/c4")
        sp.add_argument("--seq-len", type=int, default=default_seq, help=seq_help)
        sp.add_argument("--batch-size", type=int, default=default_batch)
        sp.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("compress", help="compress a model and save it (safetensors + ranks)")
    c.add_argument("model", help="a model name (" + ", ".join(MODELS) + "), a local Hugging Face folder or a .gguf file")
    c.add_argument("--method", choices=METHODS, default=None,
                   help=f"default: {DEFAULT_METHOD} with zs-svd's ranks (--allocation {DEFAULT_ALLOCATION}); "
                        f"{DEFAULT_METHOD_LOW_MEMORY} with uniform ranks with --low-memory (measured best: "
                        "results/default_method.md)")
    c.add_argument("--keep-ratio", type=float, default=0.6,
                   help="fraction of the targeted parameters KEPT (0.6 keeps 60%%)")
    c.add_argument("--out", required=True, help="output folder (must not exist)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--num-samples", type=int, default=None,
                   help="calibration sequences: windows of --seq-len tokens for a causal LM (default 64 x 256 "
                        "tokens), sentences for an encoder (default 128)")
    c.add_argument("--targets", nargs="*", default=None, help="layer name patterns (default: all in blocks)")
    c.add_argument("--exclude", nargs="*", default=None)
    c.add_argument("--dtype", default="auto", help="load dtype: auto, float32, bfloat16, ...")
    c.add_argument("--fp64-stats", action="store_true",
                   help="compute each batch's covariance product in float64 (default fp32; the sums over "
                        "batches are float64 always): independent of the backend, ~12 %% slower on a CPU")
    c.add_argument("--pause-forwards", action="store_true",
                   help="aa-svd: run each block forward once per batch and stream, paused at every layer "
                        "group (~1.5x faster; holds every batch's activations at once: about twice the "
                        "peak memory); not with --low-memory")
    c.add_argument("--no-calibration", action="store_true", help="svd only: skip calibration")
    c.add_argument("--damping", type=float, default=0.0,
                   help="add damping·tr(G)/d to each Gram matrix (0: exact optimum; ~1e-2 helps aa-svd "
                        "when calibration tokens are few)")
    c.add_argument("--shrinkage", type=_shrinkage_arg, default=None,
                   help="fit the factors to covariances shrunk toward their diagonals, (1-a)G + a diag(G), "
                        "a in [0, 1] (0: the exact optimum on the calibration text), or 'oas': a per "
                        f"group from the statistics (Oracle Approximating Shrinkage); default "
                        f"{DEFAULT_SHRINKAGE} for svd-llm and aa-svd, {ZS_DEFAULT_SHRINKAGE} for zs-svd (measured)")
    c.add_argument("--anchor", type=float, default=None,
                   help="aa-svd: the share in [0, 1] of the upstream compression error the factors undo "
                        f"(1: the paper's full anchoring; default {DEFAULT_ANCHOR}, measured best on "
                        "held-out text)")
    c.add_argument("--allocation", choices=["uniform", "zs"], default=None,
                   help="how the budget is spread over the layers: uniform ranks, or zs-svd's zero-sum "
                        "selection with this method's factors (default: uniform, or the default method's)")
    c.add_argument("--ranks", default=None,
                   help="per-layer ranks from a saved compressed model folder or a JSON file {layer: rank}")
    c.add_argument("--alpha", type=float, default=0.5, help="asvd's activation exponent")
    c.add_argument("--task", default="auto", choices=["auto", "causal_lm", "distill", "contrastive"],
                   help="zs-svd: the task loss of the gradient (auto: cross-entropy for a causal LM, "
                        "in-batch contrastive for an encoder)")
    c.add_argument("--grad-samples", type=int, default=64,
                   help="zs-svd: calibration sequences the task gradient is averaged over")
    c.add_argument("--correction", action="store_true",
                   help="zs-svd: one projected correction step before re-truncation")
    c.add_argument("--min-rank-fraction", type=float, default=None,
                   help="zs-svd: no matrix below this fraction of its break-even rank (at least rank 1); "
                        "default: 0.3 for a causal LM (SmolLM2 at keep 0.8: perplexity 43.8 on license text "
                        "against 47.8 with 0.75·keep), 0.75·keep-ratio for an encoder (MiniLM)")
    c.add_argument("--rehab", action="store_true", help="LoRA recovery fine-tuning after compression")
    c.add_argument("--rehab-steps", type=int, default=100)
    c.add_argument("--rehab-lr", type=float, default=1e-4)
    c.add_argument("--rehab-samples", type=int, default=512, help="training sequences for rehab")
    c.add_argument("--lora-rank", type=int, default=8)
    c.add_argument("--low-memory", action="store_true",
                   help="read the model's safetensors one block at a time (peak memory: one block plus "
                        "its statistics, whatever the model size); writes a checkpoint after every block "
                        "to OUT.partial/, so a killed run continues where it stopped. Not for zs-svd or "
                        "--rehab")
    c.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="with --low-memory: continue from OUT.partial/ when it holds a checkpoint of the "
                        "same command (default), or discard it (--no-resume)")
    common_data(c, 8, None, "tokens per calibration window (causal LM, default 256) or the sentences' "
                            "maximum length (encoder, default 128)")
    c.set_defaults(func=cmd_compress)

    pr = sub.add_parser("prehab", help="fine-tune a dense model toward low rank before compressing it")
    pr.add_argument("model", help="a model name (" + ", ".join(MODELS) + "), a local Hugging Face folder or a .gguf file")
    pr.add_argument("--out", required=True, help="output folder (must not exist)")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--steps", type=int, default=100)
    pr.add_argument("--lam", type=float, default=None,
                    help="weight of the surrogate after warm-up (default: 1 for compressed, 0.01 for tail, 10 "
                         "for stable and nuclear)")
    pr.add_argument("--lam-start", type=float, default=1e-3, help="its weight at step 1")
    pr.add_argument("--warmup-steps", type=int, default=10)
    pr.add_argument("--surrogate", choices=["stable", "nuclear", "tail", "compressed"], default=None,
                    help="tail: shrink the whitened energy beyond the rank of --keep-ratio; compressed: "
                         "add the task loss of the model svd-llm would make at --keep-ratio (both need it). "
                         "Default: compressed with --keep-ratio, else stable")
    pr.add_argument("--keep-ratio", type=float, default=None,
                    help="the keep ratio of the compression after Prehab (selects the compressed surrogate)")
    pr.add_argument("--ranks", default=None,
                    help="compressed: truncate each layer to its rank from a saved compressed model folder "
                         "or a JSON file {layer: rank} (e.g. the ranks of a zs allocation) instead of the "
                         "uniform rank of --keep-ratio")
    pr.add_argument("--exact-subspace", action="store_true",
                    help="compressed: recompute every layer's truncation by SVD at every step instead of "
                         "tracking it (several times slower)")
    pr.add_argument("--no-split", action="store_true",
                    help="compressed: both loss terms on the whole batch (two passes a step) instead of "
                         "half of it each")
    pr.add_argument("--task", default="auto", choices=["auto", "causal_lm", "distill", "contrastive"],
                    help="auto: distillation to the original with the compressed surrogate (--keep-ratio) "
                         "or for an encoder, else cross-entropy; distill: the KL divergence to the "
                         "original's next-token distribution for a causal LM (zero at the original), "
                         "1 - cos to its sentence embeddings for an encoder; causal_lm: cross-entropy of "
                         "the training text")
    pr.add_argument("--lr", type=float, default=None, help="default: 1e-4 for compressed, else 2e-5")
    pr.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
    pr.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    pr.add_argument("--train-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="autocast dtype of the training forward")
    pr.add_argument("--num-samples", type=int, default=128, help="calibration sequences (covariances)")
    pr.add_argument("--train-samples", type=int, default=1024, help="training sequences")
    pr.add_argument("--targets", nargs="*", default=None)
    pr.add_argument("--exclude", nargs="*", default=None)
    pr.add_argument("--dtype", default="auto", help="load dtype")
    pr.add_argument("--damping", type=float, default=0.0)
    pr.add_argument("--log-every", type=int, default=10)
    common_data(pr, 16)
    pr.set_defaults(func=cmd_prehab)

    e = sub.add_parser("eval", help="perplexity (causal LM) or embedding fidelity (encoder)")
    e.add_argument("model")
    e.add_argument("--reference", default=None,
                   help="the original model to compare with (default: the one the folder descends from)")
    e.add_argument("--split", default="test")
    e.add_argument("--max-eval-batches", type=int, default=None, help="causal LM: cap on batches")
    e.add_argument("--max-tokens", type=int, default=EVAL_TOKENS,
                   help="causal LM: score at most this many tokens (consecutive windows; 0: the whole text)")
    e.add_argument("--prompt", default=None, help="causal LM: the prompt of the greedy generation shown")
    e.add_argument("--max-new-tokens", type=int, default=24)
    e.add_argument("--no-reference", action="store_true",
                   help="causal LM: do not also measure the dense model the compressed one came from")
    e.add_argument("--num-samples", type=int, default=None, help="encoder: held-out sentences (default all)")
    e.add_argument("--json", action="store_true")
    common_data(e, None, None, "tokens per window (default: causal LM 2048 capped by the model's context, "
                              "encoder 128); batch size default: 4096 tokens a batch (encoder 8)")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="compress a packaged real model with several methods and compare")
    d.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2",
                   help="smollm2: the causal LM, perplexity and answers (default); minilm: the encoder, "
                        "embedding fidelity")
    d.add_argument("--methods", nargs="*", default=None,
                   help="smollm2: each [zs-ranks+]METHOD[+rehab]; minilm: each [prehab+][zs-ranks+]METHOD[+rehab]; "
                        "METHOD one of " + ", ".join(METHODS))
    d.add_argument("--keep-ratio", type=float, nargs="+", default=None, help="default 0.8 (smollm2), 0.6 (minilm)")
    d.add_argument("--num-calib", type=int, default=None,
                   help="calibration windows of 256 tokens (smollm2, default 32) or sentences (minilm, 256)")
    d.add_argument("--num-eval", type=int, default=512, help="minilm: held-out sentences")
    d.add_argument("--eval-tokens", type=int, default=4096, help="smollm2: tokens scored of each held-out text")
    d.add_argument("--json", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    k = sub.add_parser("kernels", help="compile every Triton kernel for a GPU target, no GPU needed")
    k.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    k.set_defaults(func=cmd_kernels)

    pf = sub.add_parser("profile", help="profile a stage under torch.profiler: Chrome trace + top ops")
    pf.add_argument("stage", choices=["calibration", "lowrank", "decode"],
                    help="calibration: covariances over one batch; lowrank: one LowRankLinear forward; "
                         "decode: one decode step of a compressed model")
    pf.add_argument("--trace", required=True, help="Chrome trace file to write (open in Perfetto)")
    pf.add_argument("--overwrite", action="store_true")
    pf.add_argument("--device", default="cpu")
    pf.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    pf.add_argument("--steps", type=int, default=3, help="profiled repetitions of the stage")
    pf.add_argument("--warmup", type=int, default=2)
    pf.add_argument("--top", type=int, default=15, help="rows of the table")
    pf.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    pf.add_argument("--in-features", type=int, default=None, help="lowrank (default 4096)")
    pf.add_argument("--out-features", type=int, default=None, help="lowrank (default 4096)")
    pf.add_argument("--rank", type=int, default=None, help="lowrank (default: from --keep-ratio)")
    pf.add_argument("--tokens", type=int, default=None, help="lowrank (default 16)")
    pf.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cuda"],
                    help="lowrank: the op backend")
    pf.add_argument("--keep-ratio", type=float, default=None,
                    help="lowrank rank / decode compression (default 0.6; decode 1.0 = dense)")
    pf.add_argument("--batch-size", type=int, default=None, help="calibration (4) / decode (1) sequences")
    pf.add_argument("--seq-len", type=int, default=None, help="calibration tokens per sequence / decode "
                                                             "prompt length (default 256 / 128)")
    pf.add_argument("--model", default=None, help="calibration/decode: a local model folder instead of "
                                                  "a random LLaMA-shaped one")
    pf.add_argument("--hidden", type=int, default=None, help="random model: hidden size (256)")
    pf.add_argument("--intermediate", type=int, default=None, help="random model: MLP size (688)")
    pf.add_argument("--layers", type=int, default=None, help="random model: blocks (2)")
    pf.add_argument("--heads", type=int, default=None, help="random model: attention heads (4)")
    pf.add_argument("--kv-heads", type=int, default=None, help="random model: key/value heads (2)")
    pf.add_argument("--vocab", type=int, default=None, help="random model: vocabulary (1024)")
    pf.set_defaults(func=cmd_profile)
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
