"""Issue 15's synthetic cases for the closed forms, printed as a Markdown table (seconds to run).

    python scripts/numerics_cases.py

* dynamic range: x [2048, 256] with channel scales 10^U(-3,3), x' = x + 10 % noise, W [256, 256],
  rank 64: anchored_lowrank's excess objective over a float64 oracle that never forms a Gram (QR of x').
* thin calibration: 128 tokens for d = 256 (correlated, anisotropic), rank 64: whitened_lowrank's
  relative output error on 4,096 held-out tokens of the same distribution, for the default, the
  minimum-norm answer, a jittered peer, and OAS shrinkage.
The regression tests (tests/test_linalg.py) build their problems here and assert the same numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prehab_svd import linalg  # noqa: E402
from prehab_svd.methods import LayerStats  # noqa: E402

f64 = torch.float64


def dynamic_range_problem():
    """(x [2048, 256] with channel scales 10^U(-3,3), x' = x + 10 % noise, W [256, 256], rank 64)."""
    g = torch.Generator().manual_seed(1)
    n, d = 2048, 256
    scales = 10 ** (torch.rand(d, generator=g, dtype=f64) * 6 - 3)
    x = torch.randn(n, d, generator=g, dtype=f64) * scales
    xp = x + 0.1 * torch.randn(n, d, generator=g, dtype=f64) * scales
    W = torch.randn(d, d, generator=g, dtype=f64) / d ** 0.5
    return x, xp, W, 64


def qr_anchored_oracle(W, x, xp, rank):
    """min ‖x Wᵀ − xp W'ᵀ‖ over rank-``rank`` W' straight from the tokens (QR of xp, no Gram)."""
    Q, R = torch.linalg.qr(xp)
    U, S, Vh = torch.linalg.svd(Q.T @ (x @ W.T), full_matrices=False)
    return torch.linalg.solve_triangular(R, (U[:, :rank] * S[:rank]) @ Vh[:rank], upper=True).T


def thin_problem():
    """(x [128, 256] correlated and anisotropic, 4,096 held-out tokens of the same law, W, rank 64)."""
    g = torch.Generator().manual_seed(2)
    T, d, H = 128, 256, 4096
    A = torch.randn(d, d, generator=g, dtype=f64) * torch.arange(1, d + 1, dtype=f64) ** -0.5
    x = torch.randn(T, d, generator=g, dtype=f64) @ A.T
    xh = torch.randn(H, d, generator=g, dtype=f64) @ A.T
    W = torch.randn(d, d, generator=g, dtype=f64) / d ** 0.5
    return x, xh, W, 64


def held_out_error(W, Wq, xh) -> float:
    return float((xh @ (W - Wq).T).norm() / (xh @ W.T).norm())


def dynamic_range(stats_dtype) -> float:
    x, xp, W, r = dynamic_range_problem()
    n = x.shape[0]
    xs, xps = x.to(stats_dtype), xp.to(stats_dtype)
    cross, gram = (xs.T @ xps).to(f64) / n, (xps.T @ xps).to(f64) / n
    Wn = torch.mm(*linalg.anchored_lowrank(W, cross, gram, r))
    Wo = qr_anchored_oracle(W, x, xp, r)

    def err(Wq):
        return (x @ W.T - xp @ Wq.T).square().sum()

    return float((err(Wn) - err(Wo)) / err(Wo))


def thin(stats_dtype, variant: str) -> float:
    x, xh, W, r = thin_problem()
    T, d = x.shape
    xs = x.to(stats_dtype)
    gram = (xs.T @ xs).to(f64) / T
    floor = linalg.rounding_floor(d, stats_dtype, T)
    kw = {}
    if variant == "jitter 1e-6":
        gram = gram + 1e-6 * torch.diag(torch.diagonal(gram))
    elif variant == "oas":
        st = LayerStats(gram, gram, gram, None, T)
        gram = st.shrunk(st.oas_intensity()).gram_x
    elif variant == "zero":
        kw["unvisited"] = "zero"
    F = linalg.whitening_factor(gram, floor=floor)
    return held_out_error(W, torch.mm(*linalg.whitened_lowrank(W, gram, r, factor=F, **kw)), xh)


def main() -> None:
    print("| case | statistics | variant | value |")
    print("| --- | --- | --- | --- |")
    for dt in (f64, torch.float32):
        print(f"| dynamic range: excess over the fp64 oracle | {str(dt)[6:]} | default | {dynamic_range(dt):.2e} |")
    for dt in (f64, torch.float32):
        for v in ("default", "zero", "jitter 1e-6", "oas"):
            print(f"| thin: held-out relative error | {str(dt)[6:]} | {v} | {thin(dt, v):.4f} |")


if __name__ == "__main__":
    main()
