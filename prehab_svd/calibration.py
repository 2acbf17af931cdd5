"""Calibration: batches, token masks, the stages' inputs, which layers share an input, and the
streaming statistics of each group; the phase timer. Used by every driver that runs a model over
calibration data: :func:`prehab_svd.compress`, :func:`prehab_svd.compress_pretrained` and Prehab's
whitening statistics.

A *stage* is one transformer block (or the whole model when its blocks do not simply feed each
other); a *group* is the set of a stage's target layers that receive the very same input tensor
(q/k/v, gate/up), which share one covariance.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import distributed as _dist
from . import ops
from .errors import NonFiniteActivationError, PrehabError
from .linalg import equilibrate

__all__ = ["LayerStats", "StopForward", "Timings", "as_batch", "token_mask", "select_tokens", "StageInput", "run_stage",
           "capture_block_inputs", "blocks_chain", "check_chain", "short_batch", "progress_bar", "GroupStats", "check_finite", "find_groups",
           "collect_group_input", "take_sequences", "eval_context"]


@dataclass
class LayerStats:
    """Normalized statistics of one layer input (float64).

    ``gram_x = xᵀx/N`` (original model), ``cross = xᵀx'/N`` and ``gram_xp = x'ᵀx'/N`` (compressed
    model's input x'); for single-stream methods x' = x and all three are the same tensor.
    ``abs_mean`` is mean |x| per input channel (ASVD).
    """

    gram_x: torch.Tensor
    cross: torch.Tensor
    gram_xp: torch.Tensor
    abs_mean: torch.Tensor | None
    tokens: int
    floor: float | None = None  # the statistics' rounding level (linalg.rounding_floor); None: float64

    def shrunk(self, alpha: float) -> "LayerStats":
        """The statistics shrunk toward their diagonals: ``A ← (1−α)·A + α·diag(A)`` for the grams and
        the cross term alike, so x' = x stays x' = x. The shrinkage target keeps every channel's own
        energy (and so the answer is unchanged by a per-channel rescaling of the inputs, unlike
        damping toward a multiple of I); it removes part of the correlations that a finite calibration
        set of one kind of text measures, which is what generalizes worst to other text. α = 0: the
        exact optimum on the calibration tokens; α = 1: a diagonal (ASVD-like, with exponent 1/2 of
        the second moment) scaling."""
        if not 0 <= alpha <= 1:
            raise PrehabError(f"shrinkage must be in [0, 1], got {alpha!r}")
        if alpha == 0:
            return self

        def shrink(A):
            return (1 - alpha) * A + alpha * torch.diag(torch.diagonal(A))

        gx = shrink(self.gram_x)
        same_c, same_p = self.cross is self.gram_x, self.gram_xp is self.gram_x
        return LayerStats(gx, gx if same_c else shrink(self.cross), gx if same_p else shrink(self.gram_xp),
                          self.abs_mean, self.tokens, self.floor)

    def oas_intensity(self) -> float:
        """The Oracle Approximating Shrinkage intensity (Chen, Wiesel, Eldar & Hero, 2010) of the
        equilibrated ``gram_xp`` toward its target (the identity there: each channel's own energy, the
        target of :meth:`shrunk`), from the statistics alone: with ``p`` live channels, ``n`` tokens,
        ``t = tr(Ĝ) = p`` and ``t₂ = tr(Ĝ²)``,
        ``ρ = min(1, ((1 − 2/p)·t₂ + t²) / ((n + 1 − 2/p)·(t₂ − t²/p)))``. It treats the tokens as
        independent draws, so for the correlated tokens of real text it is a lower bound on what
        would help; it is large only when the tokens are few for the width (``n`` ≲ ``p``)."""
        G = self.gram_xp.to(torch.float64)
        Gh, _, _ = equilibrate(0.5 * (G + G.T))
        p = Gh.shape[0]
        if p < 2 or self.tokens < 1:
            return 0.0
        t, t2 = float(p), float(Gh.square().sum())
        den = (self.tokens + 1 - 2 / p) * (t2 - t * t / p)
        if den <= 0:  # Ĝ = I exactly: nothing to shrink
            return 0.0
        return float(min(1.0, ((1 - 2 / p) * t2 + t * t) / den))


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


class Timings:
    """Seconds per phase of a compression, summed over blocks (``CompressionReport.timings``).

    ``capture``: running the model up to the first block; ``check``: the forward that checks the
    blocks chain; ``forward``: everything else a block does (its forwards, hooks) except
    ``covariance`` (the statistics updates) and ``factorize`` (finalizing the statistics in float64,
    the closed forms with their Cholesky / SVD, the error estimates);
    ``gradients``: zs-svd's task gradients; ``load`` / ``write``: reading blocks from disk and writing
    shards and checkpoints (streaming only). On CUDA every interval starts and ends with a
    synchronize, so asynchronous kernels are charged to the phase that launched them.
    """

    KEYS = ("capture", "check", "forward", "covariance", "factorize", "gradients", "load", "write")

    def __init__(self, device):
        self.totals = dict.fromkeys(self.KEYS, 0.0)
        self.device = torch.device(device) if device is not None else None
        self.cuda = self.device is not None and self.device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def __call__(self, key: str):
        t = self.now()
        try:
            yield
        finally:
            self.totals[key] += self.now() - t

    @contextmanager
    def rest(self, key: str, inner=("covariance", "factorize")):
        """Charge to ``key`` the time of the body minus what the body charged to ``inner``."""
        before = sum(self.totals[k] for k in inner)
        t = self.now()
        try:
            yield
        finally:
            self.totals[key] += self.now() - t - (sum(self.totals[k] for k in inner) - before)


# --------------------------------------------------------------------------------------------------
# Calibration inputs


def as_batch(item, device) -> dict:
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.long:
            raise PrehabError(
                f"calibration tensors must be token ids (torch.long), got {item.dtype}; pass dicts "
                "of model inputs for other inputs"
            )
        item = {"input_ids": item if item.dim() == 2 else item.unsqueeze(0)}
    elif not isinstance(item, dict):
        raise PrehabError(
            "each calibration batch must be a dict of model inputs or a LongTensor of token ids "
            f"[batch, tokens], got {type(item).__name__}"
        )
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in item.items()}


def token_mask(batch: dict):
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()
    return None


def select_tokens(x: torch.Tensor, mask) -> torch.Tensor:
    """Flatten x [..., d] to [tokens, d], dropping padded positions when the mask lines up."""
    d = x.shape[-1]
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask]
    return x.reshape(-1, d)


@dataclass
class StageInput:
    hidden: torch.Tensor | None  # None: the stage is the whole model, called as module(**kwargs)
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None


def run_stage(module: nn.Module, inp: StageInput, hidden=None):
    h = inp.hidden if hidden is None else hidden
    if h is None:
        return module(**inp.kwargs)
    out = module(h, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(model, first_block, batches, device, progress) -> list:
    """Run the model up to its first block on every batch; keep the block's call arguments."""
    captured = []
    current = {}

    def pre_hook(_module, args, kwargs):
        current["args"], current["kwargs"] = args, kwargs
        raise StopForward

    handle = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for item in progress_bar(batches, progress, "capturing block inputs"):
            batch = item
            current.clear()
            try:
                model(**batch)
            except StopForward:
                pass
            if "args" not in current:
                raise PrehabError("the model's forward never reached its first transformer block")
            args, kwargs = current["args"], dict(current["kwargs"])
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                hidden, rest = kwargs.pop(key), ()
            mask = token_mask(batch)
            if mask is not None and bool(mask.all()):
                mask = None  # nothing to drop: token selection is then a reshape, not a copy
            captured.append(StageInput(hidden.detach(), rest, kwargs, mask))
    finally:
        handle.remove()
    return captured


