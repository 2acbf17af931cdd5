"""Inference speed of dense and compressed LLaMA-shaped models through ``generate`` of transformers.

One model per keep ratio is built with random weights (1.0: dense), and the targeted layers of the
compressed ones are swapped for :class:`~prehab_svd.layers.LowRankLinear` layers of the ranks
``keep_ratio`` gives (``floor(keep·m·n/(m+n))``). The factors are random: only the shapes matter for
speed, and this skips 224 SVDs at 7B scale. All models stay alive together (7B in bf16: 13.5 GB dense,
11.0 / 8.4 / 5.7 GB at keep 0.8 / 0.6 / 0.4), so the eager measurements run in interleaved rounds
(each round times every model once): on a machine whose speed drifts (a shared CPU), no model is
favoured. Compressed layers run the library's ``ops.lowrank_linear`` (``--backends``: ``auto`` is the
library's choice; ``triton`` / ``cuda`` force one).

Measured (medians over ``--reps`` rounds, after a warm-up call):

* prefill: ``generate`` of one new token after a ``--prefill-len`` prompt, batch 1 (eager):
  prompt tokens / s;
* decode: ``generate`` with ``min_new_tokens = max_new_tokens = N`` (equal lengths, no early stop)
  after a ``--prompt-len`` prompt, at each ``--batches`` size, minus the same call with N = 1 (the
  prefill): batch·(N-1) / (t_N - t_1) generated tokens / s;
* modes: ``eager`` (the default dynamic cache); ``compile`` (a static cache and
  ``torch.compile(mode="reduce-overhead")`` of the decode step through transformers' CompileConfig:
  inductor + CUDA graphs on a GPU); ``cudagraphs`` (static cache, ``torch.compile(backend="cudagraphs")``:
  CUDA graphs without inductor; GPU only). Compiled modes run one model at a time, reuse one static
  cache per run (reset between calls) so graphs are captured once, and report the first call
  (compilation) separately, as ``first_call_s``, and the graphs compiled during the timed calls
  (``recompiles_during_timing``: should be 0).

The speedup of each row is against the dense model's row with the same mode and batch.

Example: ``python -m bench.scale.inference --preset cpu-medium --json out.json``
"""

from __future__ import annotations

from bench.scale import common  # first: sets the environment (offline hub, tokenizers) before they load

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

MODES = ("eager", "compile", "cudagraphs")


def target_shapes(model) -> dict:
    """{name: (in, out, has bias)} of the layers ``compress`` would target."""
    from prehab_svd.models import plan_targets

    out = {}
    for name in plan_targets(model).targets:
        lin = model.get_submodule(name)
        out[name] = (lin.in_features, lin.out_features, lin.bias is not None)
    return out


def set_keep(model, shapes: dict, keep: float, backend: str, device, dtype) -> int:
    """Swap every target layer for a random ``LowRankLinear`` of the rank ``keep`` gives (keep 1.0:
    leave the dense layers); returns the number of parameters of the target layers now."""
    from prehab_svd.layers import LowRankLinear
    from prehab_svd.models import rank_for

    total = 0
    for name, (n_in, n_out, bias) in shapes.items():
        current = model.get_submodule(name)
        r = None if keep >= 1.0 else rank_for(n_out, n_in, keep)
        if r is None:
            if not isinstance(current, nn.Linear):
                raise SystemExit("keep ratios must come in decreasing order, dense (1.0) first")
            total += sum(p.numel() for p in current.parameters())
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, nn.Identity())  # free the old layer before allocating the new one
        del current
        new = LowRankLinear(n_in, n_out, r, bias=bias, device=device, dtype=dtype, backend=backend)
        setattr(parent, child, new)
        total += new.num_params
    common.free_device_memory()
    return total


def _set_backend(model, backend: str) -> None:
    from prehab_svd.layers import LowRankLinear

    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.backend = backend


def _reset_compiled(model) -> None:
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    common.free_device_memory()


