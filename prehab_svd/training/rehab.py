"""Rehab: LoRA recovery fine-tuning of a compressed model, through ``peft``, on the factors.

Each :class:`~prehab_svd.layers.LowRankLinear` computes ``(x Vᵀ) Uᵀ + b``: two linear maps. For the
fine-tuning, each is temporarily replaced by a pair of ``nn.Linear`` layers (``down``: V, ``up``: U,
sharing the very same parameter tensors), so ``peft`` can attach a LoRA adapter to each factor
(``V + B_v A_v`` and ``U + B_u A_u``). Only the adapters train; the factors, the rest of the model and
the biases stay frozen. Afterwards the adapters are merged (``merge_and_unload``) and the pairs turn
back into ``LowRankLinear`` layers of the same rank: rehab adds no parameters to the deployed model.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import distributed as _dist
from .. import fsdp as _fsdp
from ..calibration import as_batch
from ..errors import PrehabError
from ..layers import FactorPair, LowRankLinear
from ..tasks import default_task, distillation, step_range
from ..utils import is_causal_model, set_submodule

__all__ = ["rehab", "RehabReport"]


@dataclass
class RehabReport:
    steps: list = field(default_factory=list)  # dicts: step, task_loss
    layers: int = 0  # LowRankLinear layers adapted
    trainable_params: int = 0  # LoRA parameters trained (merged away afterwards)
    lora_rank: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if not self.steps:
            return "rehab: no steps"
        return (f"rehab (LoRA rank {self.lora_rank} on the factors of {self.layers} layers, "
                f"{self.trainable_params:,} trainable parameters): {len(self.steps)} steps, task loss "
                f"{self.steps[0]['task_loss']:.4f} -> {self.steps[-1]['task_loss']:.4f}, {self.seconds:.1f} s")


def rehab(
    model: nn.Module,
    data,
    *,
    steps: int = 100,
    task=None,
    reference: nn.Module | None = None,
    lr: float = 1e-4,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    layers=None,
    parallel: str = "ddp",
    log_every: int = 0,
    progress: bool = False,
) -> RehabReport:
    """LoRA fine-tuning of the factors of every LowRankLinear in ``model`` (in place), merged afterwards.

    Args:
        model: a compressed model (after :func:`prehab_svd.compress`).
        data: training batches (dicts of model inputs or LongTensors of ids), cycled for ``steps``.
            Under an initialized ``torch.distributed`` process group, call ``rehab`` on every rank
            with that rank's shard: data-parallel training with DistributedDataParallel, every rank
            ends with the same model (see :mod:`prehab_svd.distributed`).
        task: "auto" (cross-entropy for a causal LM, distillation to ``reference`` for an encoder),
            "causal_lm", "distill", "contrastive", or a callable loss(model, batch).
        reference: the uncompressed original model, the target of the "distill" task (required for
            it: distilling toward the compressed model itself would teach nothing).
        lr: AdamW learning rate of the adapters. lora_rank / lora_alpha (default 2·rank) / lora_dropout:
            the LoRA configuration. layers: names of the LowRankLinear layers to adapt (default all).
        parallel: under a process group, ``"ddp"`` (every rank holds the whole model) or ``"fsdp"``
            (FSDP2, for a compressed model that does not fit one device): pass the model whole;
            after the adapters are attached (rank 0's initialization on every rank), each block and
            then the root are sharded in place with ``fully_shard``; after training each adapter is
            merged into its factor's shards where they lie (``U += s·B A`` row by row, only ``A``
            gathered whole). The model stays sharded, and each adapted layer stays in its training
            form, a pair of linears ``down`` (V) and ``up`` (U, bias) computing ``up(down(x))``:
            FSDP2 keeps its own references to the modules it shards, so they cannot be swapped back.
            :func:`prehab_svd.fsdp.full_state_dict` gathers it with the ``LowRankLinear`` names
            (``.V``, ``.U``, ``.bias``) for saving. Without a process group, ``parallel`` changes
            nothing.

    Returns:
        a :class:`RehabReport` with the per-step task loss.
    """
    try:
        import peft
    except ImportError as e:  # pragma: no cover - a dependency
        raise PrehabError("rehab needs the peft package: pip install peft") from e
    t0 = time.perf_counter()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrehabError(f"steps must be a positive int, got {steps!r}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise PrehabError(f"lora_rank must be a positive int, got {lora_rank!r}")
    if parallel not in ("ddp", "fsdp"):
        raise PrehabError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if _fsdp.is_sharded(model):
        raise PrehabError("rehab needs the compressed model whole (its parameters are DTensors): FSDP2 "
                          "would keep pointing at the LowRankLinear layers that rehab replaces while "
                          "training; pass it unsharded with parallel='fsdp' and rehab shards it")
    use_fsdp = parallel == "fsdp" and _dist.is_distributed()
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if layers is not None:
        unknown = sorted(set(layers) - set(names))
        if unknown:
            raise PrehabError(f"not LowRankLinear layers of this model: {unknown}")
        names = [n for n in names if n in set(layers)]
    if not names:
        raise PrehabError("the model has no LowRankLinear layers: compress it first")
    device = next(model.parameters()).device
    batches = [as_batch(b, device) for b in data]
    _dist.raise_together(None if batches else PrehabError(
        "the training data is empty; pass at least one batch (on every rank)"), "rehab's input check")
    if callable(task):
        loss_fn = task
    elif task in (None, "auto", "distill") and (task == "distill" or not is_causal_model(model)):
        if reference is None:
            raise PrehabError("rehab of an encoder distils toward the original model: pass "
                              "reference=<the uncompressed model> (or another task)")
        loss_fn = distillation(model, reference)
    else:
        loss_fn = default_task(model, task)

    pairs = {}
    for n in names:
        pairs[n] = FactorPair(model.get_submodule(n))
        set_submodule(model, n, pairs[n])
    requires = {n: p.requires_grad for n, p in model.named_parameters()}  # by name: FSDP replaces them
    was_training = model.training
    report = RehabReport(layers=len(names), lora_rank=lora_rank)
    target_modules = [f"{n}.down" for n in names] + [f"{n}.up" for n in names]
    config = peft.LoraConfig(r=lora_rank, lora_alpha=float(lora_alpha if lora_alpha else 2 * lora_rank),
                             lora_dropout=lora_dropout, target_modules=target_modules, bias="none")
    peft_model, step_fn, finished = None, None, False
    world = _dist.world_size()
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", category=FutureWarning)
            peft_model = peft.get_peft_model(model, config)
        model.eval()
        # Distributed: DDP (its construction gives every rank rank 0's random adapter init), or FSDP
        # (rank 0's init broadcast first, then the model sharded); each rank trains on its shard of
        # the data, the gradients are averaged over the ranks.
        if use_fsdp:
            _dist.broadcast([p.data for p in peft_model.parameters() if p.requires_grad], src=0)
            _fsdp.shard(model, device)
            step_fn = _dist.LossModule(model, loss_fn)
        else:
            step_fn = _dist.data_parallel(_dist.LossModule(model, loss_fn), device)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        report.trainable_params = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        stream = itertools.cycle(batches)
        for step in step_range(steps, progress, "rehab"):
            batch = next(stream)
            opt.zero_grad(set_to_none=True)
            loss = step_fn(batch)
            logged = loss.item() if world == 1 else _dist.all_reduce_floats([loss.item()])[0] / world
            if not math.isfinite(logged):  # distributed: the mean over the ranks, the same everywhere
                raise PrehabError(f"the task loss is {logged} at rehab step {step + 1}; lower the "
                                  "learning rate")
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            report.steps.append({"step": step + 1, "task_loss": logged})
            if log_every and (step + 1) % log_every == 0:
                print(f"rehab step {step + 1}/{steps}: task {logged:.4f}")
        finished = True
    finally:
        step_fn = None  # DDP's gradient hooks go before the adapters are merged
        if peft_model is not None:
            with torch.no_grad():
                if finished and use_fsdp:
                    _fsdp.merge_lora_shards(peft_model)  # into the factors' shards, in place
                    peft_model.unload()
                elif finished:
                    peft_model.merge_and_unload()  # merges the adapters into down/up, in place
                else:
                    peft_model.unload()  # a failed run leaves the factors as they were
        if not use_fsdp:
            for n in names:
                set_submodule(model, n, model.get_submodule(n).to_lowrank())
        for n, p in model.named_parameters():
            p.requires_grad_(requires.get(n, True))
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report