def blocks_chain(model, blocks, batch, stop_after_last: bool = False) -> bool:
    """True when, on ``batch``, each block runs once, in order, on the previous block's output.

    ``stop_after_last`` skips what follows the last block (the head: [batch, tokens, vocab] logits
    can outweigh a block)."""
    seen_in, seen_out = [], []
    handles = []
    n = len(blocks)
    for i, block in enumerate(blocks):
        def pre(_m, args, kwargs, i=i):
            h = args[0] if args else kwargs.get("hidden_states")
            seen_in.append((i, h))

        def post(_m, _args, output, i=i):
            seen_out.append((i, output[0] if isinstance(output, (tuple, list)) else output))
            if stop_after_last and i == n - 1:
                raise StopForward

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post))
    try:
        model(**batch)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if [i for i, _ in seen_in] != list(range(n)) or [i for i, _ in seen_out] != list(range(n)):
        return False
    for (_, out), (_, nxt) in zip(seen_out[:-1], seen_in[1:]):
        if not isinstance(out, torch.Tensor) or not isinstance(nxt, torch.Tensor):
            return False
        if out is not nxt and not (out.shape == nxt.shape and torch.equal(out, nxt)):
            return False
    return True


# The chain check's input: the first sequence, cut to this many tokens (the check is structural).
CHECK_TOKENS = 32


