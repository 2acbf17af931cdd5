"""``compress(model, method, keep_ratio, calibration)``: block-by-block low-rank compression.

The driver walks the transformer blocks in order. For each block it holds the block's inputs for the
calibration batches (captured once at the first block, then produced by running the previous block),
streams the covariances of each *distinct* layer input (q/k/v share one, gate/up share one: layers fed
the very same tensor form a group), factorizes the block's target layers, replaces them with
:class:`~prehab_svd.layers.LowRankLinear`, and feeds the block's outputs on. Only one block's
statistics are alive at a time.

* ``svd``, ``asvd``, ``svd-llm`` use the original model's activations (as their papers do): one pass
  per block gathers every group's statistics and the block's outputs.
* ``aa-svd`` runs two streams on the same tokens: ``x`` through the original block and ``x'`` through
  the block as compressed so far, starting from the compressed model's block input. Groups are
  compressed in forward order, so ``o_proj`` sees the inputs produced by the already compressed
  q/k/v, and ``down_proj`` those of the compressed gate/up.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .calibration import (
    GroupStats,
    StageInput,
    Timings,
    as_batch,
    blocks_chain,
    capture_block_inputs,
    check_finite,
    collect_group_input,
    eval_context,
    find_groups,
    progress_bar,
    run_stage,
    select_tokens,
    take_sequences,
    token_mask,
)
from .errors import PrehabError
from .layers import LowRankLinear
from .models import Plan, plan_targets, rank_for
from . import methods as _methods
from . import distributed as _dist

__all__ = ["compress", "check_keep_ratio", "CompressionReport", "LayerReport", "METHODS"]

METHODS = ("svd", "asvd", "svd-llm", "aa-svd", "zs-svd")
# zs-svd's default minimum rank, as a fraction of keep_ratio·(break-even rank), i.e. of the uniform rank
ZS_MIN_RANK_OF_KEEP = 0.75
# The floor the CLI and the causal demo use for a causal LM, as a fraction of the break-even rank: on
# SmolLM2 at keep 0.8 it gave perplexity 43.8 on license text against 47.8 with 0.75·keep
# (results/methods_smollm2.md). compress() keeps ZS_MIN_RANK_OF_KEEP, the setting measured on MiniLM.
ZS_MIN_RANK_CAUSAL = 0.3
DEFAULT_SHRINKAGE = "oas"  # compress()'s covariance shrinkage when none is given


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense (rank would reach break-even)
    params_dense: int
    params_kept: int
    rel_error_before: float | None  # relative output error on calibration with W (upstream shift only)
    rel_error_after: float | None  # ... with the compressed W' (the compressed model's real error)
    group: str = ""

    @property
    def dense(self) -> bool:
        return self.rank is None


@dataclass
class CompressionReport:
    method: str
    keep_ratio: float
    layers: list = field(default_factory=list)
    calibration_tokens: int = 0
    seconds: float = 0.0
    # groups whose input width exceeds the calibration tokens (rank-deficient covariance)
    short_calibration: list = field(default_factory=list)
    # method-specific facts (zs-svd: the selection's budget, drops, Σ predicted ΔL, gradient samples)
    details: dict = field(default_factory=dict)
    # seconds per phase (see Timings.KEYS): where the time of `seconds` went
    timings: dict = field(default_factory=dict)

    @property
    def params_dense(self) -> int:
        return sum(layer.params_dense for layer in self.layers)

    @property
    def params_kept(self) -> int:
        return sum(layer.params_kept for layer in self.layers)

    @property
    def kept_fraction(self) -> float:
        return self.params_kept / max(self.params_dense, 1)

    @property
    def ranks(self) -> dict:
        return {layer.name: layer.rank for layer in self.layers}

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "layers"}
        d["layers"] = [asdict(layer) for layer in self.layers]
        d.update(params_dense=self.params_dense, params_kept=self.params_kept,
                 kept_fraction=self.kept_fraction)
        return d

    def table(self) -> str:
        def fmt(x):
            return "-" if x is None else f"{x:.4f}"

        rows = [("layer", "shape", "rank", "kept", "err before", "err after")]
        for layer in self.layers:
            rows.append((
                layer.name, f"{layer.out_features}x{layer.in_features}",
                "dense" if layer.rank is None else str(layer.rank),
                f"{layer.params_kept / layer.params_dense:.3f}",
                fmt(layer.rel_error_before), fmt(layer.rel_error_after),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"{self.method}: kept {self.params_kept:,} of {self.params_dense:,} targeted parameters "
            f"(keep_ratio {self.kept_fraction:.3f}, asked {self.keep_ratio}), "
            f"{self.calibration_tokens:,} calibration tokens, {self.seconds:.1f} s"
        )
        return "\n".join(lines)


def _check_shrinkage(shrinkage):
    """``shrinkage`` as the factorization uses it: a float in [0, 1] or "oas"."""
    if shrinkage == "oas":
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
        raise PrehabError(f"shrinkage must be a number in [0, 1] or 'oas', got {shrinkage!r}")
    return float(shrinkage)


@dataclass
class _Options:
    alpha: float = 0.5
    damping: float = 0.0
    shrinkage: float | str = 0.0  # or "oas": per group, data-driven
    stats_dtype: torch.dtype = torch.float32
    progress: bool = False
    zs: "_ZSContext | None" = None
    timer: "Timings" = field(default_factory=lambda: Timings(None))


# --------------------------------------------------------------------------------------------------
# The driver


def _replace(root: nn.Module, rel_name: str, new: nn.Module):
    parent_name, _, child = rel_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def compress(
    model: nn.Module,
    method: str,
    keep_ratio: float,
    calibration=None,
    *,
    targets=None,
    exclude=None,
    alpha: float = 0.5,
    damping: float = 0.0,
    shrinkage: float | str = DEFAULT_SHRINKAGE,
    stats_dtype: torch.dtype = torch.float32,
    task=None,
    grad_samples: int = 32,
    correction: bool = False,
    correction_grads: int = 4,
    min_rank_fraction: float | None = None,
    allocation: str = "uniform",
    ranks=None,
    progress: bool = False,
) -> CompressionReport:
    """Replace the targeted ``nn.Linear`` layers of ``model`` in place by ``LowRankLinear``.

    Args:
        model: a Hugging Face model or any ``nn.Module``.
        method: ``"svd"``, ``"asvd"``, ``"svd-llm"``, ``"aa-svd"`` or ``"zs-svd"``.
        keep_ratio: fraction of the targeted layers' parameters KEPT, in (0, 1]; a layer gets rank
            ``floor(keep_ratio·m·n/(m+n))`` and stays dense when that reaches break-even. ``zs-svd``
            instead spends the same total budget on heterogeneous ranks (see
            :mod:`prehab_svd.zs_svd`).
        calibration: iterable of batches, each a dict of model inputs (``model(**batch)``) or a
            LongTensor of token ids [batch, tokens]. Positions with ``attention_mask`` 0 never enter a
            covariance. Optional for ``"svd"`` only (then no error is reported). Under an initialized
            ``torch.distributed`` process group, call ``compress`` on every rank with that rank's
            shard of the batches: the statistics are summed over the ranks, the factorizations spread
            over them, and every rank gets the same model (see :mod:`prehab_svd.distributed`).
        targets / exclude: name patterns (see :func:`prehab_svd.models.match_name`); default: every
            linear layer inside the transformer blocks.
        alpha: ASVD's activation exponent. damping: relative diagonal damping of the Gram matrices
            (0: exact optimum with a pseudo-inverse fallback). shrinkage: α in [0, 1]; the factors are
            fit to statistics shrunk toward their diagonals, ``(1−α)·G + α·diag(G)`` (see
            :meth:`prehab_svd.methods.LayerStats.shrunk`); the reported errors use the unshrunk ones.
            ``"oas"`` (the default): α chosen per group from its statistics (the OAS estimator,
            :meth:`prehab_svd.methods.LayerStats.oas_intensity`), reported in
            ``report.details["shrinkage"]``; it vanishes as calibration tokens grow. Measured better
            than the exact optimum (0) on held-out text for svd-llm, aa-svd and zs-svd on SmolLM2 and
            MiniLM (results/whitening_numerics.md); pass 0 for the exact optimum on the calibration
            statistics. No effect on ``svd`` and ``asvd``, which use no covariance.
        stats_dtype: precision of each calibration batch's covariance product (float32 or float64);
            the running sums over the batches are float64 either way, so the statistics do not depend
            on the order of the batches or on how they are split over ranks. float64 products also
            make the model independent of the backend that computed them, at a cost (SmolLM2,
            svd-llm, keep 0.8, 2 CPU cores: 74 s against 66 s).
        task, grad_samples, correction, correction_grads, min_rank_fraction: ``zs-svd`` only. The
            task loss whose gradient predicts each component's effect ("auto": cross-entropy for a
            causal LM, the in-batch contrastive loss for an encoder, or a callable
            loss(model, batch)), averaged over the first ``grad_samples`` calibration sequences; with
            ``correction`` the one-step projected correction onto the span of ``correction_grads``
            gradients (of disjoint groups of those sequences) before re-truncation; a matrix never
            goes below rank ``max(1, floor(min_rank_fraction · break-even rank))``; the default
            (None) is ``0.75 · keep_ratio``, i.e. three quarters of the uniform rank: on MiniLM
            without a floor the rule cuts some matrices to rank 1 and loses to uniform ranks
            (results/methods_minilm.md).
        allocation: how the parameter budget is spread over the layers: ``"uniform"`` (the rank rule
            above, every layer the same fraction) or ``"zs"`` (ZS-SVD's zero-sum selection on
            first-order loss estimates, with its break-even accounting and the zs options above),
            after which ``method`` computes the factors at the selected ranks: e.g.
            ``compress(model, "aa-svd", 0.8, calib, allocation="zs")``. ``zs-svd`` always allocates
            this way.
        ranks: per-layer ranks instead of an allocation rule: a dict ``{layer name: rank}`` (``None``
            keeps a layer dense; layers not named stay dense), a :class:`CompressionReport`, or the
            path of a folder saved by :func:`prehab_svd.save_compressed` or of a JSON file holding
            such a dict (or a saved ``prehab_svd.json``). ``keep_ratio`` is then only recorded.

    Returns:
        a :class:`CompressionReport` with, per layer, the rank, the parameters kept and the relative
        calibration output error before and after.
    """
    t0 = time.perf_counter()
    _check_arguments(method, keep_ratio, stats_dtype)
    plan = plan_targets(model, targets, exclude)
    report = CompressionReport(method=method, keep_ratio=float(keep_ratio))

    opts = _Options(alpha=alpha, damping=damping, shrinkage=_check_shrinkage(shrinkage), stats_dtype=stats_dtype,
                    progress=progress)
    if allocation not in ALLOCATIONS:
        raise PrehabError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    if method == "zs-svd" and ranks is not None:
        raise PrehabError("zs-svd chooses its own ranks; pass ranks= with another method (e.g. svd-llm)")
    if ranks is not None and allocation != "uniform":
        raise PrehabError("pass either ranks= or allocation=, not both")
    zs_alloc = method == "zs-svd" or allocation == "zs"
    report.details["allocation"] = "zs" if zs_alloc else ("given" if ranks is not None else "uniform")
    if zs_alloc:
        if min_rank_fraction is None:
            min_rank_fraction = ZS_MIN_RANK_OF_KEEP * float(keep_ratio)
        _check_zs_options(grad_samples, correction_grads, min_rank_fraction)
        if calibration is None:
            raise PrehabError(f"{'zs-svd' if method == 'zs-svd' else 'allocation=zs'} needs calibration data")

    # Ranks first, so a bad keep_ratio or ranks table fails before any work.
    if ranks is not None:
        ranks = _given_ranks(plan, ranks)
    elif not zs_alloc:
        ranks = _uniform_ranks(plan, keep_ratio)

    device = next(model.parameters()).device
    opts.timer = Timings(device)
    with eval_context(model):
        if calibration is None:
            if method != "svd":
                raise PrehabError(f"method {method!r} needs calibration data")
            for _, module, names in plan.stages:
                for full, rel in names.items():
                    report.layers.append(_compress_plain(module, full, rel, ranks[full]))
        elif zs_alloc:
            batches = [as_batch(item, device) for item in calibration]
            with torch.enable_grad(), opts.timer("gradients"):
                opts.zs = _task_gradients(model, plan.targets, batches, task, grad_samples,
                                          correction_grads if correction else 0)
            opts.zs.min_rank_fraction = min_rank_fraction
            _compress_calibrated(model, plan, "zs-svd", None, batches,
                                 CompressionReport("zs-svd", keep_ratio), device, opts)
            sel = _zs_select(opts.zs, keep_ratio)
            report.details.update(
                budget=sel.budget, drops=sel.drops, predicted_loss_change=sel.running_sum,
                grad_samples=opts.zs.samples, correction=bool(correction),
                correction_grads=int(opts.zs.chunk_grads[next(iter(opts.zs.chunk_grads))].shape[0])
                if correction else 0,
                task=getattr(opts.zs.task, "__name__", type(opts.zs.task).__name__))
            opts.zs.phase = "factorize"
            _compress_calibrated(model, plan, method, sel.ranks, batches, report, device, opts)
        else:
            _compress_calibrated(model, plan, method, ranks, calibration, report, device, opts)
    report.seconds = time.perf_counter() - t0
    report.timings = dict(opts.timer.totals)
    _warn_short_calibration(report, stacklevel=3)
    return report


def _check_arguments(method, keep_ratio, stats_dtype) -> None:
    if method not in METHODS:
        raise PrehabError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_keep_ratio(keep_ratio)
    if stats_dtype not in (torch.float32, torch.float64):
        raise PrehabError("stats_dtype must be torch.float32 or torch.float64")


ALLOCATIONS = ("uniform", "zs")


def _given_ranks(plan, ranks) -> dict:
    """{target: rank or None} from a dict, a report, a saved folder or a JSON file (see compress)."""
    source = ranks
    if isinstance(ranks, CompressionReport):
        ranks = ranks.ranks
    elif isinstance(ranks, (str, os.PathLike)):
        path = Path(ranks)
        if path.is_dir():
            path = path / "prehab_svd.json"
        try:
            ranks = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PrehabError(f"ranks={str(source)!r}: cannot read a ranks table from {path} ({e})") from None
        if isinstance(ranks, dict) and isinstance(ranks.get("ranks"), dict):
            ranks = ranks["ranks"]  # a saved prehab_svd.json
    if not isinstance(ranks, dict):
        raise PrehabError("ranks= must be a dict {layer name: rank}, a CompressionReport, or the path of a "
                          "saved compressed model or of a JSON file of that dict")
    out = {}
    for _, module, names in plan.stages:
        for full, rel in names.items():
            r = ranks.get(full)
            lin = module.get_submodule(rel)
            if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
                raise PrehabError(f"ranks: layer '{full}' has rank {r!r}; a rank is a positive integer (or "
                                  "null for dense)")
            if r is not None and r * (lin.out_features + lin.in_features) >= lin.out_features * lin.in_features:
                r = None  # at or above break-even: the factored layer would be no smaller
            out[full] = r
    unknown = sorted(set(ranks) - set(out))
    if unknown:
        raise PrehabError(f"ranks names layers that are not targets of this model: {unknown[:4]}"
                          f"{' ...' if len(unknown) > 4 else ''}")
    return out


def _uniform_ranks(plan, keep_ratio) -> dict:
    """{layer: rank or None (dense)} for every target; fails on a rank of 0."""
    ranks = {}
    for _, module, names in plan.stages:
        for full, rel in names.items():
            lin = module.get_submodule(rel)
            r = rank_for(lin.out_features, lin.in_features, keep_ratio)
            if r == 0:
                raise PrehabError(
                    f"keep_ratio {keep_ratio} gives rank 0 for layer '{full}' "
                    f"({lin.out_features}x{lin.in_features}); use a larger keep_ratio"
                )
            ranks[full] = r
    return ranks


def _warn_short_calibration(report, stacklevel) -> None:
    if report.short_calibration:
        warnings.warn(
            f"{len(report.short_calibration)} layer inputs (e.g. {report.short_calibration[0]}) are "
            f"wider than the {report.calibration_tokens} calibration tokens: their covariances are "
            "rank-deficient; the factors are the minimum-norm optimum, but more calibration tokens "
            "give a better compression",
            stacklevel=stacklevel,
        )


def check_keep_ratio(keep_ratio) -> None:
    """keep_ratio is the fraction of parameters KEPT: a number in (0, 1]."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or math.isnan(
        keep_ratio
    ) or not (0 < keep_ratio <= 1):
        raise PrehabError(
            f"keep_ratio must be in (0, 1] (the fraction of parameters kept: 0.6 keeps 60%), got "
            f"{keep_ratio!r}"
        )


