"""methods.relative_errors: the (before, after) pair of the error report from fewer products, equal to
two calls of relative_error."""

import pytest
import torch

from prehab_svd.calibration import LayerStats
from prehab_svd.linalg import anchored_lowrank, whitened_lowrank
from prehab_svd.methods import relative_error, relative_errors

f64 = torch.float64


def make_stats(T, d, gen, *, streams):
    """Float64 statistics of T tokens of width d (channels of spread scales); two streams: x' = x
    plus a perturbation."""
    dtype = f64
    X = torch.randn(T, d, generator=gen, dtype=dtype) * torch.exp(torch.randn(d, generator=gen, dtype=dtype))
    G = X.T @ X / T
    if streams == 1:
        return LayerStats(gram_x=G, cross=G, gram_xp=G, abs_mean=None, tokens=T)
    Xp = X + 0.3 * torch.randn(T, d, generator=gen, dtype=dtype) @ torch.randn(d, d, generator=gen, dtype=dtype) / d
    return LayerStats(gram_x=G, cross=X.T @ Xp / T, gram_xp=Xp.T @ Xp / T, abs_mean=None, tokens=T)


def reference(W, U, V, stats):
    before = relative_error(W, W, stats)
    if U is None:
        return before, before
    return before, relative_error(W, U.to(f64) @ V.to(f64), stats)


def check(W, U, V, stats):
    want = reference(W, U, V, stats)
    got = relative_errors(W, U, V, stats)
    assert isinstance(got[0], float) and isinstance(got[1], float)
    for a, b in zip(got, want):
        # the squared ratio num/den carries the rounding (a few u); its root to 1e-10 unless it is
        # itself at the rounding level (an exact fit: the root of rounding noise, either way)
        assert abs(a * a - b * b) <= 1e-12, (got, want)
        assert abs(a - b) <= 1e-10 or max(a, b) < 1e-5, (got, want)
    return got


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("T,d,out,rank", [(400, 48, 80, 20), (400, 80, 48, 30), (30, 64, 96, 40), (300, 40, 40, 39)])
@pytest.mark.parametrize("wdtype", [f64, torch.float32])
def test_matches_relative_error(streams, T, d, out, rank, wdtype):
    gen = torch.Generator().manual_seed(T * 1000 + d + out + rank + streams)
    stats = make_stats(T, d, gen, streams=streams)
    W = torch.randn(out, d, generator=gen, dtype=f64).to(wdtype)
    if streams == 1:
        U, V = whitened_lowrank(W, stats.gram_x, rank)
    else:
        U, V = anchored_lowrank(W, stats.cross, stats.gram_xp, rank)
    before, after = check(W, U, V, stats)
    if streams == 1:
        assert before == 0.0
    else:
        assert before > 0
    assert after < 1
    if rank < min(T, d):
        assert after > 1e-5
    # any factors, not only the optimal ones; and a dense layer
    Ur = torch.randn(out, rank, generator=gen, dtype=f64).to(wdtype)
    Vr = torch.randn(rank, d, generator=gen, dtype=f64).to(wdtype)
    check(W, Ur, Vr, stats)
    assert check(W, None, None, stats) == (before, before)


def test_zero_weight():
    gen = torch.Generator().manual_seed(1)
    for streams in (1, 2):
        stats = make_stats(200, 32, gen, streams=streams)
        Z = torch.zeros(24, 32)
        assert relative_errors(Z, None, None, stats) == (0.0, 0.0)
        assert relative_errors(Z, torch.zeros(24, 4), torch.zeros(4, 32), stats) == (0.0, 0.0)
