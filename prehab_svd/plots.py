"""PNG plots written next to an output: per-layer ranks of a compression, whitened spectra around Prehab.

matplotlib runs with the non-interactive Agg backend; each function writes one PNG to ``path``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_ranks", "plot_spectra"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """savefig to a temporary file next to ``path``, then rename: never a half-written PNG."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=130, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _short(name: str) -> str:
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return (digits[-1] + "." if digits else "") + ".".join(parts[-2:])


def plot_ranks(report, path) -> Path:
    """Bar chart of each layer's rank as a fraction of its break-even rank (dense layers at 1.0,
    hatched), with the rank written on the bar, for a :class:`~prehab_svd.compression.CompressionReport`."""
    from .zs_svd import break_even_rank

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
