"""Task losses for the training-based methods (Prehab, ZS-SVD's gradients, LoRA rehab).

A task loss is any callable ``loss(model, batch) -> scalar tensor`` (differentiable with respect to the
model's parameters). Three are built in:

* :func:`causal_lm_loss` -- next-token cross-entropy of a causal LM, padding excluded;
* :class:`LogitDistillation` -- for a causal LM: the KL divergence from a frozen reference's (the
  original's) next-token distribution to the model's, averaged over the unpadded positions; zero
  (with zero gradient) at the reference itself, so fine-tuning with it keeps the model's function;
* :class:`EmbeddingDistillation` -- for an encoder without labels: ``1 − cos`` between the model's
  mean-pooled sentence embedding and a frozen reference model's (the original), averaged over sentences;
  zero (and with zero gradient) at the reference itself;
* :class:`ContrastiveLoss` -- in-batch contrastive loss of an encoder (each sentence's two halves are a
  positive pair, the other sentences of the batch are negatives), the objective sentence encoders such
  as all-MiniLM-L6-v2 are trained with. Its gradient at a trained model is not zero, so it can drive
  ZS-SVD's first-order estimates where distillation cannot.

:func:`default_task` picks causal-LM cross-entropy for causal LMs and the given encoder default
otherwise; "distill" names the distillation that fits the model (next-token for a causal LM, sentence
embeddings for an encoder).
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PrehabError
from .utils import is_causal_model  # in __all__: prehab and rehab import it from here

__all__ = [
    "causal_lm_loss",
    "LogitDistillation",
    "EmbeddingDistillation",
    "distillation",
    "ContrastiveLoss",
    "is_causal_model",
    "default_task",
    "forward_batch",
    "batch_filter",
    "pooled_embeddings",
    "step_range",
]


def batch_filter(model: nn.Module):
    """A function ``batch -> batch`` that drops the keys ``model.forward`` does not accept (none when
    it takes ``**kwargs`` or has no readable signature)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return lambda batch: batch
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return lambda batch: batch
    names = set(params)
    return lambda batch: {k: v for k, v in batch.items() if k in names}


def _as_dict(batch) -> dict:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
    if not isinstance(batch, dict):
        raise PrehabError(f"a batch must be a dict of model inputs or a LongTensor of ids, got "
                          f"{type(batch).__name__}")
    return batch


def forward_batch(model: nn.Module, batch) -> object:
    """``model(**batch)`` for a dict batch (keys the forward does not take are dropped) or token ids."""
    return model(**batch_filter(model)(_as_dict(batch)))


def causal_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The next-token logits [batch, length, vocab] of a causal LM (its KV cache off)."""
    kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    out = model(**batch_filter(model)(batch), **kw)
    return out.logits if hasattr(out, "logits") else out[0]


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose token and successor are not padding."""
    batch = _as_dict(batch)
    ids = batch["input_ids"]
    logits = causal_logits(model, batch)
    valid = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    mask = batch.get("attention_mask")
    if mask is not None:
        valid = mask[:, :-1].bool() & mask[:, 1:].bool()
    if not valid.any():
        raise PrehabError("a batch has no scored tokens (sequences need 2 unpadded tokens)")
    return F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid])


class LogitDistillation:
    """``mean_t KL(p_ref(·|x_≤t) ‖ p(·|x_≤t))`` over the unpadded positions t of each sequence, ``p_ref``
    the next-token distribution of a frozen copy of the original causal LM (fp32 softmax).

    Unlike cross-entropy on the training text's own tokens, it asks the model for the original's whole
    distribution at every position, and it is zero at the original: fine-tuning the dense model with
    it keeps the dense model where it was, while a compressed surrogate trained with it learns to
    behave as the original does, not as the training text does. ``reference`` defaults to a deep copy
    of the model taken when the loss is created: create the loss first, then train.
    """

    def __init__(self, reference: nn.Module):
        self.reference = reference  # used under no_grad in eval mode; its parameters are not changed

    @classmethod
    def of(cls, model: nn.Module) -> "LogitDistillation":
        return cls(copy.deepcopy(model))

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        batch = _as_dict(batch)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if not valid.any():
            raise PrehabError("a batch has no scored tokens (every position is padding)")
        was_training = self.reference.training
        self.reference.eval()
        try:
            with torch.no_grad():
                ref = F.log_softmax(causal_logits(self.reference, batch)[valid].float(), dim=-1)
        finally:
            self.reference.train(was_training)
        logp = F.log_softmax(causal_logits(model, batch)[valid].float(), dim=-1)
        return (ref.exp() * (ref - logp)).sum(-1).mean()