def _compress_plain(module, full, rel, rank) -> LayerReport:
    lin = module.get_submodule(rel)
    m, n = lin.out_features, lin.in_features
    dense_params = lin.weight.numel() + (0 if lin.bias is None else lin.bias.numel())
    if rank is None:
        return LayerReport(full, m, n, None, dense_params, dense_params, None, None)
    new = LowRankLinear.from_linear(lin, rank)
    _replace(module, rel, new)
    return LayerReport(full, m, n, rank, dense_params, new.num_params, None, None)


class _BlockHooks:
    """What the block loop does around each block. These defaults keep the whole model in memory;
    :mod:`prehab_svd.streaming` loads each block from disk before it, and writes it out, checkpoints
    and frees it after it."""

    in_memory = True  # False: the whole model is never in memory, so it cannot be one stage

    def blocks_chain(self, model, blocks, batch) -> bool:
        return blocks_chain(model, blocks, batch)

    def start(self, state: "_LoopState") -> int:
        """Called once the first block's inputs are captured; returns the index of the first block
        to run (a resumed run restores ``state`` to that block's inputs)."""
        return 0

    def before_block(self, index: int, module: nn.Module) -> None:
        pass

    def after_block(self, index: int, module: nn.Module, state: "_LoopState") -> None:
        pass


