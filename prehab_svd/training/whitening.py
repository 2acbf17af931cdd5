"""Prehab's calibration statistics: each targeted layer's input covariance and its whitening factor.

:func:`layer_input_grams` runs the calibration batches through the whole model with hooks and
accumulates ``xᵀx/N`` of each targeted layer's input (layers fed the very same tensor share one, as
in compression's groups; padded positions excluded; summed over the ranks when distributed).
:func:`whitening_factors` takes each wanted layer's square factor ``L`` with ``L Lᵀ`` the covariance
(fp64 Cholesky, or the eigen pseudo-factor of a singular covariance zero-padded to square), a few
blocks' statistics at a time so that they fit the free memory. The factors stay fixed during
Prehab (the compression that follows re-measures the covariances of the fine-tuned model).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed as _dist
from .. import ops
from ..calibration import check_finite, select_tokens, token_mask
from ..errors import PrehabError
from ..linalg import whitening_factor

__all__ = ["layer_input_grams", "whitening_factors", "stats_blocks_that_fit", "STATS_MEMORY_FRACTION"]


def layer_input_grams(model: nn.Module, names: list, batches: list, *, dtype=torch.float32):
    """``{layer name: (gram [in, in] float64, tokens)}`` of each named linear layer's input.

    One forward pass per batch with hooks; layers that receive the very same input tensor in a forward
    share one accumulator (q/k/v, gate/up). Padded positions (attention_mask 0) are excluded.
    Distributed, each rank passes its shard of the batches and gets the grams of all of them.
    """
    modules = {n: model.get_submodule(n) for n in names}
    accs: dict = {}  # group key (first layer's name) -> CovarianceAccumulator
    group_of: dict = {}  # layer name -> group key
    seen: list = []  # this forward: (input tensor, group key)
    current = {}

    def make_hook(name):
        def hook(_m, args):
            x = args[0]
            for t, key in seen:
                if t is x:
                    group_of.setdefault(name, key)
                    return
            key = group_of.setdefault(name, name)
            seen.append((x, key))
            check_finite(name, x)
            if key not in accs:
                accs[key] = ops.CovarianceAccumulator(x.shape[-1], dtype=dtype, device=x.device)
            accs[key].update(select_tokens(x.detach(), current["mask"]))
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                current["mask"] = token_mask(batch)
                model(**batch)
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in group_of]
    if missing:
        raise PrehabError(f"target layers never ran on the calibration data: {missing}")
    if _dist.is_distributed():  # each rank saw its shard: sum the raw sums and the token counts
        keys = sorted(accs)
        for key in keys:
            accs[key].tokens = _dist.all_reduce_count(
                accs[key].tokens, same=[len(keys), accs[key].d], what="the targeted layers' inputs")
        _dist.all_reduce_sum(*(accs[key].gram(normalize=False) for key in keys))
    grams = {key: acc.gram().to(torch.float64) for key, acc in accs.items()}
    return {n: (grams[group_of[n]], accs[group_of[n]].tokens) for n in names}


def _square_factor(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """A square [d, d] factor F with gram = F Fᵀ: the Cholesky factor, or the eigen pseudo-factor
    zero-padded (extra zero columns leave the singular values of W F unchanged)."""
    f = whitening_factor(gram, damping)
    if f.kind == "cholesky":
        return f.R
    d, k = f.R.shape
    return torch.cat([f.R, f.R.new_zeros(d, d - k)], dim=1) if k < d else f.R


STATS_MEMORY_FRACTION = 0.25  # of the device's free memory, for one pass's calibration statistics


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (CUDA: ``mem_get_info``; CPU: MemAvailable of /proc/meminfo), or
    None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def stats_blocks_that_fit(model, plan, device: torch.device) -> int:
    """How many blocks' calibration statistics to accumulate per pass: as many as fit in
    ``STATS_MEMORY_FRACTION`` of the free memory, counting 20 bytes (the float64 sum, the fp32 scratch
    of one batch's product, and the fp64 Gram) per entry of each targeted layer's ``in × in``
    covariance (an upper bound: layers fed the same input share one); at least 1, all of them when the
    free memory is unknown."""
    n = len(plan.stages)
    free = _free_memory(device)
    if free is None or n <= 1:
        return n
    per_block = max(sum(20 * model.get_submodule(name).weight.shape[1] ** 2 for name in st[2])
                    for st in plan.stages)
    return max(1, min(n, int(free * STATS_MEMORY_FRACTION // max(per_block, 1))))


def whitening_factors(model, plan, calib: list, wanted: set, damping: float, blocks_per_pass: int):
    """``({name: square whitening factor}, calibration tokens)`` for the ``wanted`` targets.

    The input covariances are accumulated over the calibration batches ``blocks_per_pass`` blocks
    at a time (one forward pass over the batches per group of blocks): only those blocks' statistics
    exist at once (every rank accumulates every layer's, on its shard, before the all-reduce), and
    each pass's Grams are dropped once the wanted factors are taken from them."""
    stages = [list(st[2]) for st in plan.stages]
    factors, tokens = {}, 0
    for i in range(0, len(stages), blocks_per_pass):
        part = [n for st in stages[i:i + blocks_per_pass] for n in st]
        grams = layer_input_grams(model, part, calib)
        tokens = next(iter(grams.values()))[1]
        for n in part:
            if n in wanted:
                factors[n] = _square_factor(grams[n][0], damping)
        del grams
    return factors, tokens
