"""Render scale-benchmark results (the JSON that :mod:`bench.scale.run` writes) as Markdown, and merge
the JSON files of several runs (e.g. the three GPU commands) into one.

    python -m bench.scale.report render results/scale_cpu.json            # prints Markdown
    python -m bench.scale.report merge A.json B.json C.json --out results/scale_gpu
        # writes results/scale_gpu.json, .md and, when a layer sweep is in, _layers.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GPU_COMMANDS = [
    "bash bench/scale/run_gpu.sh compress   # ~8 min: 1-2 of the 32 blocks (aa-svd, svd-llm, GQA), extrapolated",
    "bash bench/scale/run_gpu.sh kernels    # ~6 min: layer sweep + plot, 3 profiles, factorizations",
    "bash bench/scale/run_gpu.sh infer      # ~8 min: prefill / decode, eager, CUDA graphs, compile",
]
MERGE_COMMAND = ("python -m bench.scale.report merge scale_gpu_compress.json scale_gpu_kernels.json "
                 "scale_gpu_infer.json --out results/scale_gpu")


def _f(x, spec=".2f", none="-"):
    if x is None:
        return none
    if isinstance(x, float) and x != x:
        return none
    return format(x, spec)


def _s(x):
    """Seconds: two decimals below 10 s, one above."""
    return _f(x, ".2f" if x is not None and abs(x) < 10 else ".1f")


def _table(head, rows) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


# --------------------------------------------------------------------------------------------------
# sections

COMPRESS_HEAD = ["preset", "method", "blocks", "calib. tokens", "compress s", "floor s", "ratio", "capture",
                 "check", "forward", "covariance", "factorize", "load", "write", "save s", "peak GPU GB",
                 "peak RSS GB", "rel. err (mean)", "runs"]
EXTRA_HEAD = ["preset", "method", "measured blocks", "full-model total s", "forward", "covariance",
              "factorize", "other", "save s", "peak GPU GB (upper)", "peak RSS GB (upper)", "basis"]


def compress_section(entries, empty: bool = False) -> list[str]:
    out = ["### Compression time (keep_ratio 0.6)", ""]
    rows, extra = [], []
    for e in entries:
        t = e["timings"]
        rows.append([
            e["preset"], e["method"], f"{e['model']['blocks_built']}/{e['model']['layers_full']}",
            f"{e['calibration']['tokens']:,}", _s(e["compress_s"]), _s(e.get("floor_s")),
            _f(e.get("ratio"), ".1f"),
            *(_s(t.get(k)) for k in ("capture", "check", "forward", "covariance", "factorize", "load",
                                     "write")),
            _s(e["write_s"]), _f(e["peak_gpu_alloc_gb"]), _f(e["peak_rss_gb"]),
            _f(e["rel_error_after_mean"], ".3f"), e.get("runs", 1)])
        x = e["extrapolated"]
        b = x.get("breakdown", {})
        extra.append([
            e["preset"], e["method"], f"{x['measured_blocks']}/{x['full_blocks']}"
            + ("" if x["exact"] else " (extrapolated)"),
            _s(x["total_s"]), *(_s(b.get(k)) for k in ("forward", "covariance", "factorize", "other")),
            _s(x["write_s"]), _f(x["peak_gpu_gb_upper"]), _f(x["peak_rss_gb_upper"]), x["basis"]])
    if empty:
        planned = (("7b", "aa-svd", "1"), ("7b", "svd-llm", "2 or 1"), ("7b-gqa", "aa-svd", "1"),
                   ("7b", "aa-svd", "2"))
        rows = [[p, m, f"{b}/32"] + ["" for _ in COMPRESS_HEAD[3:]] for p, m, b in planned]
        extra = [[p, m, f"{b}/32"] + ["" for _ in EXTRA_HEAD[3:]] for p, m, b in planned]
    out += _table(COMPRESS_HEAD, rows)
    out += ["", "Seconds; the breakdown is `CompressionReport.timings` (forward excludes covariance and "
            "factorize; `check` is the one forward that verifies the block chain); `floor s` is the "
            "forward floor (`prehab_svd.profiling.forward_floor`: the same forwards alone, for the method's "
            "streams, timed in the same run) and `ratio` the library's own compression time over it; "
            "`save s` is `save_compressed`. Peak GPU memory is `torch.cuda.max_memory_allocated`, peak RSS is "
            "`ru_maxrss` of the process (model build included). With several runs, each number is the "
            "median (peaks: the maximum).", "", "Full model:", ""]
    out += _table(EXTRA_HEAD, extra)
    checks = []
    for e in entries:  # an extrapolated run beside a measured one of the same model and method
        x = e["extrapolated"]
        if x["exact"]:
            continue
        for f in entries:
            if f is not e and f["extrapolated"]["exact"] and (f["preset"], f["method"]) == (e["preset"], e["method"]):
                checks.append(f"- extrapolation check, {e['preset']} {e['method']}: {_s(x['total_s'])} s from "
                              f"{x['measured_blocks']} of {x['full_blocks']} blocks against {_s(f['total_s'])} s "
                              f"measured on all of them (ratio {x['total_s'] / f['total_s']:.2f}).")
    for i, e in enumerate(entries):  # two block counts: the marginal cost of a block, without fixed costs
        for f in entries[i + 1:]:
            b1, b2 = e["model"]["blocks_built"], f["model"]["blocks_built"]
            if (f["preset"], f["method"]) != (e["preset"], e["method"]) or b1 == b2:
                continue
            lo, hi = (e, f) if b1 < b2 else (f, e)
            if hi["extrapolated"]["exact"]:
                continue  # the full model was measured: the check above compares with it
            bl, bh, full = lo["model"]["blocks_built"], hi["model"]["blocks_built"], lo["model"]["layers_full"]
            marginal = (hi["compress_s"] - lo["compress_s"]) / (bh - bl)
            est = lo["compress_s"] + (full - bl) * marginal + (hi["extrapolated"].get("write_s") or 0.0)
            checks.append(f"- marginal cost of a block, {e['preset']} {e['method']} ({bl} and {bh} blocks): "
                          f"{_s(marginal)} s; the full model from it: {_s(est)} s (compress + save).")
    if checks:
        out += [""] + checks
    return out


FACT_HEAD = ["W (m x n)", "rank", "variant", "seconds", "cholesky", "svd", "refine", "other",
             "rel. objective vs fp64", "rel. factor vs fp64", "whitening / note"]


def factorize_section(entries, empty: bool = False) -> list[str]:
    out = ["### Factorizations: Cholesky + SVD (keep_ratio 0.6)", ""]
    for e in entries:
        cond = [c.get("cond_lower_bound") for c in e["cases"]]
        out.append(f"Sizes `{e['sizes']}`, {e['reps']} run(s) each (median); gram channel scales over "
                   f"10^{e['decades']:g} with outliers x{e['outlier']:g}; condition numbers >= "
                   + ", ".join(_f(c, ".1e") for c in cond) + ".")
        out.append("")
        rows, brows = [], []
        for c in e["cases"]:
            for name, v in c["variants"].items():
                b = v.get("breakdown", {})
                rows.append([f"{c['m']}x{c['n']}", c["rank"], name, _f(v["seconds"], ".3f"),
                             *(_f(b.get(k), ".3f") for k in ("cholesky", "svd", "refine", "other")),
                             _f(v.get("rel_objective"), ".1e"), _f(v.get("rel_factor"), ".1e"),
                             v.get("note") or ""])
            if c.get("batched"):
                bt = c["batched"]
                brows.append([f"{c['m']}x{c['n']}", bt["batch"], _f(bt["loop_s"], ".3f"), _f(bt["batched_s"], ".3f"),
                              _f(bt["speedup"], ".2f"), _f(bt["rel_factor"], ".1e")])
            for s in c.get("skipped", []):
                rows.append([f"{c['m']}x{c['n']}", c["rank"], "", "", "", "", "", "", "", "", f"skipped: {s}"])
        out += _table(FACT_HEAD, rows)
        if brows:
            out += ["", "Same-shape fp64 SVDs in one batched call against one call each:", ""]
            out += _table(["W (m x n)", "batch", "loop s", "batched s", "speedup", "rel. factor"], brows)
        if e.get("per_block"):
            out += ["", "Factorizations of one 7B block (4 square, 2 tall, 1 wide; Choleskys shared in a "
                    "group) and of the 32-block model:", ""]
            out += _table(["variant", "per block s", "model s"],
                          [[k, _f(v["block_s"], ".1f"), _f(v["model_s"], ".0f")] for k, v in e["per_block"].items()])
        out.append("")
    if empty:
        out += _table(FACT_HEAD, [[s, "", v] + [""] * 8 for s in ("4096x4096", "11008x4096", "4096x11008")
                                  for v in ("fp64", "fp64-gesvdj", "fp64-eigh", "fp32", "fp32-svd+rr64")])
    return out


def layers_section(e, png: str | None, empty: bool = False) -> list[str]:
    out = ["### Layer throughput against tokens", ""]
    if empty:
        out += _table(["W (m x n)", "keep", "tokens", "dense tok/s", "two-matmul tok/s", "fused tok/s",
                       "fused / dense"], [[s, "0.6", t, "", "", "", ""] for s in ("4096x4096", "11008x4096",
                                                                                  "4096x11008")
                                          for t in (1, 16, 128, 2048, 8192)])
        return out
    pk = e["peaks"]
    out.append(f"{e['device']}, {e['dtype']}; measured peaks {pk['matmul_tflops']:.3g} TFLOP/s "
               f"({pk['matmul_dtype']} matmul) and {pk['copy_gbps']:.3g} GB/s (copy); median of {e['reps']}. "
               f"Backends of the fused op that can run here: {', '.join(e['backends'])}.")
    if e.get("device") == "cpu":
        out.append("On the CPU the weights of these layers (1-11 MB) stay in the caches between calls, so "
                   "the achieved bandwidth can exceed the copy peak (measured on 64 MiB arrays, from DRAM).")
    out.append("")
    variants = []
    for r in e["rows"]:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    head = ["W (m x n)", "keep", "rank", "tokens"] + [f"{v} tok/s" for v in variants] + \
        [f"{v} / dense" for v in variants if v != "dense"] + ["best low-rank %peak BW"]
    rows = []
    dense = {(r["m"], r["n"], r["tokens"]): r for r in e["rows"] if r["variant"] == "dense" and "error" not in r}
    keys = sorted({(r["m"], r["n"], r["keep_ratio"], r["tokens"]) for r in e["rows"] if r["keep_ratio"]},
                  key=lambda k: (k[0] * k[1], k[0], k[2], k[3]))
    for m, n, keep, T in keys:
        got = {r["variant"]: r for r in e["rows"] if (r["m"], r["n"], r["tokens"]) == (m, n, T)
               and (r["keep_ratio"] == keep or r["variant"] == "dense")}
        d = dense.get((m, n, T))
        rank = next((r["rank"] for r in got.values() if r.get("rank")), "")
        cells = [f"{m}x{n}", keep, rank, T]
        cells += [_f(got[v].get("tokens_per_s"), ",.0f") if v in got else "" for v in variants]
        for v in variants:
            if v == "dense":
                continue
            r = got.get(v)
            cells.append(_f(r["tokens_per_s"] / d["tokens_per_s"], ".2f") if r and d and r.get("tokens_per_s")
                         else "")
        lows = [r for v, r in got.items() if v != "dense" and r.get("pct_peak_bw")]
        cells.append(_f(max(r["pct_peak_bw"] for r in lows), ".0f") if lows else "")
        rows.append(cells)
    out += _table(head, rows)
    if e.get("overhead"):
        cells = ", ".join(f"{o['variant']} {o['us_per_call']:.1f} µs" for o in e["overhead"])
        out += ["", f"Per-call cost at a tiny shape (64x64, rank 16, 1 token; the arithmetic is negligible, "
                f"so this is the host's cost of one layer call): {cells}. An eager decode step of a 7B model "
                "makes 224 such calls."]
    errors = [r for r in e["rows"] if "error" in r]
    for r in errors:
        out.append(f"- {r['m']}x{r['n']} T={r['tokens']} {r['variant']}: {r['error']}")
    if png:
        out += ["", f"![throughput against tokens]({png})"]
    return out


def inference_section(e, empty: bool = False) -> list[str]:
    out = ["### Inference through `generate` (prefill and decode)", ""]
    if empty:
        out += _table(["keep", "backend", "kind", "mode", "batch", "tokens/s", "ms/step", "x dense"],
                      [[k, "", kind, mode, b, "", "", ""] for k in ("1.0 (dense)", "0.8", "0.6", "0.4")
                       for kind, mode, b in (("prefill 2048", "eager", 1), ("decode", "eager", 1),
                                             ("decode", "eager", 16), ("decode", "cudagraphs", 1),
                                             ("decode", "cudagraphs", 16), ("decode", "compile", 1),
                                             ("decode", "compile", 16))])
        return out
    out.append(f"{e['env']['device']}, {e['dtype']}, preset `{e['preset']}` ({e['layers']} blocks); prefill "
               f"{e['prefill_len']} tokens (batch 1); decode {e['new_tokens']} new tokens after a "
               f"{e['prompt_len']}-token prompt; median of {e['reps']}.")
    out.append("")
    rows = []
    for r in e["rows"]:
        if r["kind"] == "error":
            rows.append([r["keep_ratio"], r["backend"], "error", r["mode"], r.get("batch", ""), "", "", "",
                         "", r["error"][:120]])
            continue
        b = 1 if r["kind"] == "prefill" else r["batch"]
        note = ""
        if r.get("recompiles_during_timing"):
            note = f"{r['recompiles_during_timing']} recompiles during timing"
        rows.append([r["keep_ratio"], r["backend"], r["kind"], r["mode"], b, _f(r["tokens_per_s"], ",.1f"),
                     _f(r.get("ms_per_step"), ".2f"), _f(r.get("speedup_vs_dense"), ".2f"),
                     _f(r.get("first_call_s"), ".1f"), note])
    out += _table(["keep", "backend", "kind", "mode", "batch", "tokens/s", "ms/step", "x dense",
                   "first call s", "note"], rows)
    for s in e.get("skipped", []):
        out.append(f"- skipped: {s}")
    return out


def profile_section(entries) -> list[str]:
    out = ["### Profiles (`prehab-svd profile`)", "",
           "The Chrome traces went to the folder given to `bench.scale.run --traces` (without it, a temporary "
           "folder that is deleted at the end: rerun a command below to get one).", ""]
    for p in entries:
        out += [f"`{p['command']}`", "", "```", p["table"], "```", ""]
    return out


# --------------------------------------------------------------------------------------------------


def render(res: dict, *, title: str | None = None, gpu_placeholder: bool | None = None, png: str | None = None,
           notes: list | None = None) -> str:
    """Markdown of a result; title, placeholder and plot default to what :func:`write_outputs` stored."""
    meta = res.get("meta", {})
    title = title or meta.get("title")
    gpu_placeholder = meta.get("gpu_placeholder", False) if gpu_placeholder is None else gpu_placeholder
    png = png or meta.get("png")
    env = meta.get("env", {})
    lines = [f"# {title or 'Scale benchmarks'}", ""]
    lines += [f"- date: {env.get('date', '-')}", f"- device: {env.get('device', '-')} "
              f"({env.get('cpu_cores', '-')} cores visible, {env.get('torch_threads', '-')} torch threads)"
              if env.get("device_type") == "cpu" else f"- device: {env.get('device', '-')}",
              f"- versions: python {env.get('python')}, torch {env.get('torch')}"
              + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
              + f", transformers {env.get('transformers')}, triton {env.get('triton')}",
              f"- OMP_WAIT_POLICY={env.get('omp_wait_policy') or '(unset: the OpenMP default)'}, PREHAB_SVD_BACKEND="
              f"{env.get('prehab_svd_backend') or '(unset: the library chooses)'}"]
    start, end = env.get("load_average"), meta.get("load_average_end")
    if start and end:
        lines.append(f"- load average (1 / 5 / 15 min) at the start: {' / '.join(f'{v:.1f}' for v in start)}, "
                     f"at the end: {' / '.join(f'{v:.1f}' for v in end)} ({env.get('cpu_cores', '?')} cores)")
    for cmd in meta.get("commands", []):
        lines.append(f"- command: `{cmd}`")
    for n in (notes or []) + meta.get("notes", []):
        lines.append(f"- {n}")
    lines.append("")
    if res.get("compress"):
        lines += compress_section(res["compress"]) + [""]
    if res.get("factorize"):
        lines += factorize_section(res["factorize"]) + [""]
    if res.get("layers"):
        lines += layers_section(res["layers"], png) + [""]
    if res.get("inference"):
        lines += inference_section(res["inference"]) + [""]
    if res.get("profile"):
        lines += profile_section(res["profile"])
    fails = res.get("failures", []) + [f"skipped: {s}" for s in res.get("skipped", [])]
    if fails:
        lines += ["### Failures and skipped runs", ""] + [f"- {f}" for f in fails] + [""]
    if gpu_placeholder:
        lines += ["## GPU (one H100): not measured yet", "",
                  "No GPU was lent to the session that wrote this file: the tables below are empty on "
                  "purpose, not guessed. On the lent H100 (torch 2.11, Triton 3.6, no network), run the "
                  "three commands (each under 10 minutes, ~22 minutes of device time together; each "
                  "writes `scale_gpu_<part>.{json,md,log}` and its plot or traces under `$OUT`):", "", "```"]
        lines += GPU_COMMANDS + ["```", "", f"then, here: `{MERGE_COMMAND}` (writes results/scale_gpu.json, "
                                 ".md and _layers.png). With one call only, `bash bench/scale/run_gpu.sh one` "
                                 "runs every part in under 10 minutes with a share of the budget each (fewer "
                                 "blocks, variants and compiled modes), writing `scale_gpu.{json,md,log}`.", ""]
        lines += compress_section([], empty=True) + [""]
        lines += factorize_section([], empty=True) + [""]
        lines += layers_section({}, None, empty=True) + [""]
        lines += inference_section({}, empty=True) + [""]
    return "\n".join(lines).rstrip() + "\n"


def merge(results: list) -> dict:
    """One result from several (sections concatenated; the first one's metadata, all commands)."""
    out = {"schema": 1, "meta": {"env": {}, "commands": [], "notes": []}, "compress": [], "factorize": [],
           "layers": None, "inference": None, "profile": [], "failures": [], "skipped": []}
    for r in results:
        meta = r.get("meta", {})
        if not out["meta"]["env"]:
            out["meta"]["env"] = meta.get("env", {})
            out["meta"].update({k: v for k, v in meta.items() if k not in ("env", "commands", "notes")})
        out["meta"]["commands"] += meta.get("commands", [])
        out["meta"]["notes"] += [n for n in meta.get("notes", []) if n not in out["meta"]["notes"]]
        for k in ("compress", "factorize", "profile", "failures", "skipped"):
            out[k] += r.get(k) or []
        for k in ("layers", "inference"):
            if r.get(k):
                out[k] = r[k]
    return out


def write_outputs(res: dict, prefix, *, title: str, gpu_placeholder: bool = False, notes=None) -> dict:
    """``<prefix>.json``, ``<prefix>.md`` and (with a layer sweep) ``<prefix>_layers.png``."""
    from bench.scale import common

    prefix = Path(prefix)
    paths = {}
    png = None
    if res.get("layers") and any(r.get("tokens_per_s") for r in res["layers"]["rows"]):
        from bench.scale.layers import plot

        png_path = prefix.with_name(prefix.name + "_layers.png")
        plot(res["layers"], png_path, 0.6 if 0.6 in res["layers"]["keeps"] else res["layers"]["keeps"][0])
        paths["png"] = png_path
        png = png_path.name
    res.setdefault("meta", {}).update(title=title, gpu_placeholder=gpu_placeholder, png=png)
    paths["json"] = common.write_json(prefix.with_name(prefix.name + ".json"), res)
    paths["md"] = common.write_text(prefix.with_name(prefix.name + ".md"),
                                    render(res, title=title, gpu_placeholder=gpu_placeholder, png=png,
                                           notes=notes))
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.scale.report", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="print the Markdown of a result JSON")
    r.add_argument("json")
    m = sub.add_parser("merge", help="merge result JSONs; write <out>.json, .md, _layers.png")
    m.add_argument("jsons", nargs="+")
    m.add_argument("--out", required=True, help="path prefix, e.g. results/scale_gpu")
    m.add_argument("--title", default="Scale benchmarks on the GPU (LLaMA-7B shapes)")
    args = ap.parse_args(argv)
    if args.cmd == "render":
        print(render(json.loads(Path(args.json).read_text())), end="")
        return
    res = merge([json.loads(Path(p).read_text()) for p in args.jsons])
    for k, v in write_outputs(res, args.out, title=args.title).items():
        print(f"wrote {v}")


if __name__ == "__main__":
    main()