@dataclass
class _LoopState:
    """What flows from block to block: the inputs of the next block for every calibration batch."""

    inputs: list  # StageInput per batch; .hidden is the original model's stream
    shifted: list | None  # aa-svd: the compressed model's stream (hidden states), else None
    whole: bool  # the whole model is a single stage


def _compress_calibrated(model, plan, method, ranks, calibration, report, device, opts, hooks=None):
    hooks = _BlockHooks() if hooks is None else hooks
    batches = [as_batch(item, device) for item in calibration]
    _dist.raise_together(None if batches else PrehabError(
        "the calibration data is empty; pass at least one batch (on every rank)"), "calibration")
    if plan.blocks_name is not None:
        with opts.timer.rest("check", inner=("load",)):
            chained = _dist.all_true(hooks.blocks_chain(model, [s[1] for s in plan.stages], batches[0]))
        if not chained:
            if not hooks.in_memory:
                raise PrehabError(
                    "the model's blocks do not simply feed each other (block i's output is not block "
                    "i+1's input), so they cannot be compressed one at a time from disk; compress the "
                    "model in memory instead (prehab_svd.compress, or the CLI without --low-memory)")
            # e.g. a residual added outside the blocks: block i's output is not block i+1's input,
            # so the blocks cannot be run one by one. Treat the whole model as one stage.
            plan = Plan(blocks_name=None, stages=[("<model>", model, {n: n for n in plan.targets})])
    state = _start_loop(model, plan, method, batches, report, device, opts)
    start = 0 if state.whole else hooks.start(state)
    stages = list(enumerate(plan.stages))[start:]
    # Blocks with no targets just propagate (and are still loaded / written by the hooks).
    for index, (_, module, names) in progress_bar(stages, opts.progress, f"{method} blocks"):
        hooks.before_block(index, module)
        _run_block(module, names, state, ranks, report, method, opts)
        hooks.after_block(index, module, state)
        if state.whole:
            break


