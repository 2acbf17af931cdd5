"""Every compression method on the real SmolLM2-135M-Instruct (causal LM, CPU): perplexity and generation.

Each row runs in its own process (so its peak memory is its own), compresses a fresh copy of the model
with ``prehab_svd.compress`` on windows of the built-in corpus (Python's docstrings), and measures:

* perplexity on two held-out texts, in consecutive windows (the papers' protocol): the built-in
  corpus's held-out split (text of the calibration's kind) and ``licenses`` (the license texts that
  ship with the machine: English of another kind);
* the greedy answer to a fixed chat prompt;
* seconds (compression, with its phases) and peak resident memory of the row's process.

Rows are cached in ``OUT/methods_smollm2.json`` by their settings, so an interrupted run continues
where it stopped and a second run only adds rows; ``--fresh`` starts over. The table
``OUT/methods_smollm2.md`` is rewritten after every row.

Usage::

    python scripts/methods_smollm2.py [--out results] [--suite table|calibration|all|none] [--extra SPEC]
    python scripts/methods_smollm2.py --layers '{"method": "svd-llm", "keep": 0.8}'  # which layers lose most
    python scripts/methods_smollm2.py --row '{"method": "svd-llm", "keep": 0.8}'   # one row, printed

Sizes (all options): ``--calib-windows 64 --calib-len 256`` (16k calibration tokens), ``--eval-len
2048 --eval-tokens 8192`` per text (the same windows for every row). About 2-3 minutes a row on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _rows import machine
from prehab_svd.utils import set_submodule, write_atomic

ROOT = Path(__file__).resolve().parent.parent
TABLE_METHODS = ["svd", "asvd", "svd-llm", "aa-svd", "zs-svd", "svd-llm+rehab"]
TABLE_RATIOS = [0.8, 0.6, 0.4]
DEFAULT_CALIB = 64  # windows of 256 tokens: 16k calibration tokens
CALIB_SWEEP = [64, 256, 512]  # 16k, 64k, 128k tokens
REHAB_LR = 2e-4  # LoRA rank 8 on the factors, causal-LM loss on windows of the calibration's kind of text
PROBE_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _comparable(sizes) -> dict:
    """The sizes every row shares (a rehab row carries its own rehab settings in its spec; the Prehab
    cache is only where results are kept)."""
    return {k: v for k, v in (sizes or {}).items() if not k.startswith("rehab") and k != "prehab_cache"}


def row_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# One row (in a child process)


def run_row(spec: dict, sizes: dict) -> dict:
    import torch

    import prehab_svd
    from prehab_svd import data, evaluate
    from prehab_svd.demo_causal import heldout_sets
    from prehab_svd.pretrained import load_pretrained

    torch.manual_seed(0)
    t_load = time.perf_counter()
    model, tok = load_pretrained("smollm2")
    load_s = time.perf_counter() - t_load
    method = spec.get("method", "dense")
    calib_texts = data.load_texts("builtin", "train")
    windows = int(spec.get("calib", sizes["calib_windows"]))
    calib = data.causal_lm_batches(tok, calib_texts, num_samples=windows, seq_len=sizes["calib_len"],
                                   batch_size=8, seed=0)
    out = {"spec": spec, "calibration_tokens": windows * sizes["calib_len"], "load_seconds": round(load_s, 1)}
    if "prehab" in spec:  # Prehab first (or its cached result), at the row's keep ratio
        out["prehab"] = prehabbed(model, tok, calib, spec, sizes)
    t0 = time.perf_counter()
    if method != "dense":
        options = dict(spec.get("options", {}))
        if spec.get("dense"):  # these layers stay dense; the others share the rest of the same budget
            options["ranks"], out["keep_rest"] = dense_at_budget(model, spec["dense"], float(spec["keep"]))
        report = prehab_svd.compress(model, method, float(spec["keep"]), calib, **options)
        out.update(compress_seconds=round(report.seconds, 1),
                   timings={k: round(v, 1) for k, v in report.timings.items() if v},
                   params_kept=report.params_kept, params_dense=report.params_dense,
                   kept_fraction=round(report.kept_fraction, 4),
                   ranks={layer.name: layer.rank for layer in report.layers},
                   errors={layer.name: layer.rel_error_after for layer in report.layers})
        if spec.get("rehab"):
            from prehab_svd import rehab

            train = data.causal_lm_batches(tok, calib_texts, num_samples=int(spec.get("rehab_windows",
                                                                                  sizes["rehab_windows"])),
                                           seq_len=sizes["calib_len"], batch_size=4, seed=1)
            t1 = time.perf_counter()
            rehab_task = spec.get("rehab_task")  # None: the default (cross-entropy for a causal LM)
            # "distill": toward the original (the pretrained model, not a Prehab model)
            reference = load_pretrained("smollm2")[0] if rehab_task == "distill" else None
            rep = rehab(model, train, steps=int(spec.get("rehab_steps", sizes["rehab_steps"])),
                        lr=float(spec.get("rehab_lr", REHAB_LR)), task=rehab_task, reference=reference)
            out["rehab_seconds"] = round(time.perf_counter() - t1, 1)
            out["rehab_loss"] = [rep.steps[0]["task_loss"], rep.steps[-1]["task_loss"]] if rep.steps else None
    out["seconds"] = round(time.perf_counter() - t0, 1)
    for name, batches in heldout_sets(tok, sizes["eval_len"], sizes["eval_tokens"]).items():
        t1 = time.perf_counter()
        res = evaluate.perplexity(model, batches)
        out[f"ppl_{name}"] = res.ppl
        out[f"tokens_{name}"] = res.tokens
        out[f"eval_seconds_{name}"] = round(time.perf_counter() - t1, 1)
    out["generation"] = evaluate.generate_text(model, tok, evaluate.DEFAULT_PROMPT, max_new_tokens=24)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["machine"] = machine()
    return out


def prehabbed(model, tok, calib, spec: dict, sizes: dict) -> dict:
    """Run ``prehab_svd.prehab(model, calib, train, keep_ratio=keep, **spec["prehab"])`` in place (or
    load its result from the cache: every method of a keep ratio starts from the same Prehab), with
    training windows of the built-in corpus's train split drawn with another seed than the
    calibration's (4 windows of ``calib_len`` tokens a step). Returns the Prehab's report summary."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    from prehab_svd import data, prehab
    from prehab_svd.training.prehab import prehab_task_name

    settings = dict(spec["prehab"])
    keep = settings.pop("keep_ratio", spec.get("keep"))
    # the task the defaults resolve to is part of what is cached (the default changed once)
    named = settings if "task" in settings else settings | {
        "task": prehab_task_name(model, None, settings.get("surrogate"), keep)}
    ident = json.dumps({"settings": named, "keep": keep, "calib": spec.get("calib", sizes["calib_windows"]),
                        "calib_len": sizes["calib_len"]}, sort_keys=True)
    cache = Path(sizes.get("prehab_cache") or "/tmp/prehab_svd_rows") / hashlib.sha256(ident.encode()).hexdigest()[:16]
    if (cache / "model.safetensors").is_file():
        missing, unexpected = model.load_state_dict(load_file(str(cache / "model.safetensors")), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embedding: saved once
            raise SystemExit(f"{cache}: not this model's weights ({unexpected[:3]} {missing[:3]})")
        return json.loads((cache / "report.json").read_text()) | {"cached": str(cache)}
    steps = int(settings.get("steps", 100))
    train = data.causal_lm_batches(tok, data.load_texts("builtin", "train"), num_samples=4 * steps,
                                   seq_len=sizes["calib_len"], batch_size=4, seed=2)
    torch.manual_seed(0)
    rep = prehab(model, calib, train, keep_ratio=keep, **settings)
    first, last = rep.steps[0], rep.steps[-1]
    summary = {"ident": json.loads(ident), "seconds": round(rep.seconds, 1),
               "timings": {k: round(v, 1) for k, v in rep.timings.items()},
               "surrogate": rep.surrogate, "task": rep.task, "lam": rep.lam, "lr": rep.lr, "steps": len(rep.steps),
               "task_loss": [first.task_loss, last.task_loss], "compressed_loss": [first.surrogate, last.surrogate],
               "stable_rank": [rep.mean_stable_rank_before, rep.mean_stable_rank_after], "tracking": rep.tracking}
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # tied tensors (embedding and head) once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.contiguous()
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "report.json").write_text(json.dumps(summary))
    tmp.rename(cache)
    return summary