def short_batch(batch: dict, tokens: int = CHECK_TOKENS) -> dict:
    """The first sequence of ``batch``, cut to its first ``tokens`` positions: every tensor whose
    first two dimensions are those of ``input_ids`` is sliced on both (input ids, masks, position
    and token-type ids); anything else passes as is."""
    one = take_sequences(batch, 1)
    ids = one.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] <= tokens:
        return one
    lead = tuple(ids.shape)
    return {k: (v[:, :tokens] if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == lead
                else v) for k, v in one.items()}


def check_chain(model, blocks, batch) -> bool:
    """:func:`blocks_chain` on a short input (:func:`short_batch`: a few tokens of one sequence, the
    head skipped), which costs a sliver of a forward; when that input does not run or does not
    chain (a model that needs its full length), on the first full sequence."""
    try:
        if blocks_chain(model, blocks, short_batch(batch), stop_after_last=True):
            return True
    except Exception:  # noqa: BLE001 - any failure of the short input: decide on a full sequence
        pass
    return blocks_chain(model, blocks, take_sequences(batch, 1), stop_after_last=True)


def progress_bar(it, enabled, desc):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------------
# Statistics of the groups


class GroupStats:
    """Streaming statistics of one group's input (x: original model, xp: compressed model).

    ``xᵀx`` and ``xᵀx'`` come from one accumulator (one pass over x), ``x'ᵀx'`` from a second; all
    normalized by the token count when finalized.
    """

    def __init__(self, d: int, need_cross: bool, need_absmean: bool, dtype, device):
        # per-batch products in ``dtype``, running sums in float64 (order- and rank-independent)
        self.x = ops.CovarianceAccumulator(d, cross=need_cross, dtype=dtype, device=device)
        self.xp = ops.CovarianceAccumulator(d, dtype=dtype, device=device) if need_cross else None
        self.abs_sum = torch.zeros(d, dtype=torch.float64, device=device) if need_absmean else None

    @property
    def tokens(self) -> int:
        return self.x.tokens

    def add(self, x: torch.Tensor, xp: torch.Tensor | None = None):
        self.x.update(x, xp)
        if self.xp is not None:
            self.xp.update(xp)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0, dtype=self.abs_sum.dtype)

    def check_finite(self, name: str) -> None:
        """Raise :class:`NonFiniteActivationError` naming ``name`` (the group's first layer) when a
        sum is not finite (a NaN/Inf token, or squares beyond float32's range): checked once on the
        d² sums, not on every token of every batch."""
        sums = [self.x.gram(normalize=False)] + ([self.x.cross(normalize=False)] if self.x.has_cross else []) \
            + ([] if self.xp is None else [self.xp.gram(normalize=False)])
        for S, stream in zip(sums, ("original", "compressed", "compressed")):
            if not bool(torch.isfinite(S).all()):
                where = f" ({stream} stream)" if self.xp is not None else ""
                raise NonFiniteActivationError(
                    f"NaN or Inf in the input of layer '{name}'{where} during calibration (its statistics "
                    "are not finite); check the model's weights and dtype (fp16 overflow?) or the "
                    "calibration data, or accumulate in float64 (stats_dtype=torch.float64) if the "
                    "activations' squares overflow float32")

    def finalize(self, name: str = "") -> LayerStats:
        """The group's statistics in float64, normalized by the token count (summed over the ranks
        first, when distributed); :meth:`check_finite` first."""
        if _dist.is_distributed():
            self._all_reduce()
        if self.tokens == 0:
            raise PrehabError("calibration produced no tokens (every position masked?)")
        self.check_finite(name)
        g = self.x.gram().to(torch.float64)
        if self.xp is None:
            abs_mean = None if self.abs_sum is None else self.abs_sum / self.tokens
            return LayerStats(gram_x=g, cross=g, gram_xp=g, abs_mean=abs_mean,
                                       tokens=self.tokens, floor=self.x.noise_floor)
        return LayerStats(gram_x=g, cross=self.x.cross().to(torch.float64),
                                   gram_xp=self.xp.gram().to(torch.float64), abs_mean=None,
                                   tokens=self.tokens, floor=self.xp.noise_floor)

    def _all_reduce(self):
        """Sum the raw sums and token counts over the ranks (each saw its shard of the calibration),
        in the accumulator dtype, before anything is normalized."""
        self.x.tokens = _dist.all_reduce_count(
            self.x.tokens, same=[self.x.d, self.xp is not None, self.abs_sum is not None],
            what="a layer group's input width and statistics")
        _dist.all_reduce_sum(self.x.gram(normalize=False),
                             self.x.cross(normalize=False) if self.x.has_cross else None,
                             None if self.xp is None else self.xp.gram(normalize=False), self.abs_sum)
        # the noise floor decides the factor's rank: every rank must use the same one
        self.x.max_batch_tokens = _dist.all_reduce_max(self.x.max_batch_tokens)
        if self.xp is not None:
            self.xp.tokens = self.x.tokens
            self.xp.max_batch_tokens = self.x.max_batch_tokens