def _start_loop(model, plan, method, batches, report, device, opts) -> _LoopState:
    """The first stage's inputs for every batch (and the calibration token count)."""
    whole = plan.blocks_name is None
    with opts.timer("capture"):
        if whole:
            inputs = [StageInput(None, (), batch, token_mask(batch)) for batch in batches]
        else:
            inputs = capture_block_inputs(model, plan.stages[0][1], batches, device, opts.progress)
    report.calibration_tokens = _dist.all_reduce_count(sum(
        (i.mask.sum().item() if i.mask is not None else
         (i.hidden.shape[:-1].numel() if i.hidden is not None else 0)) for i in inputs))
    shifted = [i.hidden for i in inputs] if method == "aa-svd" else None
    return _LoopState(inputs, shifted, whole)


def _run_block(module, names, state, ranks, report, method, opts):
    """Compress one stage's targets and advance ``state`` to the next stage's inputs."""
    with opts.timer.rest("forward"):
        if names:
            groups = find_groups(module, names, state.inputs[0])
            if method == "aa-svd":
                state.shifted = _stage_anchored(module, names, groups, state.inputs, state.shifted,
                                                ranks, report, opts, state.whole)
            else:  # also advances state.inputs
                _stage_single(module, names, groups, state.inputs, ranks, report, method, opts,
                              state.whole)
        elif not state.whole:
            for inp in state.inputs:
                inp.hidden = run_stage(module, inp)
            if state.shifted is not None:
                state.shifted = [run_stage(module, inp, h) for inp, h in zip(state.inputs, state.shifted)]