def dense_at_budget(model, patterns, keep: float):
    """Ranks that keep the layers matching ``patterns`` dense and give every other target the one
    uniform keep ratio that makes the total ``keep`` of all targets' parameters."""
    from prehab_svd.models import match_name, plan_targets, rank_for

    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in plan_targets(model).targets}
    dense = {n for n in shapes if match_name(n, patterns)}
    total = sum(m * k for m, k in shapes.values())
    fixed = sum(shapes[n][0] * shapes[n][1] for n in dense)
    keep_rest = (keep * total - fixed) / (total - fixed)
    if not 0 < keep_rest <= 1:
        raise SystemExit(f"keeping {sorted(dense)[:3]}... dense leaves keep {keep_rest:.3f} for the rest")
    return {n: None if n in dense else rank_for(*shapes[n], keep_rest) for n in shapes}, keep_rest


def run_layer_probe(spec: dict, sizes: dict) -> dict:
    """Which layers lose the most: compress once (``spec``), then put the compressed layers of one
    projection type, or of one block, into the dense model (all else dense) and measure perplexity.
    The factors of svd-llm (and svd, asvd) depend only on the original model's activations, so every
    subset uses the same factors it would get in the full compression."""
    import torch

    import prehab_svd
    from prehab_svd import data, evaluate
    from prehab_svd.demo_causal import heldout_sets
    from prehab_svd.layers import LowRankLinear
    from prehab_svd.pretrained import load_pretrained

    if spec.get("method") not in ("svd", "asvd", "svd-llm"):
        raise SystemExit("the layer probe needs a method whose factors ignore upstream compression")
    torch.manual_seed(0)
    model, tok = load_pretrained("smollm2")
    calib = data.causal_lm_batches(tok, data.load_texts("builtin", "train"), num_samples=sizes["calib_windows"],
                                   seq_len=sizes["calib_len"], batch_size=8, seed=0)
    sets = heldout_sets(tok, sizes["eval_len"], sizes["eval_tokens"])

    def ppl(m):
        return {name: evaluate.perplexity(m, b).ppl for name, b in sets.items()}

    comp = copy.deepcopy(model)
    report = prehab_svd.compress(comp, spec["method"], float(spec["keep"]), calib, **spec.get("options", {}))
    low = {n: m for n, m in comp.named_modules() if isinstance(m, LowRankLinear)}
    out = {"spec": spec, "dense": ppl(model), "all": ppl(comp),
           "errors": {layer.name: layer.rel_error_after for layer in report.layers}, "kinds": {}, "blocks": {}}

    def only(names):
        saved = {}
        for n in names:
            saved[n] = model.get_submodule(n)
            set_submodule(model, n, low[n])
        try:
            return ppl(model)
        finally:
            for n, old in saved.items():
                set_submodule(model, n, old)

    for kind in PROBE_KINDS:
        out["kinds"][kind] = only([n for n in low if n.endswith("." + kind)])
        print(kind, out["kinds"][kind], flush=True)
    blocks = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in low})
    for b in blocks:
        out["blocks"][b] = only([n for n in low if f".layers.{b}." in n])
        print("block", b, out["blocks"][b], flush=True)
    return out