def pooled_embeddings(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled last hidden state over unpadded tokens, [batch, hidden], fp32 (differentiable)."""
    out = forward_batch(model, batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None:
        return hidden.float().mean(1)
    m = mask.to(hidden.device).unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


class EmbeddingDistillation:
    """``mean_i (1 − cos(e_i, e_i^ref))`` with ``e^ref`` from a frozen copy of the original encoder.

    ``reference`` defaults to a deep copy of the model taken when the loss is created (before any
    training): create the loss first, then train.
    """

    def __init__(self, reference: nn.Module):
        # used under no_grad only: the reference's parameters (and its train/eval mode) are not changed
        self.reference = reference

    @classmethod
    def of(cls, model: nn.Module) -> "EmbeddingDistillation":
        return cls(copy.deepcopy(model))

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        was_training = self.reference.training
        self.reference.eval()
        try:
            with torch.no_grad():
                ref = pooled_embeddings(self.reference, batch)
        finally:
            self.reference.train(was_training)
        emb = pooled_embeddings(model, batch)
        return (1.0 - F.cosine_similarity(emb, ref, dim=-1, eps=1e-8)).mean()


class ContrastiveLoss:
    """In-batch contrastive loss: the first and second half of each sentence's tokens are a pair.

    Each batch (``input_ids``, ``attention_mask``) is split per sentence at the middle of its unpadded
    tokens; the embedding of the first half must be closest (cosine × ``scale``, cross-entropy) to the
    embedding of its own second half among the batch's second halves, and vice versa. Sentences with
    fewer than 4 unpadded tokens are skipped; a batch needs two usable sentences.
    """

    def __init__(self, scale: float = 20.0):
        self.scale = float(scale)

    @staticmethod
    def _halves(batch: dict):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        lengths = mask.sum(1)
        keep = lengths >= 4
        ids, mask, lengths = ids[keep], mask[keep], lengths[keep]
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        mid = (lengths // 2).unsqueeze(1)
        first = mask.bool() & (pos < mid)
        second = mask.bool() & (pos >= mid)
        return ids, first, second

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise PrehabError("the contrastive loss needs dict batches with input_ids (and attention_mask)")
        ids, first, second = self._halves(batch)
        if ids.shape[0] < 2:
            raise PrehabError("the contrastive loss needs at least 2 sentences of 4+ tokens per batch")
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")
                 and not (isinstance(v, torch.Tensor) and v.dim() >= 1)}
        a = pooled_embeddings(model, {"input_ids": ids, "attention_mask": first.long(), **extra})
        b = pooled_embeddings(model, {"input_ids": ids, "attention_mask": second.long(), **extra})
        sim = self.scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        target = torch.arange(sim.shape[0], device=sim.device)
        return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))


def default_task(model: nn.Module, task=None, *, encoder: str = "distill"):
    """Resolve ``task``: a callable is returned as is; None/"auto" gives cross-entropy for a causal LM
    and the ``encoder`` default ("distill" or "contrastive") otherwise; or name one of "causal_lm",
    "distill", "contrastive"."""
    if callable(task):
        return task
    if task in (None, "auto"):
        task = "causal_lm" if is_causal_model(model) else encoder
    if task == "causal_lm":
        return causal_lm_loss
    if task == "distill":
        return distillation(model, copy.deepcopy(model))
    if task == "contrastive":
        return ContrastiveLoss()
    raise PrehabError(f"unknown task {task!r}; use 'auto', 'causal_lm', 'distill', 'contrastive' or a "
                      "callable loss(model, batch) -> scalar")


def distillation(model: nn.Module, reference: nn.Module):
    """The distillation toward ``reference`` that fits ``model``: :class:`LogitDistillation` for a
    causal LM, :class:`EmbeddingDistillation` for an encoder."""
    return LogitDistillation(reference) if is_causal_model(model) else EmbeddingDistillation(reference)


def step_range(steps: int, progress: bool, desc: str):
    """``range(steps)``, with a progress bar when asked (the training loops of prehab and rehab)."""
    if not progress:
        return range(steps)
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=desc, leave=False)