def _stage_single(module, names, groups, inputs, ranks, report, method, opts, whole):
    """One pass: statistics of every group on the original activations, plus the stage outputs."""
    params = next(module.parameters())
    stats = []
    for g in groups:
        d = module.get_submodule(names[g[0]]).in_features
        stats.append(GroupStats(d, False, method == "asvd", opts.stats_dtype, params.device))
    handles = []
    current = {}
    for gi, g in enumerate(groups):
        def hook(_m, args, gi=gi, lead=g[0]):
            x = args[0]
            check_finite(lead, x)
            x = select_tokens(x, current["mask"])
            with opts.timer("covariance"):
                stats[gi].add(x)
        handles.append(module.get_submodule(names[g[0]]).register_forward_pre_hook(hook))
    try:
        for inp in inputs:
            current["mask"] = inp.mask
            out = run_stage(module, inp)
            if not whole:
                inp.hidden = out.detach()
    finally:
        for h in handles:
            h.remove()
    for g, st in zip(groups, stats):
        with opts.timer("factorize"):
            layer_stats = st.finalize()
            _factorize_group(module, names, g, layer_stats, ranks, report, method, opts)


def _stage_anchored(module, names, groups, inputs, shifted, ranks, report, opts, whole):
    """AA-SVD: groups in forward order, each from the original and the partly compressed stream."""
    original = copy.deepcopy(module)
    params = next(module.parameters())
    for g in groups:
        d = module.get_submodule(names[g[0]]).in_features
        st = GroupStats(d, True, False, opts.stats_dtype, params.device)
        for inp, hp in zip(inputs, shifted):
            x = collect_group_input(original, names, g, inp, inp.hidden, "original")
            xp = collect_group_input(module, names, g, inp, hp, "compressed")
            with opts.timer("covariance"):
                st.add(x, xp)
        with opts.timer("factorize"):
            _factorize_group(module, names, g, st.finalize(), ranks, report, "aa-svd", opts)
    if whole:
        return shifted
    new_shifted = [run_stage(module, inp, hp).detach() for inp, hp in zip(inputs, shifted)]
    for inp in inputs:
        inp.hidden = run_stage(original, inp).detach()
    del original
    return new_shifted


