"""Low-Rank Prehab: fine-tune a dense model toward low rank before compressing it.

``prehab(model, calibration, data)``:

1. runs the calibration batches once through the model and accumulates each targeted layer's input
   covariance ``xᵀx/N`` (layers fed the same tensor share one), and takes its whitening factor ``L``
   (fp64 Cholesky, or the eigen pseudo-factor of a singular covariance, zero-padded to square);
2. fine-tunes on ``task(model, batch) + λ_t · mean_ℓ R(W_ℓ L_ℓ)`` over the ``data`` batches, where R is
   the stable rank ``‖M‖_F²/σ₁²`` (default) or the nuclear surrogate ``‖M‖_*²/‖M‖_F²``, computed by the
   batched op :func:`prehab_svd.ops.stable_rank_loss` on the stack of each weight shape, with the power
   iteration warm-started from the previous step's singular vectors; λ_t rises exponentially from
   ``lam_start`` to ``lam`` over ``warmup_steps``, then stays at ``lam``. Or, with
   ``surrogate="tail"`` and the planned ``keep_ratio``, fine-tunes on the task loss alone and after
   every step shrinks each layer's whitened tail beyond rank r (the part svd-llm will cut) by the
   proximal step of that penalty; its plain gradient hardly moves the tail, which lives in the
   inputs' low-variance directions where the gradient in W is scaled down by the whitening. Or, with
   ``surrogate="compressed"`` (the default when ``keep_ratio`` is given), fine-tunes on
   ``task(model) + λ_t·task(model compressed by svd-llm at keep_ratio)``, the compressed weights
   ``U_r U_rᵀ W`` with U_r tracked from step to step (:class:`~.surrogates.CompressedTask`);
3. logs per step the task loss, the surrogate, and the mean stable rank of the whitened weights.

The whitening factors stay fixed during training (the compression that follows re-measures the
covariances of the fine-tuned model): :mod:`.whitening`. The surrogates are objects of
:mod:`.surrogates`, the whitened weights :class:`~.targets.WhitenedTargets`, and each step runs on
the runner of the parallel mode (:mod:`.runners`). Then compress with a whitening method
(``svd-llm``, ``aa-svd``, ``zs-svd``), optionally followed by :func:`prehab_svd.rehab`.

Under an initialized ``torch.distributed`` process group, every rank calls ``prehab`` with its shard of
the batches: the covariances are summed over the ranks, training is data-parallel (DDP, or FSDP2 with
the parameters sharded: :mod:`prehab_svd.fsdp`) and each rank computes the regularizer of its own
layers only (:mod:`prehab_svd.distributed`).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import distributed as _dist
from .. import fsdp as _fsdp
from ..calibration import as_batch, eval_context
from ..errors import PrehabError
from ..models import plan_targets
from ..tasks import default_task, step_range
from ..utils import is_causal_model, is_keep_ratio
from .runners import runner_for
from .surrogates import SURROGATES, resolve_surrogate
from .targets import WhitenedTargets, stable_rank_of
from .whitening import stats_blocks_that_fit, whitening_factors

__all__ = ["prehab", "PrehabReport", "PrehabStep", "lambda_schedule", "prehab_task_name"]


@dataclass
class PrehabStep:
    step: int
    task_loss: float
    surrogate: float  # mean over layers of the surrogate (stable, nuclear, tail); "compressed": its task loss
    stable_rank: float | None  # mean stable rank of the whitened weights W·L (None: not computed this step)
    lam: float
    loss: float


@dataclass
class PrehabReport:
    surrogate: str
    steps: list = field(default_factory=list)
    layers: list = field(default_factory=list)  # names, in the order of the rank lists
    stable_rank_before: list = field(default_factory=list)  # per layer, whitened
    stable_rank_after: list = field(default_factory=list)
    calibration_tokens: int = 0
    seconds: float = 0.0
    lam: float = 0.0
    lr: float = 0.0
    task: str = ""  # the task loss trained: "causal_lm", "distill", "contrastive" or the callable's name
    # "compressed" with tracking: how far the tracked truncation lags the exact one after the last
    # step (WhitenedTargets.tracking_lag): max and mean over the layers of sin θ_max and of the
    # relative excess of the truncation error
    tracking: dict = field(default_factory=dict)
    # seconds: "whitening" (calibration pass and factors), "spectra" (SVDs before and after, and the
    # tracking check), "steps" (the training steps)
    timings: dict = field(default_factory=dict)
    # per layer singular values of W·L (tensors; not in to_dict): for plots
    spectra_before: list = field(default_factory=list, repr=False)
    spectra_after: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("spectra_before", "spectra_after")}
        d["steps"] = [asdict(s) if not isinstance(s, dict) else s for s in self.steps]
        return d

    @property
    def mean_stable_rank_before(self) -> float:
        return sum(self.stable_rank_before) / max(len(self.stable_rank_before), 1)

    @property
    def mean_stable_rank_after(self) -> float:
        return sum(self.stable_rank_after) / max(len(self.stable_rank_after), 1)

    def summary(self) -> str:
        first, last = (self.steps[0], self.steps[-1]) if self.steps else (None, None)
        lines = [f"prehab ({self.surrogate} surrogate): {len(self.steps)} steps, "
                 f"{len(self.layers)} layers, {self.calibration_tokens:,} calibration tokens, "
                 f"{self.seconds:.1f} s",
                 f"mean whitened stable rank {self.mean_stable_rank_before:.2f} -> "
                 f"{self.mean_stable_rank_after:.2f}"]
        if first is not None:
            lines.append(f"task loss {first.task_loss:.4f} (step 1) -> {last.task_loss:.4f} "
                         f"(step {last.step})")
        return "\n".join(lines)


def lambda_schedule(step: int, lam: float, lam_start: float, warmup_steps: int) -> float:
    """λ at 0-based ``step``: exponential from lam_start to lam over warmup_steps, then lam."""
    if warmup_steps <= 0 or step >= warmup_steps or lam <= 0:
        return lam
    start = min(lam_start, lam)
    return start * (lam / start) ** (step / warmup_steps)


def _make_optimizer(optimizer, params, lr, weight_decay):
    if callable(optimizer):
        return optimizer(params)
    name = str(optimizer).lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise PrehabError(f"unknown optimizer {optimizer!r}; use 'adamw', 'adam', 'sgd' or a callable "
                      "params -> torch.optim.Optimizer")


def _check_positive_int(name, v, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise PrehabError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")


def _check_options(steps, warmup_steps, surrogate, keep_ratio, lam, lam_start, lr, dtype, stats_blocks,
                   parallel):
    """The surrogate object ``surrogate`` names (None: "compressed" with a keep_ratio, else
    "stable"), or :class:`PrehabError` for the first bad option."""
    _check_positive_int("steps", steps)
    _check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
    try:
        surr = resolve_surrogate(surrogate, keep_ratio)
    except ValueError as e:
        raise PrehabError(str(e)) from None
    if surr.needs_keep_ratio:
        # stricter than compress's (0, 1]: at 1 the planned compression keeps (about) everything,
        # leaving nothing to train toward
        if not is_keep_ratio(keep_ratio) or keep_ratio == 1:
            raise PrehabError(f"surrogate={surr.name!r} needs keep_ratio, the fraction of parameters the "
                              f"compression after Prehab keeps, in (0, 1); got {keep_ratio!r}")
    elif keep_ratio is not None:
        needing = " or ".join(repr(name) for name, s in SURROGATES.items() if s.needs_keep_ratio)
        raise PrehabError(f"keep_ratio is only used by surrogate={needing} (got surrogate={surr.name!r})")
    if lam is not None and not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise PrehabError(f"lam must be a finite number >= 0 (or None: the surrogate's default), got {lam!r}")
    if not (isinstance(lam_start, (int, float)) and lam_start > 0):
        raise PrehabError(f"lam_start must be > 0, got {lam_start!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise PrehabError(f"lr must be a finite number > 0 (or None: the surrogate's default), got {lr!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise PrehabError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if stats_blocks is not None:
        _check_positive_int("stats_blocks", stats_blocks)
    if parallel not in ("auto", "ddp", "fsdp"):
        raise PrehabError(f"parallel must be 'auto', 'ddp' or 'fsdp', got {parallel!r}")
    return surr


def prehab_task_name(model: nn.Module, task=None, surrogate=None, keep_ratio=None) -> str:
    """The task loss ``prehab(model, ..., task=task, surrogate=surrogate, keep_ratio=keep_ratio)`` trains:
    ``task`` when named; for None/"auto" "distill" when the surrogate is "compressed" (the default
    with a keep_ratio), else "causal_lm" for a causal LM and "distill" for an encoder; a callable's
    (class) name.

    With the compressed surrogate a causal LM distils toward the original (next-token KL divergence):
    on SmolLM2 the cross-entropy of the training text made the compressed models worse on another
    kind of text than without Prehab (+75 % perplexity on license text for the default compression at
    keep 0.4) and moved the dense model by 7 %; distillation improves both texts and keeps the dense
    model within 1.4 % (results/prehab_smollm2.md). It holds a frozen copy of the original: under
    FSDP that copy is sharded as the model is (one more shard per rank, gathered block by block in
    its forward pass)."""
    if callable(task):
        return getattr(task, "__name__", type(task).__name__)
    if task not in (None, "auto"):
        return task
    try:
        surr = resolve_surrogate(surrogate, keep_ratio)
    except ValueError as e:
        raise PrehabError(str(e)) from None
    if surr.name == "compressed" or not is_causal_model(model):
        return "distill"
    return "causal_lm"


def _lag_summary(lag: dict) -> dict:
    """The report's ``tracking`` entry from :meth:`WhitenedTargets.tracking_lag`'s per-layer values."""
    if not lag:
        return {}
    sins, excess = [v[0] for v in lag.values()], [v[1] for v in lag.values()]
    return {"layers": len(lag), "max_sin": max(sins), "mean_sin": sum(sins) / len(sins),
            "max_excess": max(excess), "mean_excess": sum(excess) / len(excess)}


def _under_autocast(loss_fn, dtype, device: torch.device):
    """``task(model, batch)``: ``loss_fn`` under autocast to ``dtype`` (bf16/fp16), else as it is."""
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16)
                else None)

    def task(m, batch):
        if autocast is not None:
            with autocast:
                return loss_fn(m, batch)
        return loss_fn(m, batch)
    return task


def prehab(
    model: nn.Module,
    calibration,
    data,
    *,
    steps: int = 100,
    lam: float | None = None,
    lam_start: float = 1e-3,
    warmup_steps: int = 10,
    surrogate=None,
    keep_ratio: float | None = None,
    ranks=None,
    task=None,
    lr: float | None = None,
    optimizer="adamw",
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    dtype: torch.dtype | None = None,
    train_mode: bool = False,
    targets=None,
    exclude=None,
    damping: float = 0.0,
    backend: str = "auto",
    parallel: str = "auto",
    stats_blocks: int | None = None,
    log_every: int = 0,
    callback=None,
    progress: bool = False,
) -> PrehabReport:
    """Fine-tune ``model`` in place on task loss + λ·(rank surrogate of its whitened target weights).

    Args:
        model: a Hugging Face model or any ``nn.Module`` (the targets are found as ``compress`` does).
        calibration: batches (dicts of model inputs or LongTensors of ids) for the input covariances.
        data: training batches, cycled for ``steps`` steps.
        steps: optimizer steps. lam: the surrogate's weight after warm-up (None: the surrogate's
            default, 1 for "compressed", 0.01 for "tail", 10 for the others); lam_start: its weight
            at step 1 (exponential warm-up over ``warmup_steps``).
        surrogate: None (default): "compressed" when ``keep_ratio`` is given, else "stable". The
            names: "stable" (‖WL‖_F²/σ₁², power iteration warm-started), "nuclear"
            (‖WL‖_*²/‖WL‖_F², Newton–Schulz) or "tail" (Σ_{i>r}σᵢ²/‖WL‖_F², the fraction of the
            whitened energy that truncation to the rank of ``keep_ratio`` would drop: svd-llm's
            relative error of the layer; needs ``keep_ratio``). "tail" is not added to the loss:
            after each optimizer step on the task loss, its proximal step removes the fraction
            λ_t/(1+λ_t) of every layer's whitened tail (``W ← W − f·(I − U_r U_rᵀ) W``), so λ is a
            rate per step (0.01 removes about 63% of the tail over 100 steps), not a weight.
            "compressed": the task loss of the model as svd-llm would compress it at ``keep_ratio``
            (every W replaced by ``U_r U_rᵀ W``, U_r the top-r left singular vectors of W·L, held
            fixed within the step), so training minimizes ``task(dense) + λ·task(compressed)``: the
            dense model stays close to the original while the compressed one improves. By default
            U_r is tracked (one block-power step per optimizer step, exact SVDs only at the start)
            and each batch is split, half for each term, so a step costs about a plain fine-tuning
            step; ``surrogate=CompressedTask(track=False, split=False)`` gives the exact projector on
            the whole batch for both terms (fp64 SVDs every step, two passes). A
            :class:`~prehab_svd.training.surrogates.Surrogate` object is used as given.
        keep_ratio: the compression planned after Prehab (surrogates "tail" and "compressed").
        ranks: "compressed" only: truncate each layer to its own rank instead of the uniform rank of
            ``keep_ratio``, as ``compress(..., ranks=...)`` takes them (a dict ``{layer: rank or
            None}``, a CompressionReport, a saved compressed model's folder or a JSON file), e.g. the
            zs allocation's ranks when aa-svd at zs-svd's ranks will follow.
        task: None/"auto" (default): "distill" with the "compressed" surrogate or for an encoder,
            "causal_lm" for a causal LM with the other surrogates (:func:`prehab_task_name`);
            "causal_lm" (next-token cross-entropy of the training text), "distill" (distillation to a
            copy of the original taken now: next-token KL divergence for a causal LM,
            :class:`~prehab_svd.tasks.LogitDistillation`; sentence embeddings for an encoder),
            "contrastive", or a callable loss(model, batch). With distillation the dense term is zero
            at the start and holds the dense model near the original, while the compressed term
            teaches the truncated model the original's behaviour.
        lr (None: the surrogate's default, 1e-4 for "compressed", 2e-5 for the others), optimizer
            ("adamw", "adam", "sgd" or a callable params -> optimizer), weight_decay,
        grad_clip (max global grad norm; None: off).
        dtype: None (fp32) or torch.bfloat16/float16 to train under autocast.
        train_mode: run with dropout (model.train()); default False keeps the model in eval mode.
        damping: relative damping of the covariances before the whitening factor.
        parallel: under an initialized ``torch.distributed`` process group (call ``prehab`` on every
            rank, each with its shard of ``calibration`` and ``data``): ``"ddp"`` trains data-parallel
            with DistributedDataParallel, each rank computing the regularizer of its own layers
            (layer i on rank i % world); see :mod:`prehab_svd.distributed`. ``"fsdp"``: FSDP2, the
            parameters, gradients and optimizer state sharded over the ranks, for a model that does
            not fit one device; a model already sharded with ``fully_shard`` is used as it is, a
            whole one is sharded in place (each block, then the root) and stays sharded; the
            regularizer of layer i is still computed on rank i % world only (see
            :mod:`prehab_svd.fsdp`). ``"auto"`` (default): ``"fsdp"`` for a model whose parameters
            are DTensors, else ``"ddp"``. Without a process group, a whole model trains in this
            process whatever ``parallel`` says.
        stats_blocks: accumulate the calibration covariances of this many blocks per forward pass
            over the calibration batches, so that only their statistics exist at once (an LLM
            block's are hundreds of MB to GB in fp32/fp64; results are bitwise the same). None:
            as many blocks as fit in a quarter of the device's free memory (all of a small model,
            one pass), or one block per pass under FSDP (the model is sharded to save memory, so
            its statistics should not be whole either).
        log_every: print a log line every so many steps (0: never); callback(step: PrehabStep) is
            called after every step.

    Returns:
        a :class:`PrehabReport` with the per-step log and per-layer whitened stable ranks before and
        after.
    """
    t0 = time.perf_counter()
    surr = _check_options(steps, warmup_steps, surrogate, keep_ratio, lam, lam_start, lr, dtype, stats_blocks,
                          parallel)
    lam = surr.default_lam if lam is None else lam
    lr = surr.default_lr if lr is None else lr
    sharded = _fsdp.is_sharded(model)
    if sharded and parallel == "ddp":
        raise PrehabError("the model's parameters are DTensors (sharded with FSDP2's fully_shard): "
                          "use parallel='fsdp' (or 'auto'), or pass the model unsharded")
    # FSDP: a sharded model, or a whole one under a process group with parallel="fsdp"
    use_fsdp = sharded or (parallel == "fsdp" and _dist.is_distributed())
    device = next(model.parameters()).device
    calib = [as_batch(b, device) for b in calibration]
    train_batches = [as_batch(b, device) for b in data]
    _dist.raise_together(
        PrehabError("the calibration data is empty; pass at least one batch") if not calib else
        PrehabError("the training data is empty; pass at least one batch") if not train_batches else
        None, "prehab's input check")
    plan = plan_targets(model, targets, exclude)
    names = plan.targets
    if not names:
        raise PrehabError("no target layers found")
    if ranks is not None:
        if surr.name != "compressed":
            raise PrehabError(f"ranks= sets the truncation of the 'compressed' surrogate; got "
                              f"surrogate={surr.name!r}")
        from ..compression import given_ranks

        ranks = given_ranks(plan, ranks)

    grad_enabled = torch.is_grad_enabled()
    # eval mode and the KV cache off throughout (restored afterwards); autograd as the caller has it
    with eval_context(model), torch.set_grad_enabled(grad_enabled):
        # Distributed, each rank regularizes its own layers (i % world): factors, power-iteration
        # states and spectra of those only. Without a process group, it owns them all.
        Runner = runner_for(use_fsdp, _dist.world_size())
        own = [n for i, n in enumerate(names) if _dist.owns(i)]
        blocks_per_pass = stats_blocks if stats_blocks is not None else (
            1 if use_fsdp else stats_blocks_that_fit(model, plan, device))
        wanted = set(Runner.layers_to_whiten(names, own, surr))
        factors, tokens = whitening_factors(model, plan, calib, wanted, damping, blocks_per_pass)
        owner_of = {n: _dist.owner(i) for i, n in enumerate(names)}
        report = PrehabReport(surrogate=surr.name, layers=list(names), calibration_tokens=tokens,
                              lam=float(lam), lr=float(lr))
        report.timings["whitening"] = time.perf_counter() - t0
        task_name = prehab_task_name(model, task, surr)
        if sharded and task_name == "distill":
            raise PrehabError(
                "the distillation task copies the model as its target, which FSDP2 cannot do for a "
                "model already sharded; pass the model unsharded with parallel='fsdp' (prehab copies "
                "it, then shards it), or pass task=prehab_svd.tasks.LogitDistillation(reference) (a causal "
                "LM) or EmbeddingDistillation(reference) (an encoder) with a reference you sharded "
                "separately, or task='causal_lm'")
        # before sharding: a distillation target copies the model
        loss_fn = task if callable(task) else default_task(model, task_name)
        report.task = task_name
        if use_fsdp:
            reference = getattr(loss_fn, "reference", None) if not callable(task) else None
            if reference is not None:  # the distillation target: sharded too, not whole on every rank
                _fsdp.shard(reference, device, frozen=True)
            if not sharded:
                _fsdp.shard(model, device)
            _fsdp.check_sharding(model, names)
        targets_w = (WhitenedTargets(model, names, {n: factors[n] for n in own}, backend=backend, owned=own,
                                     keep_ratio=keep_ratio, ranks=ranks) if own else None)
        runner = Runner(model, names, targets_w, owner_of, surr)

        t1 = time.perf_counter()
        report.spectra_before = runner.spectra()
        report.stable_rank_before = [stable_rank_of(sp) for sp in report.spectra_before]
        t_steps = time.perf_counter()
        report.timings["spectra"] = t_steps - t1
        model.train(train_mode)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _make_optimizer(optimizer, params, lr, weight_decay)
        runner.start(_under_autocast(loss_fn, dtype, device), device, factors, keep_ratio, ranks)
        stream = itertools.cycle(train_batches)
        for step in step_range(steps, progress, "prehab"):
            batch = next(stream)
            lam_t = lambda_schedule(step, float(lam), float(lam_start), warmup_steps)
            opt.zero_grad(set_to_none=True)
            logged = runner.step(step, batch, lam_t)  # forward and backward: the gradients are ready
            if grad_clip is not None:  # after DDP's averaging (FSDP's reduce-scatter): the same on every rank
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if not surr.in_loss:  # "tail": its proximal step on the owners' whole weights, then synced
                runner.update_weights(lambda t: surr.proximal_step(t, lam_t))
            rec = PrehabStep(step=step + 1, task_loss=logged[0], surrogate=logged[1],
                             stable_rank=logged[2], lam=lam_t, loss=logged[3])
            report.steps.append(rec)
            if callback is not None:
                callback(rec)
            if log_every and (step + 1) % log_every == 0:
                sr = "-" if rec.stable_rank is None else f"{rec.stable_rank:.3f}"
                print(f"prehab step {rec.step}/{steps}: task {rec.task_loss:.4f}  "
                      f"{surr.name} {rec.surrogate:.3f}  stable rank {sr}  λ {lam_t:.3g}")
        runner.stop()
        t1 = time.perf_counter()
        report.timings["steps"] = t1 - t_steps
        report.tracking = _lag_summary(runner.tracking_lag())
        report.spectra_after = runner.spectra()
        report.stable_rank_after = [stable_rank_of(sp) for sp in report.spectra_after]
        report.timings["spectra"] += time.perf_counter() - t1
    report.seconds = time.perf_counter() - t0
    return report