def _compile_kwargs(mode: str, model, max_len: int, device) -> dict:
    """generate() kwargs of a compiled mode: a reusable static cache and the compile config."""
    from transformers import CompileConfig, StaticCache

    if mode == "compile":
        cfg = CompileConfig(fullgraph=False, mode="reduce-overhead" if torch.device(device).type == "cuda"
                            else "default")
    else:
        cfg = CompileConfig(fullgraph=False, backend="cudagraphs", mode="default")
    if torch.device(device).type != "cuda":
        cfg._compile_all_devices = True  # transformers compiles only on accelerators unless told
    try:  # transformers 5: a lazily initialized cache, reused (reset) across calls
        cache = StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # another signature: let generate make its own static cache each call
        return {"cache_implementation": "static", "compile_config": cfg}
    return {"past_key_values": cache, "compile_config": cfg}


def _generate(model, ids, new_tokens: int, extra: dict):
    # no_grad, not inference_mode: the static cache's tensors are reset in place between calls, which
    # inference tensors do not allow outside inference mode (and compiled graphs dislike them)
    with torch.no_grad():
        cache = extra.get("past_key_values")
        if cache is not None:
            cache.reset()
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                              **extra)


def _timed_once(fn, device, out: list | None = None) -> float:
    """Seconds of one call of ``fn`` (its result appended to ``out`` when given)."""
    common.sync(device)
    t0 = time.perf_counter()
    result = fn()
    common.sync(device)
    if out is not None:
        out.append(result)
    return time.perf_counter() - t0


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled so far in this process."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))
    except Exception:  # an internal counter: absent in some version
        return 0