def check_finite(name: str, x: torch.Tensor, stream: str = ""):
    if not torch.isfinite(x).all():
        where = f" ({stream} stream)" if stream else ""
        raise NonFiniteActivationError(
            f"NaN or Inf in the input of layer '{name}'{where} during calibration; check the model's "
            "weights and dtype (fp16 overflow?) or the calibration data"
        )


def find_groups(module: nn.Module, names: dict, inp: StageInput) -> list:
    """Group the stage's target layers by the input tensor they receive, in forward order."""
    # Identity of the tensor object, not its data pointer: a freed activation's memory can be reused
    # by a later tensor of the same shape (o_proj's input may land where q/k/v's input was).
    seen = []  # list of (input tensor, [full names]); holding the tensor keeps it alive
    by_rel = {rel: full for full, rel in names.items()}
    handles = []

    def make_hook(full):
        def hook(_m, args):
            x = args[0]
            if any(full in members for _, members in seen):
                return  # a layer called twice keeps the group of its first call
            for t, members in seen:
                if t is x:
                    members.append(full)
                    return
            seen.append((x, [full]))
        return hook

    for rel, full in by_rel.items():
        handles.append(module.get_submodule(rel).register_forward_pre_hook(make_hook(full)))
    try:
        with torch.no_grad():
            run_stage(module, inp)
    finally:
        for h in handles:
            h.remove()
    groups = [members for _, members in seen]
    missing = set(names) - {n for g in groups for n in g}
    if missing:
        raise PrehabError(f"target layers never ran during calibration: {sorted(missing)}")
    return groups


def collect_group_input(module, names, group, inp, hidden):
    """Run ``module`` on one input up to ``group``'s first layer; return that layer's input, the tokens
    selected by the batch's mask (finiteness is checked on the sums, :meth:`GroupStats.check_finite`)."""
    got = {}

    def hook(_m, args):
        got["x"] = args[0]
        raise StopForward

    h = module.get_submodule(names[group[0]]).register_forward_pre_hook(hook)
    try:
        run_stage(module, inp, hidden)
    except StopForward:
        pass
    finally:
        h.remove()
    if "x" not in got:
        raise PrehabError(f"layer '{group[0]}' never ran in its block's forward")
    return select_tokens(got["x"], inp.mask)


def take_sequences(batch: dict, n: int) -> dict:
    """The first n sequences of a batch (tensors whose first dimension is the batch size)."""
    size = batch["input_ids"].shape[0] if "input_ids" in batch else None
    if size is None or n >= size:
        return batch
    return {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == size else v)
            for k, v in batch.items()}


@contextmanager
def eval_context(model: nn.Module):
    """Around every calibration loop: eval mode, the model's KV cache off (``config.use_cache``),
    no autograd; all restored afterwards."""
    was_training = model.training
    model.eval()
    cfg = getattr(model, "config", None)
    old_cache = getattr(cfg, "use_cache", None)
    if old_cache is not None:
        cfg.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        if old_cache is not None:
            cfg.use_cache = old_cache
        model.train(was_training)
