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

from .anchored import AnchoredPass, RestartedStreams
from .calibration import (
    GroupStats,
    StageInput,
    Timings,
    as_batch,
    capture_block_inputs,
    check_chain,
    eval_context,
    find_groups,
    progress_bar,
    run_stage,
    select_tokens,
    token_mask,
)
from .errors import PrehabError
from .layers import LowRankLinear
from .models import Plan, plan_targets, rank_for
from .utils import check_keep_ratio, set_submodule
from . import methods as _methods
from . import distributed as _dist
from .methods import ALLOCATIONS, LayerStats, ZSAllocation

__all__ = ["compress", "check_keep_ratio", "CompressionReport", "LayerReport", "METHODS", "method_options"]

METHODS = _methods.names()
# The floor the CLI and the causal demo use for a causal LM, as a fraction of the break-even rank: on
# SmolLM2 at keep 0.8 it gave perplexity 43.8 on license text against 47.8 with 0.75·keep
# (results/methods_smollm2.md). compress() keeps methods.zs_svd.ZS_MIN_RANK_OF_KEEP, the setting measured on MiniLM.
ZS_MIN_RANK_CAUSAL = 0.3


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


def compress(
    model: nn.Module,
    method: str,
    keep_ratio: float,
    calibration=None,
    *,
    targets=None,
    exclude=None,
    allocation: str = "uniform",
    ranks=None,
    stats_dtype: torch.dtype = torch.float32,
    pause_forwards: bool = False,
    progress: bool = False,
    **options,
) -> CompressionReport:
    """Replace the targeted ``nn.Linear`` layers of ``model`` in place by ``LowRankLinear``.

    Args:
        model: a Hugging Face model or any ``nn.Module``.
        method: ``"svd"``, ``"asvd"``, ``"svd-llm"``, ``"aa-svd"`` or ``"zs-svd"``.
        keep_ratio: fraction of the targeted layers' parameters KEPT, in (0, 1]; a layer gets rank
            ``floor(keep_ratio·m·n/(m+n))`` and stays dense when that reaches break-even. ``zs-svd``
            instead spends the same total budget on heterogeneous ranks (see
            :mod:`prehab_svd.methods.zs_svd`).
        calibration: iterable of batches, each a dict of model inputs (``model(**batch)``) or a
            LongTensor of token ids [batch, tokens]. Positions with ``attention_mask`` 0 never enter a
            covariance. Optional for ``"svd"`` only (then no error is reported). Under an initialized
            ``torch.distributed`` process group, call ``compress`` on every rank with that rank's
            shard of the batches: the statistics are summed over the ranks, the factorizations spread
            over them, and every rank gets the same model (see :mod:`prehab_svd.distributed`).
        targets / exclude: name patterns (see :func:`prehab_svd.models.match_name`); default: every
            linear layer inside the transformer blocks.
        options: the method's keyword options (and the ``"zs"`` allocation's); an option the method
            does not take is an error that lists the ones it does (:func:`method_options`).
            alpha: ASVD's activation exponent. damping: relative diagonal damping of the Gram matrices
            (0: exact optimum with a pseudo-inverse fallback). shrinkage: α in [0, 1]; the factors are
            fit to statistics shrunk toward their diagonals, ``(1−α)·G + α·diag(G)`` (see
            :meth:`prehab_svd.methods.LayerStats.shrunk`); the reported errors use the unshrunk ones.
            ``"oas"`` (the default of svd-llm and aa-svd): α chosen per group from its statistics
            (the OAS estimator, :meth:`prehab_svd.methods.LayerStats.oas_intensity`), reported in
            ``report.details["shrinkage"]``; it vanishes as calibration tokens grow. zs-svd (and the
            zs allocation's spectra) default to 0, the exact optimum. Chosen by held-out perplexity
            on SmolLM2 at keep 0.8/0.6/0.4 with two calibration sizes (results/shrinkage_smollm2.md)
            and on MiniLM (results/shrinkage_minilm.md). Not an option of ``svd`` and ``asvd``.
        stats_dtype (a driver option, any method): precision of each calibration batch's
            covariance product (float32 or float64); the running sums over the batches are float64 either way, so the statistics do not depend
            on the order of the batches or on how they are split over ranks. float64 products also
            make the model independent of the backend that computed them, at a cost (SmolLM2,
            svd-llm, keep 0.8, 2 CPU cores: 74 s against 66 s).
        pause_forwards (a driver option; two-stream methods, aa-svd): run each block forward once per
            batch and stream, pausing every forward at each group until the group is compressed
            (:class:`prehab_svd.anchored.AnchoredPass`), instead of running the block again from its
            input for each group (about three block forwards per stream on a Llama block). Faster
            (SmolLM2, keep 0.8, 2 CPU cores: 137 s against 200 s) but every batch's activations up
            to the current layer are held at once (there 4.1 GB of peak memory against 2.0;
            at 7B shapes on a GPU tens of GB): off by default. results/compress_speed.md.
        task, grad_samples, correction, correction_grads, min_rank_fraction: ``zs-svd`` only. The
            task loss whose gradient predicts each component's effect ("auto": cross-entropy for a
            causal LM, the in-batch contrastive loss for an encoder, or a callable
            loss(model, batch)), averaged over the first ``grad_samples`` calibration sequences; with
            ``correction`` the one-step projected correction onto the span of ``correction_grads``
            gradients (of disjoint groups of those sequences) before re-truncation; a matrix never
            goes below rank ``max(1, floor(min_rank_fraction · break-even rank))``; the default
            (None) is ``0.75 · keep_ratio``, i.e. three quarters of the uniform rank: on MiniLM
            without a floor the rule cuts some matrices to rank 1 and loses to uniform ranks
            (results/methods_minilm.md). ``correction`` is zs-svd's alone; ``task``,
            ``grad_samples`` and ``min_rank_fraction`` belong to the zs allocation.
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
    m, zs = _setup(method, keep_ratio, stats_dtype, allocation, ranks, options)
    if zs is not None and calibration is None:
        raise PrehabError(f"{method if m.allocation else 'allocation=zs'} needs calibration data")
    plan = plan_targets(model, targets, exclude)
    report = CompressionReport(method=method, keep_ratio=float(keep_ratio))
    report.details["allocation"] = "zs" if zs is not None else ("given" if ranks is not None else "uniform")
    report.details["options"] = asdict(m.options)  # every option the factors used, defaults included
    # Ranks first, so a bad keep_ratio or ranks table fails before any work.
    if ranks is not None:
        ranks = given_ranks(plan, ranks)
    elif zs is None:
        ranks = _uniform_ranks(plan, keep_ratio)

    device = next(model.parameters()).device
    if not isinstance(pause_forwards, bool):
        raise PrehabError(f"pause_forwards must be True or False, got {pause_forwards!r}")
    loop = _Loop(m, stats_dtype, progress, Timings(device), pause_forwards=pause_forwards)
    with eval_context(model):
        if calibration is None:
            if m.needs_calibration:
                raise PrehabError(f"method {method!r} needs calibration data")
            for _, module, names in plan.stages:
                for full, rel in names.items():
                    report.layers.append(_compress_plain(module, full, rel, ranks[full]))
        else:
            batches = [as_batch(item, device) for item in calibration]
            if zs is not None:
                ranks = _zs_ranks(model, plan, zs, m, batches, report, device, loop)
            _compress_calibrated(model, plan, ranks, batches, report, device, loop)
    report.seconds = time.perf_counter() - t0
    report.timings = dict(loop.timer.totals)
    _warn_short_calibration(report, stacklevel=3)
    return report


def method_options(method: str, allocation: str = "uniform") -> list:
    """The keyword options ``compress(model, method, ..., allocation=allocation, **options)`` takes."""
    m = _methods.get(method)
    types = [m.Options] + ([ZSAllocation.Options] if (m.allocation or allocation) == "zs" else [])
    return _methods.option_names(*types)


def _setup(method, keep_ratio, stats_dtype, allocation, ranks, options):
    """The method object (with its options) and the zs allocation (or None), all arguments checked."""
    cls = _methods.get(method)
    check_keep_ratio(keep_ratio)
    if stats_dtype not in (torch.float32, torch.float64):
        raise PrehabError("stats_dtype must be torch.float32 or torch.float64")
    if allocation not in ALLOCATIONS:
        raise PrehabError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    if cls.allocation is not None and ranks is not None:
        raise PrehabError(f"{method} chooses its own ranks; pass ranks= with another method (e.g. svd-llm)")
    if ranks is not None and allocation != "uniform":
        raise PrehabError("pass either ranks= or allocation=, not both")
    zs_alloc = (cls.allocation or allocation) == "zs"
    types = {"method": cls.Options, **({"allocation": ZSAllocation.Options} if zs_alloc else {})}
    built = _methods.build_options(types, options, method + (" with allocation='zs'" if zs_alloc and not
                                                             cls.allocation else ""))
    m = cls(built["method"])
    zs = (ZSAllocation(built["allocation"], keep_ratio, getattr(m, "correction_grads", 0)) if zs_alloc
          else None)
    return m, zs


def _zs_ranks(model, plan, zs, m, batches, report, device, loop) -> dict:
    """The zero-sum allocation: task gradients, one pass of the block driver that visits every group
    for its spectra (the original model's activations, nothing installed), the selection."""
    with loop.timer("gradients"):
        zs.gradients(model, plan.targets, batches)
    spectra = _Loop(zs.spectral, loop.stats_dtype, loop.progress, loop.timer, on_group=zs.visit)
    _compress_calibrated(model, plan, None, batches, CompressionReport(m.name, zs.keep_ratio), device,
                         spectra)
    sel = zs.select()
    correction = getattr(m.options, "correction", False)
    report.details.update(
        zs.details(sel), correction=bool(correction),
        correction_grads=int(zs.chunk_grads[next(iter(zs.chunk_grads))].shape[0]) if correction else 0,
        task=getattr(zs.task, "__name__", type(zs.task).__name__))
    if correction:
        loop.extra = zs.chunk_grads
    return sel.ranks


def given_ranks(plan, ranks) -> dict:
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


def _compress_plain(module, full, rel, rank) -> LayerReport:
    lin = module.get_submodule(rel)
    m, n = lin.out_features, lin.in_features
    dense_params = lin.weight.numel() + (0 if lin.bias is None else lin.bias.numel())
    if rank is None:
        return LayerReport(full, m, n, None, dense_params, dense_params, None, None)
    new = LowRankLinear.from_linear(lin, rank)
    set_submodule(module, rel, new)
    return LayerReport(full, m, n, rank, dense_params, new.num_params, None, None)


@dataclass
class _Loop:
    """How the block loop runs: the method (what to collect, how to factorize), the statistics'
    precision, the timer; ``on_group(module, names, group, stats)`` replaces the factorization (the
    zs allocation's spectra pass); ``extra``: per-layer data handed to the method's factorize."""

    method: object
    stats_dtype: torch.dtype = torch.float32
    progress: bool = False
    timer: Timings = field(default_factory=lambda: Timings(None))
    on_group: object = None
    extra: dict = field(default_factory=dict)
    pause_forwards: bool = False  # two streams: paused forwards (once each) instead of restarts
    # {(block class, its targets' relative names): groups of relative names}: blocks built alike group
    # alike, so the extra forward that finds the groups runs once per kind of block, not per block
    groups: dict = field(default_factory=dict)


class _BlockHooks:
    """What the block loop does around each block. These defaults keep the whole model in memory;
    :mod:`prehab_svd.streaming` loads each block from disk before it, and writes it out, checkpoints
    and frees it after it."""

    in_memory = True  # False: the whole model is never in memory, so it cannot be one stage

    def blocks_chain(self, model, blocks, batch) -> bool:
        return check_chain(model, blocks, batch)

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
    shifted: list | None  # two-stream methods: the compressed model's stream (hidden states), else None
    whole: bool  # the whole model is a single stage


def _compress_calibrated(model, plan, ranks, batches, report, device, loop, hooks=None):
    """The block driver: every stage in order, its groups' statistics, then ``loop.on_group`` or the
    factorization and installation of the group's layers."""
    hooks = _BlockHooks() if hooks is None else hooks
    _dist.raise_together(None if batches else PrehabError(
        "the calibration data is empty; pass at least one batch (on every rank)"), "calibration")
    if plan.blocks_name is not None:
        with loop.timer.rest("check", inner=("load",)):
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
    state = _start_loop(model, plan, batches, report, device, loop)
    start = 0 if state.whole else hooks.start(state)
    stages = list(enumerate(plan.stages))[start:]
    # Blocks with no targets just propagate (and are still loaded / written by the hooks); after the
    # last block with targets nothing needs their outputs, so they are not run at all.
    last = max((i for i, (_, _, names) in enumerate(plan.stages) if names), default=-1)
    for index, (_, module, names) in progress_bar(stages, loop.progress, f"{loop.method.name} blocks"):
        hooks.before_block(index, module)
        if index <= last:
            _run_block(module, names, state, ranks, report, loop)
        hooks.after_block(index, module, state)
        if state.whole:
            break


def _start_loop(model, plan, batches, report, device, loop) -> _LoopState:
    """The first stage's inputs for every batch (and the calibration token count)."""
    whole = plan.blocks_name is None
    with loop.timer("capture"):
        if whole:
            inputs = [StageInput(None, (), batch, token_mask(batch)) for batch in batches]
        else:
            inputs = capture_block_inputs(model, plan.stages[0][1], batches, device, loop.progress)
    report.calibration_tokens = _dist.all_reduce_count(sum(
        (i.mask.sum().item() if i.mask is not None else
         (i.hidden.shape[:-1].numel() if i.hidden is not None else 0)) for i in inputs))
    shifted = [i.hidden for i in inputs] if loop.method.streams == 2 else None
    return _LoopState(inputs, shifted, whole)


def _run_block(module, names, state, ranks, report, loop):
    """Compress one stage's targets and advance ``state`` to the next stage's inputs."""
    with loop.timer.rest("forward"):
        if names:
            groups = _groups(module, names, state.inputs[0], loop.groups)
            if loop.method.streams == 2:
                state.shifted = _stage_anchored(module, names, groups, state.inputs, state.shifted,
                                                ranks, report, loop, state.whole)
            else:  # also advances state.inputs
                _stage_single(module, names, groups, state.inputs, ranks, report, loop, state.whole)
        elif not state.whole:
            for inp in state.inputs:
                inp.hidden = run_stage(module, inp)
            if state.shifted is not None:
                state.shifted = [run_stage(module, inp, h) for inp, h in zip(state.inputs, state.shifted)]


def _groups(module, names, inp, cache) -> list:
    """The stage's groups (:func:`find_groups`), found once per kind of block (``cache``)."""
    key = (type(module), tuple(sorted(names.values())))
    if key not in cache:
        cache[key] = [[names[full] for full in g] for g in find_groups(module, names, inp)]
    full_of = {rel: full for full, rel in names.items()}
    return [[full_of[rel] for rel in g] for g in cache[key]]


def _stage_single(module, names, groups, inputs, ranks, report, loop, whole):
    """One pass: statistics of every group on the original activations, plus the stage outputs."""
    params = next(module.parameters())
    stats = []
    for g in groups:
        d = module.get_submodule(names[g[0]]).in_features
        stats.append(GroupStats(d, False, loop.method.needs_abs_mean, loop.stats_dtype, params.device))
    handles = []
    current = {}
    for gi, g in enumerate(groups):
        def hook(_m, args, gi=gi):
            x = select_tokens(args[0], current["mask"])
            with loop.timer("covariance"):
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
    for g, st in zip(groups, stats):  # every group's inputs were finite before any layer changes
        st.check_finite(g[0])
    for g, st in zip(groups, stats):
        with loop.timer("factorize"):
            _finish_group(module, names, g, st.finalize(g[0]), ranks, report, loop)


def _stage_anchored(module, names, groups, inputs, shifted, ranks, report, loop, whole):
    """Two streams: groups in forward order, each from the original and the partly compressed stream.
    By default the block runs again from its input for each group, in both streams (one batch's
    activations alive at a time); with ``loop.pause_forwards`` each forward runs once, paused at every
    group (:mod:`prehab_svd.anchored`)."""
    original = copy.deepcopy(module)
    params = next(module.parameters())
    widths = [module.get_submodule(names[g[0]]).in_features for g in groups]
    passes = AnchoredPass if loop.pause_forwards else RestartedStreams
    with passes(original, module, names, groups, inputs, shifted) as streams:
        for gi, (g, d) in enumerate(zip(groups, widths)):
            st = GroupStats(d, True, False, loop.stats_dtype, params.device)
            for x, xp in streams.inputs(gi):
                with loop.timer("covariance"):
                    st.add(x, xp)
            with loop.timer("factorize"), streams.installing(gi):
                _finish_group(module, names, g, st.finalize(g[0]), ranks, report, loop)
        if whole:
            return shifted
        originals, new_shifted = streams.outputs()
    for inp, h in zip(inputs, originals):
        inp.hidden = h
    return new_shifted


def _finish_group(module, names, group, stats: LayerStats, ranks, report, loop):
    if loop.on_group is not None:
        loop.on_group(module, names, group, stats)
    else:
        _factorize_group(module, names, group, stats, ranks, report, loop)


def _factorize_group(module, names, group, stats: LayerStats, ranks, report, loop):
    """Factorize the group's layers and install them. Distributed: the run's ``i``-th layer is
    computed by rank ``i % world`` (:func:`prehab_svd.distributed.compute_on_owners`); every rank
    installs the same layers and reports the same numbers."""
    m = loop.method
    first = len(report.layers)  # the run's layer index
    alpha = m.shrinkage(stats)
    if m.uses_covariance and m.options.shrinkage == "oas":
        report.details.setdefault("shrinkage", {})[group[0]] = alpha  # the intensity chosen per group
    fstats = stats.shrunk(alpha)  # what the factors are fit to (stats itself when α = 0)
    lins = [module.get_submodule(names[full]) for full in group]
    factor = []  # computed once, by the first layer this rank owns

    def compute(j):
        full, lin = group[j], lins[j]
        W = lin.weight.detach()
        U = V = None
        if ranks[full] is not None:
            if not factor:
                factor.append(m.group_factor(fstats))
            U, V = m.factorize(W, fstats, ranks[full], factor[0], extra=loop.extra.get(full))
            U, V = U.contiguous(), V.contiguous()
        before, after = _methods.relative_errors(W, U, V, stats)
        return before, after, U, V

    shapes = [(lin.out_features, lin.in_features, ranks[full], lin.weight.dtype, lin.weight.device)
              for full, lin in zip(group, lins)]
    results = _dist.compute_on_owners(first, shapes, compute, what="the factorization of layer",
                                      names=group)
    for full, lin, (before, after, U, V) in zip(group, lins, results):
        m_, n = lin.out_features, lin.in_features
        dense_params = m_ * n + (0 if lin.bias is None else lin.bias.numel())
        if U is None:
            report.layers.append(LayerReport(full, m_, n, None, dense_params, dense_params, before,
                                             before, group=group[0]))
            continue
        if not (math.isfinite(after) and torch.isfinite(U).all() and torch.isfinite(V).all()):
            raise PrehabError(f"factorization of layer '{full}' produced non-finite values")
        new = LowRankLinear.from_factors(U, V, lin.bias)
        set_submodule(module, names[full], new)
        report.layers.append(LayerReport(full, m_, n, ranks[full], dense_params, new.num_params, before,
                                         after, group=group[0]))
    if stats.tokens < stats.gram_x.shape[0]:
        report.short_calibration.append(group[0])