def _ids(vocab, batch, length, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


class _Config:
    """One model (keep ratio, backend) and its samples: prefill, and decode per batch size."""

    def __init__(self, keep, backend, model, params):
        self.keep, self.backend, self.model, self.params = keep, backend, model, params
        self.first = {}  # what -> seconds of the first (warm-up) call
        self.samples = {}  # what -> [seconds]
        self.error = None

    def activate(self):
        if self.backend != "dense":
            _set_backend(self.model, self.backend)

    def add(self, what, seconds):
        self.samples.setdefault(what, []).append(seconds)


def _decode_row(cfg_or_base: dict, batch, prompt, new_tokens, first, t_n, t_1, recompiles=0) -> dict:
    dt = statistics.median(t_n) - statistics.median(t_1)
    steps = new_tokens - 1
    return {**cfg_or_base, "kind": "decode", "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
            "first_call_s": first, "generate_s": statistics.median(t_n), "prefill_s": statistics.median(t_1),
            "samples_generate_s": t_n, "samples_prefill_s": t_1, "recompiles_during_timing": recompiles,
            "ms_per_step": 1e3 * dt / steps if dt > 0 else None,
            "tokens_per_s": batch * steps / dt if dt > 0 else None}


def measure_eager(configs, vocab, prefill_len, batches, prompt, new_tokens, device, reps, deadline,
                  prefill=True) -> tuple[list, list]:
    """Eager prefill and decode of every configuration, in interleaved rounds (each round times every
    configuration once), so a machine whose speed drifts (a shared CPU) biases no configuration; the
    medians over the rounds are reported. Rounds stop early when the budget would not hold another."""
    pre_ids = _ids(vocab, 1, prefill_len, device, 1)
    dec_ids = {b: _ids(vocab, b, prompt, device, 2) for b in batches}
    skipped = []

    def one_round(cfg, warm: bool):
        cfg.activate()
        m = cfg.model
        record = (lambda k, t: cfg.first.__setitem__(k, t)) if warm else cfg.add
        if prefill:
            record("prefill", _timed_once(lambda: _generate(m, pre_ids, 1, {}), device))
        for b in batches:
            out = []
            t = _timed_once(lambda: _generate(m, dec_ids[b], new_tokens, {}), device, out)
            if out[0].shape[1] != prompt + new_tokens:
                raise RuntimeError(f"generate returned {out[0].shape[1] - prompt} new tokens, expected "
                                   f"{new_tokens}")
            record(f"gen{b}", t)
            record(f"pre{b}", _timed_once(lambda: _generate(m, dec_ids[b], 1, {}), device))

    for cfg in configs:
        try:
            one_round(cfg, warm=True)
        except Exception as e:  # a failing backend must not lose the other rows
            cfg.error = f"{type(e).__name__}: {str(e)[:500]}"
    live = [c for c in configs if c.error is None]
    round_s = None
    for r in range(reps):
        if r and round_s is not None and not deadline.allows(round_s):
            skipped.append(f"eager rounds {r + 1}-{reps}: not run, {deadline.left():.0f} s of the budget left")
            break
        t0 = time.perf_counter()
        for cfg in live:
            one_round(cfg, warm=False)
        round_s = time.perf_counter() - t0
    rows = []
    for cfg in configs:
        base = {"keep_ratio": cfg.keep, "backend": cfg.backend, "target_params": cfg.params, "mode": "eager"}
        if cfg.error:
            rows.append({**base, "kind": "error", "error": cfg.error})
            continue
        if prefill:
            t = cfg.samples["prefill"]
            rows.append({**base, "kind": "prefill", "tokens": prefill_len, "seconds": statistics.median(t),
                         "samples_s": t, "first_call_s": cfg.first["prefill"],
                         "tokens_per_s": prefill_len / statistics.median(t)})
        for b in batches:
            rows.append(_decode_row(base, b, prompt, new_tokens, cfg.first[f"gen{b}"], cfg.samples[f"gen{b}"],
                                    cfg.samples[f"pre{b}"]))
    return rows, skipped


def measure_compiled(model, vocab, batch, prompt, new_tokens, mode, device, reps) -> dict:
    """Decode through generate with a static cache and a compiled decode step (see the module doc)."""
    ids = _ids(vocab, batch, prompt, device, 2)
    extra = _compile_kwargs(mode, model, prompt + new_tokens, device)
    first = _timed_once(lambda: _generate(model, ids, new_tokens, extra), device)
    graphs = _graphs_compiled()
    t_n, t_1 = [], []
    for _ in range(reps):  # interleaved, like the eager rounds
        t_n.append(_timed_once(lambda: _generate(model, ids, new_tokens, extra), device))
        t_1.append(_timed_once(lambda: _generate(model, ids, 1, extra), device))
    # > 0: the timed calls paid for (re)compilation, and the numbers are not the steady state
    recompiles = _graphs_compiled() - graphs
    return _decode_row({}, batch, prompt, new_tokens, first, t_n, t_1, recompiles)


def run(args) -> dict:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    p = common.preset(args.preset)
    device = args.device or common.default_device()
    on_cuda = torch.device(device).type == "cuda"
    dtype = common.parse_dtype(args.dtype, device)
    deadline = common.Deadline(args.budget_s)
    keeps = sorted(set(args.keep_ratios), reverse=True)
    modes = [m for m in args.modes if on_cuda or m != "cudagraphs"]
    compiled_modes = [m for m in modes if m != "eager"]
    compile_keeps = set(args.compile_keeps) if args.compile_keeps is not None else set(keeps)
    batches = args.batches
    prefill_len = args.prefill_len or p.prefill_len
    prompt = args.prompt_len or p.prompt_len
    new_tokens = args.new_tokens or p.new_tokens
    reps = args.reps or (3 if on_cuda else 5)
    env = common.environment(device)
    # every model alive at once (7B in bf16: 13.5 GB dense + 11.0 + 8.4 + 5.7 GB compressed), so the
    # eager measurements can be interleaved
    configs, build_s = [], 0.0
    for keep in keeps:
        t0 = time.perf_counter()
        if args.model:  # the real weights (dense rows); compressed rows get random factors of their ranks
            from prehab_svd.pretrained import load_pretrained

            model = load_pretrained(args.model)[0].to(device=device, dtype=dtype)
        else:
            model = common.build_llama(p, device, dtype, layers=args.layers, seed=len(configs))
        params = set_keep(model, target_shapes(model), keep, "auto", device, dtype)
        build_s += time.perf_counter() - t0
        for backend in (["dense"] if keep >= 1.0 else args.backends):
            configs.append(_Config(keep, backend, model, params))
    rows, skipped = [], []
    if "eager" in modes:
        r, s = measure_eager(configs, p.vocab, prefill_len, batches, prompt, new_tokens, device, reps, deadline,
                             prefill=args.prefill)
        rows += r
        skipped += s
    # compiled modes, one configuration at a time (compilation is per model); each keep ratio in
    # compile_keeps gets an equal share of what is left, so the last ones are measured too
    costs = {m: [] for m in MODES}  # seconds each compiled run took (compile + timed calls), by mode

    def estimate(mode: str) -> float:
        return 1.3 * max(costs[mode]) if costs[mode] else args.compile_estimate_s

    todo = [c for c in configs if c.keep in compile_keeps and c.backend in ("dense", args.backends[0])]
    for i, cfg in enumerate(todo if compiled_modes else []):
        share = common.Deadline(deadline.left() / (len(todo) - i))
        cfg.activate()
        for mode in compiled_modes:
            for b in batches:
                tag = f"keep {cfg.keep} {cfg.backend} decode b{b} {mode}"
                if not share.allows(estimate(mode)):
                    skipped.append(f"{tag}: not run, {max(share.left(), 0):.0f} s of this model's share of the "
                                   f"budget left, a compiled run was estimated at {estimate(mode):.0f} s")
                    continue
                _reset_compiled(cfg.model)
                base = {"keep_ratio": cfg.keep, "backend": cfg.backend, "target_params": cfg.params,
                        "mode": mode}
                t0 = time.perf_counter()
                try:
                    rows.append({**base, **measure_compiled(cfg.model, p.vocab, b, prompt, new_tokens, mode,
                                                            device, reps)})
                except Exception as e:
                    rows.append({**base, "kind": "error", "batch": b,
                                 "error": f"{type(e).__name__}: {str(e)[:500]}"})
                costs[mode].append(time.perf_counter() - t0)
                _reset_compiled(cfg.model)
    _add_speedups(rows)
    peak = torch.cuda.max_memory_allocated() / 1e9 if on_cuda else None
    return {"kind": "inference", "schema": common.SCHEMA, "env": env, "preset": p.name, "model": args.model,
            "device": device,
            "dtype": common.dtype_name(dtype), "layers": args.layers or p.layers, "build_s": build_s,
            "prefill_len": prefill_len, "prompt_len": prompt, "new_tokens": new_tokens, "reps": reps,
            "rows": rows, "skipped": skipped, "peak_gpu_alloc_gb": peak, "peak_rss_gb": common.peak_rss_gb()}


def _add_speedups(rows) -> None:
    dense = {(r["kind"], r["mode"], r.get("batch")): r["tokens_per_s"] for r in rows
             if r["backend"] == "dense" and r.get("tokens_per_s")}
    for r in rows:
        d = dense.get((r["kind"], r["mode"], r.get("batch")))
        r["speedup_vs_dense"] = r["tokens_per_s"] / d if d and r.get("tokens_per_s") else None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.scale.inference", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-medium", choices=sorted(common.PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the preset's full model)")
    ap.add_argument("--model", default=None,
                    help="a real model (e.g. smollm2, with --preset smollm2 for its sizes) instead of random "
                         "weights; the compressed rows still get random factors (speed depends on shapes only)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=sorted(common.DTYPES))
    ap.add_argument("--keep-ratios", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4],
                    help="1.0 is the dense model")
    ap.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "torch", "triton", "cuda"],
                    help="lowrank_linear backends of the compressed models")
    ap.add_argument("--modes", nargs="+", default=["eager"], choices=MODES)
    ap.add_argument("--compile-keeps", type=float, nargs="*", default=None,
                    help="keep ratios that get the compiled modes (default: all)")
    ap.add_argument("--compile-estimate-s", type=float, default=90.0,
                    help="budget reserved for a compiled run until one has been measured")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--prefill-len", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="default 3 (median)")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--json", default=None)
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    result = run(args)
    if args.json:
        common.write_json(args.json, result)
    for r in result["rows"]:
        if r["kind"] == "error":
            print(f"keep {r['keep_ratio']} {r['backend']} {r['mode']}: ERROR {r['error']}")
            continue
        what = "prefill" if r["kind"] == "prefill" else f"decode b{r['batch']}"
        sp = f" ({r['speedup_vs_dense']:.2f}x dense)" if r.get("speedup_vs_dense") else ""
        tps = r["tokens_per_s"]
        print(f"keep {r['keep_ratio']} {r['backend']:>6} {r['mode']:>10} {what:>12}: "
              f"{tps:,.1f} tok/s{sp}" if tps else f"keep {r['keep_ratio']} {what}: no time difference")
    for s in result["skipped"]:
        print("skipped:", s)
    return result


if __name__ == "__main__":
    main()