def write_probe(out: Path, probe: dict, env: dict) -> None:
    write_atomic(out / "layers_smollm2.json", json.dumps({"env": env, **probe}, indent=1))
    d = probe["dense"]

    def rel(p):
        return " | ".join(f"{p[k]:.2f} ({100 * (p[k] / d[k] - 1):+.0f} %)" for k in d)

    lines = ["# Which layers of SmolLM2-135M lose the most (svd-llm, keep 0.8)", "",
             f"Command: `{env['command']}`; {env['date']}; torch {env['torch']}, transformers "
             f"{env['transformers']}; {env['machine']}. Same calibration and perplexity windows as "
             "methods_smollm2.md. Each row puts the compressed layers of one projection type (or one block) "
             "into the otherwise dense model; the factors are those of the full compression.", "",
             "| layers compressed | ppl builtin | ppl licenses | mean rel. output error (calibration) |",
             "| --- | --- | --- | --- |",
             f"| none (dense) | {d['builtin']:.2f} | {d['licenses']:.2f} | - |",
             f"| all | {rel(probe['all'])} | - |"]
    errs = probe["errors"]
    for kind, p in probe["kinds"].items():
        e = [v for k, v in errs.items() if k.endswith("." + kind) and v is not None]
        lines.append(f"| {kind} (all blocks) | {rel(p)} | {sum(e) / max(len(e), 1):.3f} |")
    for b, p in probe["blocks"].items():
        e = [v for k, v in errs.items() if f".layers.{b}." in k and v is not None]
        lines.append(f"| block {b} | {rel(p)} | {sum(e) / max(len(e), 1):.3f} |")
    write_atomic(out / "layers_smollm2.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# The suites (in the parent)


def suite_rows(name: str) -> list[dict]:
    rows: list[dict] = []
    if name in ("table", "all"):
        rows.append({"method": "dense"})
        for keep in TABLE_RATIOS:
            for m in TABLE_METHODS:
                base, _, post = m.partition("+")
                spec = {"method": base, "keep": keep}
                if base == "zs-svd":  # the CLI's settings for a causal LM
                    spec["options"] = {"grad_samples": 64, "min_rank_fraction": 0.3}
                if post == "rehab":
                    spec["rehab"] = True
                rows.append(spec)
    if name in ("calibration", "all"):
        for m in ("svd-llm", "aa-svd"):
            for w in CALIB_SWEEP:  # the default size is the table's row
                rows.append({"method": m, "keep": 0.8, **({} if w == DEFAULT_CALIB else {"calib": w})})
    return rows


def _row_order(r: dict) -> tuple:
    """Dense first, then by keep (descending), method in TABLE_METHODS order, plain settings first."""
    s = r["spec"]
    name = s.get("method", "dense") + ("+rehab" if s.get("rehab") else "")
    if "prehab" in s:
        name = "prehab+" + name
    rank = TABLE_METHODS.index(name) if name in TABLE_METHODS else len(TABLE_METHODS)
    label = fmt_row(r).split(" | ")[0]
    return (name != "dense", -s.get("keep", 1.0), rank, "{" in label, label)


def fmt_row(r: dict) -> str:
    s = r["spec"]
    name = ("prehab+" if "prehab" in s else "") + s.get("method", "dense") + ("+rehab" if s.get("rehab") else "")
    extra = {k: v for k, v in s.items() if k not in ("method", "keep", "rehab", "rehab_steps", "rehab_windows",
                                                     "rehab_lr")}
    if extra.get("prehab") == {}:
        del extra["prehab"]  # Prehab with its defaults
    if "keep_rest" in r:
        extra["keep_rest"] = round(r["keep_rest"], 4)
    label = name + (" " + json.dumps(extra, sort_keys=True) if extra else "")
    keep = f"{s['keep']:g}" if "keep" in s else "1"
    kept = f"{r['kept_fraction']:.3f}" if "kept_fraction" in r else "1"
    return (f"| {label} | {keep} | {kept} | {r['ppl_builtin']:.2f} | {r['ppl_licenses']:.2f} | "
            f"{r.get('compress_seconds', 0):.0f} | {r['peak_rss_mib']:,} | {r['generation']!r} |")


def _commands_line(results: dict, env: dict) -> str:
    """Which commands measured the rows (each row records its own), and the environment."""
    counts: dict[str, int] = {}
    for r in results.values():
        cmd = r.get("command", env["command"])
        counts[cmd] = counts.get(cmd, 0) + 1
    runs = "; ".join(f"`{c}` ({n} row{'s' if n > 1 else ''})" for c, n in counts.items())
    return (f"Rows measured by: {runs}; table written by `{env['command']}`, {env['date']}; Python {env['python']}, "
            f"torch {env['torch']}, transformers {env['transformers']}; {env['machine']}.")


def write_table(out: Path, results: dict, env: dict) -> None:
    write_atomic(out / "methods_smollm2.json", json.dumps({"env": env, "rows": list(results.values())},
                                                          indent=1))
    lines = ["# Compression methods on SmolLM2-135M-Instruct (CPU)", "",
             _commands_line(results, env), "",
             f"Calibration: {env['sizes']['calib_windows']} windows x {env['sizes']['calib_len']} tokens of the "
             "built-in corpus (train split) unless a row says `calib` (windows). Perplexity: consecutive "
             f"{env['sizes']['eval_len']}-token windows, {env['sizes']['eval_tokens']:,} tokens of each text: "
             "`builtin` = the corpus's held-out split (same kind of text), `licenses` = license texts "
             "(another kind). Generation: greedy answer to "
             f"{env['prompt']!r} through the chat template. Seconds: the compression alone; memory: peak "
             "RSS of the row's process. Rows whose options set no `shrinkage` and that were measured "
             "before 2026-12-06 used shrinkage 0 (the exact optimum), the default then; the default is "
             "now OAS for svd-llm and aa-svd, still 0 for zs-svd (results/shrinkage_smollm2.md).", "",
             "| method | keep | kept | ppl builtin | ppl licenses | s | peak MiB | generation |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [fmt_row(r) for r in sorted((r for r in results.values() if "ppl_builtin" in r), key=_row_order)]
    failed = [r for r in results.values() if "error" in r]
    if failed:
        lines += ["", "Rows that failed:"] + [f"- `{row_key(r['spec'])}`: {r['error']}" for r in failed]
    write_atomic(out / "methods_smollm2.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--suite", default="table", choices=["table", "calibration", "all", "none"])
    p.add_argument("--extra", action="append", default=[], help="one more row spec (JSON), repeatable")
    p.add_argument("--row", default=None, help="run one row spec (JSON) here and print its result as JSON")
    p.add_argument("--layers", default=None,
                   help="the layer probe of one compression spec (JSON, e.g. svd-llm at 0.8), in this process; "
                        "writes OUT/layers_smollm2.md/.json")
    p.add_argument("--fresh", action="store_true", help="discard the cached rows")
    p.add_argument("--merge", action="append", default=[],
                   help="also take the rows of another methods_smollm2.json measured with the same sizes")
    p.add_argument("--calib-windows", type=int, default=DEFAULT_CALIB)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-len", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--rehab-windows", type=int, default=240, help="rehab: windows of 256 tokens, 4 a step")
    p.add_argument("--rehab-steps", type=int, default=60)
    p.add_argument("--prehab-cache", default="/tmp/prehab_svd_rows",
                   help="rows with \"prehab\": where each Prehab's fine-tuned model is kept for the other methods")
    args = p.parse_args(argv)
    sizes = {"calib_windows": args.calib_windows, "calib_len": args.calib_len, "eval_len": args.eval_len,
             "eval_tokens": args.eval_tokens, "rehab_windows": args.rehab_windows,
             "rehab_steps": args.rehab_steps, "prehab_cache": args.prehab_cache}
    if args.row is not None:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        print("ROW " + json.dumps(run_row(json.loads(args.row), sizes)))
        return 0

    import torch
    import transformers

    from prehab_svd.evaluate import DEFAULT_PROMPT

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "methods_smollm2.json"
    results: dict = {}
    if cache.is_file() and not args.fresh:
        old = json.loads(cache.read_text())
        if _comparable(old.get("env", {}).get("sizes")) == _comparable(sizes):
            results = {row_key(r["spec"]): r for r in old["rows"] if "error" not in r}
    for extra in args.merge:
        other = json.loads(Path(extra).read_text())
        if _comparable(other.get("env", {}).get("sizes")) != _comparable(sizes):
            raise SystemExit(f"{extra} was measured with other sizes: {other.get('env', {}).get('sizes')}")
        for r in other["rows"]:
            if "error" not in r:
                results.setdefault(row_key(r["spec"]), r)
    env = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "machine": machine(),
           "command": " ".join(["python scripts/methods_smollm2.py"] + (sys.argv[1:] if argv is None else argv)),
           "sizes": sizes, "prompt": DEFAULT_PROMPT}
    if args.layers is not None:
        write_probe(out, run_layer_probe(json.loads(args.layers), sizes), env)
        return 0
    specs = ([] if args.suite == "none" else suite_rows(args.suite)) + [json.loads(e) for e in args.extra]
    for spec in specs:
        if spec.get("rehab"):  # the rehab settings are part of the row's identity
            spec.setdefault("rehab_steps", sizes["rehab_steps"])
            spec.setdefault("rehab_windows", sizes["rehab_windows"])
            spec.setdefault("rehab_lr", REHAB_LR)
        key = row_key(spec)
        if key in results:
            continue
        t0 = time.time()
        cmd = [sys.executable, __file__, "--row", key] + [
            f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        if proc.returncode != 0 or not line:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results[key] = {"spec": spec, "error": err}
            print(f"FAILED {key}: {err}", flush=True)
        else:
            results[key] = json.loads(line[-1][4:]) | {"command": env["command"]}
            print(fmt_row(results[key]), f"({time.time() - t0:.0f} s)", flush=True)
        write_table(out, results, env)
    write_table(out, results, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