def _factorize_group(module, names, group, stats, ranks, report, method, opts):
    """Factorize the group's layers and install them. Distributed: the run's ``i``-th layer is
    computed by rank ``i % world``, which broadcasts its factors and errors; every rank installs the
    same layers and reports the same numbers."""
    spectra = method == "zs-svd" and opts.zs.phase == "spectra"
    first = len(opts.zs.candidates) if spectra else len(report.layers)  # the run's layer index
    mine = [j for j in range(len(group)) if _dist.owns(first + j)]
    alpha = stats.oas_intensity() if opts.shrinkage == "oas" else opts.shrinkage
    if opts.shrinkage == "oas" and not spectra:
        report.details.setdefault("shrinkage", {})[group[0]] = alpha  # the intensity chosen per group
    fstats = stats.shrunk(alpha)  # what the factors are fit to (stats itself when α = 0)
    factor = _methods.group_factor(method, fstats, opts.damping) if mine else None
    if spectra:
        _zs_spectra(module, names, group, factor, opts.zs, first)
        return
    distributed = _dist.is_distributed()
    jobs, results, failure = [], [], None
    for j, full in enumerate(group):
        lin = module.get_submodule(names[full])
        W = lin.weight.detach()
        rank = ranks[full]
        # [error before, error after, 1 if the owner failed]; U, V: filled by the owner's broadcast
        info = torch.zeros(3, dtype=torch.float64, device=W.device)
        U = V = None
        if j not in mine and rank is not None:
            U = torch.empty(lin.out_features, rank, dtype=W.dtype, device=W.device)
            V = torch.empty(rank, lin.in_features, dtype=W.dtype, device=W.device)
        elif j in mine:
            try:
                before = after = _methods.relative_error(W, W, stats)
                if rank is not None:
                    if method == "zs-svd":
                        U, V = _zs_factors(W, factor, rank, opts.zs.chunk_grads.get(full))
                    else:
                        U, V = _methods.factorize(method, W, fstats, rank, alpha=opts.alpha,
                                                  damping=opts.damping, factor=factor)
                    U, V = U.contiguous(), V.contiguous()
                    after = _methods.relative_error(W, (U.to(torch.float64) @ V.to(torch.float64)), stats)
                info = torch.tensor([before, after, 0.0], dtype=torch.float64, device=W.device)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others were told
                if not distributed:
                    raise
                failure = failure or e
                info[2] = 1.0
                if rank is not None:  # something to broadcast in the factors' place
                    U = torch.zeros(lin.out_features, rank, dtype=W.dtype, device=W.device)
                    V = torch.zeros(rank, lin.in_features, dtype=W.dtype, device=W.device)
        results.append((U, V, info))
        jobs.append((_dist.owner(first + j), [info] + ([] if U is None else [U, V])))
    _dist.broadcast_from_owners(jobs)
    if failure is not None:
        raise failure
    for j, (full, (U, V, info)) in enumerate(zip(group, results)):
        rel = names[full]
        lin = module.get_submodule(rel)
        m, n = lin.out_features, lin.in_features
        dense_params = m * n + (0 if lin.bias is None else lin.bias.numel())
        before, after, failed = info.tolist()
        if failed:
            raise PrehabError(f"the factorization of layer '{full}' failed on rank "
                              f"{_dist.owner(first + j)}; see the error raised there")
        if U is None:
            report.layers.append(LayerReport(full, m, n, None, dense_params, dense_params, before,
                                             before, group=group[0]))
            continue
        if not (math.isfinite(after) and torch.isfinite(U).all() and torch.isfinite(V).all()):
            raise PrehabError(f"factorization of layer '{full}' produced non-finite values")
        new = LowRankLinear.from_factors(U, V, lin.bias)
        _replace(module, rel, new)
        report.layers.append(LayerReport(full, m, n, ranks[full], dense_params, new.num_params, before,
                                         after, group=group[0]))
    if stats.tokens < stats.gram_x.shape[0]:
        report.short_calibration.append(group[0])


