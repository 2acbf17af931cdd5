"""PNG plots written next to an output: per-layer ranks of a compression, whitened spectra around Prehab.

matplotlib runs with the non-interactive Agg backend; each function writes one PNG to ``path``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_ranks", "plot_spectra", "plot_throughput"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """savefig to a temporary file next to ``path``, then rename: never a half-written PNG."""
    from .utils import write_atomic

    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))


def _short(name: str) -> str:
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return (digits[-1] + "." if digits else "") + ".".join(parts[-2:])


def plot_ranks(report, path) -> Path:
    """Bar chart of each layer's rank as a fraction of its break-even rank (dense layers at 1.0,
    hatched), with the rank written on the bar, for a :class:`~prehab_svd.compression.CompressionReport`."""
    from .methods.zs_svd import break_even_rank

    plt = _pyplot()
    layers = report.layers
    names = [_short(layer.name) for layer in layers]
    frac, labels, dense = [], [], []
    for layer in layers:
        be = max(break_even_rank(layer.out_features, layer.in_features), 1)
        frac.append(1.0 if layer.rank is None else layer.rank / be)
        labels.append("dense" if layer.rank is None else str(layer.rank))
        dense.append(layer.rank is None)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) + 2), 4.2))
    bars = ax.bar(range(len(layers)), frac, color=["#bbbbbb" if d else "#3b75af" for d in dense])
    for bar, d in zip(bars, dense):
        if d:
            bar.set_hatch("//")
    for i, (f, lab) in enumerate(zip(frac, labels)):
        ax.text(i, f + 0.01, lab, ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(layers)), names, rotation=90, fontsize=6)
    ax.set_ylabel("rank / break-even rank")
    ax.set_ylim(0, 1.25)
    ax.set_title(f"{report.method}: ranks per layer (keep_ratio {report.keep_ratio}, "
                 f"kept {report.kept_fraction:.3f} of the targeted parameters)", fontsize=9)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_spectra(names, before, after, path, *, max_layers: int = 12) -> Path:
    """Normalized whitened singular values σᵢ/σ₁ of W·L per layer, before (dashed) and after (solid)
    Prehab, on a log scale; ``before``/``after``: lists of 1-D tensors or lists, in ``names`` order.
    At most ``max_layers`` layers, evenly spread, are drawn."""
    plt = _pyplot()
    idx = list(range(len(names)))
    if len(idx) > max_layers:
        step = len(idx) / max_layers
        idx = sorted({int(i * step) for i in range(max_layers)})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    cmap = plt.get_cmap("tab20")
    for c, i in enumerate(idx):
        for spec, style in ((before[i], "--"), (after[i], "-")):
            s = [float(v) for v in spec]
            if not s or s[0] <= 0:
                continue
            ax.plot(range(1, len(s) + 1), [v / s[0] for v in s], style, color=cmap(c % 20), lw=1,
                    label=_short(names[i]) if style == "-" else None)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("σᵢ / σ₁ of W·L (whitened)")
    ax.set_title("whitened spectra before (dashed) and after (solid) Prehab", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_throughput(rows, path, *, title: str = "") -> Path:
    """Throughput (tokens/s) against tokens per call, log-log, one panel per layer shape, one line per
    variant (e.g. dense ``nn.Linear``, two-matmul low-rank, the fused ``LowRankLinear`` path).

    ``rows``: dicts with ``m``, ``n`` (the layer's out, in), ``tokens``, ``variant``, ``tokens_per_s``
    and optionally ``rank``; rows without a throughput are skipped."""
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    rows = [r for r in rows if r.get("tokens_per_s")]
    shapes = sorted({(r["m"], r["n"]) for r in rows}, key=lambda s: (s[0] * s[1], s))
    if not shapes:
        from .errors import PrehabError

        raise PrehabError("no rows with a throughput (tokens_per_s) to plot; run the layer sweep first")
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 4.0), squeeze=False)
    styles = {"dense": ("k", "-", "s"), "two-matmul": ("#d62728", "--", "o")}
    cmap = plt.get_cmap("tab10")
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v not in styles, v))
    for ax, (m, n) in zip(axes[0], shapes):
        ranks = sorted({r.get("rank") for r in rows if (r["m"], r["n"]) == (m, n) and r.get("rank")})
        for i, v in enumerate(variants):
            pts = sorted((r["tokens"], r["tokens_per_s"]) for r in rows if (r["m"], r["n"]) == (m, n)
                         and r["variant"] == v)
            if not pts:
                continue
            color, ls, marker = styles.get(v, (cmap(2 + i % 8), "-", "^"))
            ax.plot([t for t, _ in pts], [y for _, y in pts], ls, color=color, marker=marker, ms=4, lw=1.3,
                    label=v)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["tokens"] for r in rows if (r["m"], r["n"]) == (m, n)})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("tokens per call")
        ax.set_title(f"W {m}x{n}" + (f", rank {ranks[0]}" if len(ranks) == 1 else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("tokens / s")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
