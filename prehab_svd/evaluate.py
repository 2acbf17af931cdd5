"""Measuring a (compressed) model: perplexity for causal LMs, embedding fidelity for encoders."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prehab_svd.errors import PrehabError
from prehab_svd.tasks import batch_filter

__all__ = ["PerplexityResult", "perplexity", "sentence_embeddings", "embedding_fidelity", "generate_text",
           "DEFAULT_PROMPT"]


@dataclass
class PerplexityResult:
    """Perplexity over all scored tokens.

    ``ppl = exp(nll)`` with ``nll`` the mean next-token negative log-likelihood (nats per token) over
    every scored token of every batch. A batch whose loss is NaN or Inf is never dropped: its index is
    listed in ``nonfinite_batches`` and its loss is included, so ``nll``/``ppl`` become ``inf`` (or
    ``nan``). ``ppl_finite_only``/``nll_finite_only`` are the same measures over the finite batches
    only (``tokens_finite_only`` tokens), for diagnosis -- not a substitute for ``ppl``.
    """

    ppl: float
    nll: float
    tokens: int
    nonfinite_batches: list[int] = field(default_factory=list)
    ppl_finite_only: float = float("nan")
    nll_finite_only: float = float("nan")
    tokens_finite_only: int = 0


def _exp(x: float) -> float:
    if math.isnan(x):
        return float("nan")
    return math.exp(x) if x < 709.0 else float("inf")


def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_dict(batch, i: int) -> dict:
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 1:
            batch = batch.unsqueeze(0)
        return {"input_ids": batch}
    if isinstance(batch, dict) and "input_ids" in batch:
        return dict(batch)
    raise PrehabError(f"batch {i} is neither a dict with 'input_ids' nor a LongTensor of token ids")


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class _EvalMode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _total(batches):
    try:
        return len(batches)
    except TypeError:
        return None


def perplexity(model, batches, *, device=None, progress: bool = False) -> PerplexityResult:
    """Perplexity of a causal LM (``model(**batch).logits`` of shape [b, t, vocab]) on ``batches``.

    Each batch is a dict with ``input_ids`` (and optionally ``attention_mask``) or a LongTensor of ids.
    Token ``t+1`` is predicted from position ``t``; a prediction counts only when both positions have
    attention_mask 1, so padding never enters the loss. Per-token cross-entropy is computed from fp32
    logits and summed in fp64.
    """
    device = _model_device(model, device)
    keep = batch_filter(model)
    try:
        use_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        use_cache = False
    total_nll, total_tokens = 0.0, 0
    finite_nll, finite_tokens = 0.0, 0
    nonfinite: list[int] = []
    with torch.no_grad(), _EvalMode(model):
        for i, raw in enumerate(tqdm(batches, total=_total(batches), desc="perplexity",
                                     disable=not progress)):
            batch = _to(_as_dict(raw, i), device)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            kwargs = {"use_cache": False} if use_cache else {}
            out = model(**keep(batch), **kwargs)
            logits = out.logits if hasattr(out, "logits") else out[0]
            if logits.shape[:2] != ids.shape:
                raise PrehabError(f"batch {i}: logits have shape {tuple(logits.shape)}, expected "
                                  f"{tuple(ids.shape)} + (vocab,): is this a causal LM?")
            valid = torch.ones_like(ids[:, 1:], dtype=torch.bool)
            if mask is not None:
                valid = mask[:, :-1].bool() & mask[:, 1:].bool()
            pred = logits[:, :-1][valid].float()  # [n, vocab]; padded positions never touched
            target = ids[:, 1:][valid]
            n = int(target.numel())
            if n == 0:
                continue
            nll = F.cross_entropy(pred, target, reduction="none").double().sum().item()
            total_nll += nll
            total_tokens += n
            if math.isfinite(nll):
                finite_nll += nll
                finite_tokens += n
            else:
                nonfinite.append(i)
    if total_tokens == 0:
        raise PrehabError("no tokens to score: every batch is empty or fully padded (sequences need at "
                          "least 2 unpadded tokens)")
    mean = total_nll / total_tokens
    mean_f = finite_nll / finite_tokens if finite_tokens else float("nan")
    return PerplexityResult(ppl=_exp(mean), nll=mean, tokens=total_tokens, nonfinite_batches=nonfinite,
                            ppl_finite_only=_exp(mean_f), nll_finite_only=mean_f,
                            tokens_finite_only=finite_tokens)


def sentence_embeddings(model, batches, *, device=None, progress: bool = False,
                        normalize: bool = False) -> torch.Tensor:
    """Sentence embeddings [N, hidden] (fp32, on the CPU), one row per sentence in batch order.

    Mean pooling of ``last_hidden_state`` over the tokens with attention_mask 1, as
    sentence-transformers' all-MiniLM-L6-v2 pools; ``normalize=True`` also L2-normalizes each row (as
    its ``Normalize`` module does). Padded positions are excluded even if they hold NaN.
    """
    device = _model_device(model, device)
    keep = batch_filter(model)
    rows = []
    with torch.no_grad(), _EvalMode(model):
        for i, raw in enumerate(tqdm(batches, total=_total(batches), desc="embeddings",
                                     disable=not progress)):
            batch = _to(_as_dict(raw, i), device)
            out = model(**keep(batch))
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            m = mask.to(hidden.device).bool().unsqueeze(-1)
            h = hidden.float().masked_fill(~m, 0.0)
            emb = h.sum(1) / m.sum(1).clamp(min=1).float()
            if normalize:
                emb = F.normalize(emb, p=2, dim=-1)
            rows.append(emb.cpu())
    if not rows:
        raise PrehabError("no batches to embed")
    return torch.cat(rows)


def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor, *, k: int = 5,
                       chunk: int = 1024) -> dict:
    """How well ``candidate`` embeddings [N, d] reproduce ``reference`` ones (same sentences, same order).

    Returns a dict:

    * ``cosine`` -- mean over sentences of cos(reference_i, candidate_i); ``cosine_min`` the worst one;
    * ``nn_agreement`` -- fraction of sentences whose nearest neighbour (cosine, itself excluded) among
      the N sentences is the same in the candidate space as in the reference space;
    * ``top5_recall`` -- mean fraction of each sentence's ``k`` (default 5, at most N-1) reference
      nearest neighbours found among its ``k`` candidate nearest neighbours;
    * ``n`` -- the number of sentences.

    Computed in fp64. A non-finite candidate row makes ``cosine`` NaN (it is not skipped).
    """
    if not isinstance(reference, torch.Tensor) or not isinstance(candidate, torch.Tensor):
        raise PrehabError("embedding_fidelity expects two tensors")
    if reference.dim() != 2 or reference.shape != candidate.shape:
        raise PrehabError(f"embedding_fidelity needs two [N, d] tensors of the same shape, got "
                          f"{tuple(reference.shape)} and {tuple(candidate.shape)}")
    n = reference.shape[0]
    if n < 2:
        raise PrehabError(f"embedding_fidelity needs at least 2 sentences, got {n}")
    ref = reference.detach().to("cpu", torch.float64)
    cand = candidate.detach().to("cpu", torch.float64)
    cos = F.cosine_similarity(ref, cand, dim=1, eps=1e-12)
    kk = max(1, min(int(k), n - 1))
    refn, candn = F.normalize(ref, dim=1), F.normalize(cand, dim=1)
    agree, hits = 0, 0
    for s in range(0, n, chunk):
        idx = torch.arange(s, min(s + chunk, n))
        sims = []
        for e in (refn, candn):
            sim = e[idx] @ e.T
            sim[torch.arange(len(idx)), idx] = -float("inf")  # exclude itself
            sims.append(sim.nan_to_num(nan=-float("inf")))
        top_r = sims[0].topk(kk, dim=1).indices
        top_c = sims[1].topk(kk, dim=1).indices
        agree += int((sims[0].argmax(1) == sims[1].argmax(1)).sum())
        hits += int((top_r.unsqueeze(2) == top_c.unsqueeze(1)).any(2).sum())
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()) if not torch.isnan(cos).any() else float("nan"),
        "nn_agreement": agree / n,
        "top5_recall": hits / (n * kk),
        "n": n,
    }


DEFAULT_PROMPT = "What is the capital of France?"


def generate_text(model, tokenizer, prompt: str = DEFAULT_PROMPT, *, max_new_tokens: int = 24,
                  chat: bool | None = None, device=None) -> str:
    """The greedy continuation of ``prompt`` (the new text only, special tokens removed).

    ``chat`` (default: when the tokenizer has a chat template) wraps the prompt as one user turn of
    the template with the assistant's turn opened, as an instruction-tuned model expects. Greedy
    decoding, so the result is deterministic for given weights.
    """
    if not hasattr(model, "generate"):
        raise PrehabError(f"{type(model).__name__} cannot generate text (not a causal LM)")
    device = _model_device(model, device)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    with torch.no_grad(), _EvalMode(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                             do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