# --------------------------------------------------------------------------------------------------
# ZS-SVD: task gradients, spectra, global selection, factors


@dataclass
class _ZSContext:
    task: object
    grads: dict  # layer name -> mean task gradient [out, in] (float32)
    chunk_grads: dict  # layer name -> [k, out, in] gradients of k disjoint sequence groups (correction)
    samples: int
    phase: str = "spectra"  # then "factorize"
    min_rank_fraction: float = 0.0
    candidates: list = field(default_factory=list)


def _check_zs_options(grad_samples, correction_grads, min_rank_fraction):
    for name, v in (("grad_samples", grad_samples), ("correction_grads", correction_grads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PrehabError(f"{name} must be a positive int, got {v!r}")
    if not (isinstance(min_rank_fraction, (int, float)) and 0 <= min_rank_fraction <= 1):
        raise PrehabError(f"min_rank_fraction must be in [0, 1], got {min_rank_fraction!r}")


def _task_gradients(model, names, batches, task, samples, chunks) -> _ZSContext:
    """Mean gradient of the task loss w.r.t. each target weight over the first ``samples`` sequences.

    ``torch.autograd.grad`` is used, so the parameters' ``.grad`` are left untouched. With
    ``chunks > 0`` the sequences are split (batch by batch, round robin) into that many groups and the
    gradient of each group is kept too, for the correction step.
    """
    weights = [model.get_submodule(n).weight for n in names]
    frozen = [w for w in weights if not w.requires_grad]
    for w in frozen:  # a frozen model still has a task gradient; restored below
        w.requires_grad_(True)
    try:
        return _task_gradients_of(model, names, weights, batches, task, samples, chunks)
    finally:
        for w in frozen:
            w.requires_grad_(False)


def _gradient_plan(batches, samples) -> tuple:
    """Which sequences enter the task gradient: the first ``samples`` in the global order, as
    ``(mine, taken)``: ``mine`` = ``[(local batch, sequences taken, global batch)]`` of this rank,
    ``taken`` = sequences taken per global batch. Distributed, the global order is rank 0's batch 0,
    rank 1's batch 0, ..., rank 0's batch 1, ...: the order of the batches before an interleaved
    sharding ``batches[rank::world]``."""
    sizes = [int(b["input_ids"].shape[0]) if "input_ids" in b else 1 for b in batches]
    per_rank = _dist.all_gather_objects(sizes)
    me = _dist.rank()
    mine, taken, seen = [], [], 0
    for i in range(max(len(s_) for s_ in per_rank)):
        for r, rank_sizes in enumerate(per_rank):
            if seen >= samples:
                return mine, taken
            if i >= len(rank_sizes):
                continue
            take = min(rank_sizes[i], samples - seen)
            if r == me:
                mine.append((i, take, len(taken)))
            taken.append(take)
            seen += take
    return mine, taken


def _task_gradients_of(model, names, weights, batches, task, samples, chunks) -> _ZSContext:
    """The sums of ``n · gradient`` over this rank's planned batches, summed over the ranks, over
    the global sequence count (and the same per chunk of global batches, round robin)."""
    from .tasks import default_task

    loss_fn = default_task(model, task, encoder="contrastive")
    plan, taken = _gradient_plan(batches, samples)
    total = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    # per chunk: sums; chunk c holds the global batches g with g % chunks == c
    groups = [[torch.zeros_like(t) for t in total] for _ in range(min(chunks, len(taken)))]
    error = None
    try:
        for i, n, g in plan:
            part = take_sequences(batches[i], n)
            loss = loss_fn(model, part)
            if not torch.isfinite(loss):
                raise PrehabError(f"the task loss is {float(loss.detach())} on calibration batch {i}; "
                                  "check the model and data")
            gs = torch.autograd.grad(loss, weights, allow_unused=True)
            if chunks:
                for s_, gr in zip(groups[g % chunks], gs):
                    if gr is not None:
                        s_.add_(gr.float(), alpha=n)
            for t, gr in zip(total, gs):
                if gr is not None:
                    t.add_(gr.float(), alpha=n)
    except PrehabError as e:
        error = e
    _dist.raise_together(error, "the task gradient of zs-svd")
    seen = sum(taken)
    if seen == 0:
        raise PrehabError("no calibration sequences for the task gradient")
    _dist.all_reduce_sum(*total, *(t for sums in groups for t in sums))
    counts = [sum(taken[c::chunks]) for c in range(len(groups))]
    grads = {name: t / seen for name, t in zip(names, total)}
    chunk_grads = {}
    if chunks:
        for i, name in enumerate(names):
            chunk_grads[name] = torch.stack([sums[i] / max(cnt, 1) for sums, cnt in zip(groups, counts)])
    return _ZSContext(task=loss_fn, grads=grads, chunk_grads=chunk_grads, samples=seen)


def _zs_spectra(module, names, group, factor, zs: _ZSContext, first: int = 0):
    """σ and ΔL of the group's layers; distributed, layer ``first + j`` is computed by its owner rank
    and broadcast, so every rank holds the same candidates."""
    from .zs_svd import MatrixCandidates, break_even_rank, whitened_spectrum

    spectra, jobs = [], []
    for j, full in enumerate(group):
        lin = module.get_submodule(names[full])
        if _dist.owns(first + j):
            sigma, delta = whitened_spectrum(lin.weight, factor, zs.grads[full])
            sigma, delta = sigma.contiguous(), delta.contiguous()
        else:  # filled by the owner's broadcast
            k = min(lin.out_features, lin.in_features)
            sigma, delta = (torch.empty(k, dtype=torch.float64, device=lin.weight.device) for _ in "sd")
        spectra.append((sigma, delta))
        jobs.append((_dist.owner(first + j), [sigma, delta]))
    _dist.broadcast_from_owners(jobs)
    for full, (sigma, delta) in zip(group, spectra):
        lin = module.get_submodule(names[full])
        m, n = lin.out_features, lin.in_features
        min_rank = max(1, math.floor(zs.min_rank_fraction * break_even_rank(m, n)))
        zs.candidates.append(MatrixCandidates(full, m, n, sigma.cpu(), delta.cpu(),
                                              min(min_rank, min(m, n))))


def _zs_select(zs: _ZSContext, keep_ratio):
    from .zs_svd import zero_sum_select

    if all(bool((c.delta == 0).all()) for c in zs.candidates):
        raise PrehabError(
            "the task gradient is zero for every target layer, so zs-svd has nothing to rank by (a "
            "distillation loss toward the model itself is zero at the start); use task='contrastive' "
            "for an encoder or 'causal_lm' for a causal LM")
    return zero_sum_select(zs.candidates, keep_ratio)


def _zs_factors(W, factor, rank, grads):
    from .linalg import closed_form_factors
    from .zs_svd import corrected_lowrank

    if grads is not None:
        return corrected_lowrank(W, factor, rank, grads)
    W64 = W.detach().to(torch.float64)
    return closed_form_factors(W64, W64 @ factor.R, factor, rank, W.dtype, W.device)
