"""Running ``compress``, ``prehab`` and ``rehab`` on several processes with ``torch.distributed``.

Call the usual functions on every rank of an initialized default process group (NCCL on GPUs, gloo
on CPUs), each rank passing its own shard of the calibration / training batches; every rank gets the
same model back. Nothing changes without a process group, or with a world size of 1. A launch::

    torchrun --nproc_per_node 4 my_compress.py

    # my_compress.py
    import torch, torch.distributed as dist, prehab_svd
    dist.init_process_group("nccl")               # "gloo" on CPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    model = load_model().cuda()                   # the same weights on every rank
    report = prehab_svd.compress(model, "svd-llm", 0.6, calibration=batches[rank::world])
    if rank == 0:
        prehab_svd.save_compressed(model, "out/", report)
    dist.destroy_process_group()

What is distributed, and how:

* ``compress``: each rank runs its calibration shard through the blocks; a group's raw sums (``xᵀx``,
  ``xᵀx'``, ``x'ᵀx'``, ASVD's ``Σ|x|``) and its token count are summed with ``all_reduce`` in the
  accumulator dtype (fp32, or fp64 with ``stats_dtype=torch.float64``) and then normalized by the
  global token count. The layers of a block are factorized by their owners (the ``j``-th layer
  factorized in the run belongs to rank ``j % world``), whose factors ``U``, ``V`` and calibration
  errors are broadcast, so every rank installs the same ``LowRankLinear``. ``zs-svd`` sums the task
  gradients (weighted by sequence counts: the mean over the global sequences, taken in the order of
  the interleaved sharding ``batches[rank::world]``), has owners compute the whitened spectra, and
  selects the ranks on every rank from the same numbers. The result equals the single-process one on
  all the batches up to the summation order of the sums (rounding).
* ``prehab`` and ``rehab``: data-parallel training with
  :class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged over ranks). Prehab's
  calibration covariances are all-reduced; the rank regularizer of layer ``i`` is computed only on
  rank ``i % world`` and scaled by the world size, so that after DDP's averaging the update equals the
  single-process update on the global batch (when every rank's batch carries the same weight in the
  task loss, e.g. the same number of scored tokens). Logged numbers are global on every rank.
  ``prehab(..., parallel="fsdp")`` (or a model already sharded with FSDP2's ``fully_shard``) shards
  the parameters, gradients and optimizer state instead, for a model that does not fit one device;
  the regularizer is still computed per layer on its owner (:mod:`prehab_svd.fsdp`).

An error raised on one rank only (say, NaN activations in its shard) leaves the other ranks waiting in
their next collective until the process group's timeout; under ``torchrun`` the failed worker ends the
job. Where the check is cheap, errors are agreed on first so every rank raises
(:func:`raise_together`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .errors import PrehabError

__all__ = ["is_distributed", "rank", "world_size", "owner", "owns", "all_reduce_sum", "all_reduce_count",
           "all_reduce_floats", "all_true", "broadcast", "broadcast_from_owners", "all_gather_objects",
           "check_same", "raise_together", "LossModule", "data_parallel"]


def is_distributed() -> bool:
    """True when a default process group is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def owner(i: int) -> int:
    """The rank that computes item ``i`` (a layer, a factorization): ``i % world``."""
    return i % world_size()


def owns(i: int) -> bool:
    """True when this rank computes item ``i``."""
    return owner(i) == rank()


# --------------------------------------------------------------------------------------------------
# Devices: NCCL moves CUDA tensors only; gloo moves CPU (and CUDA) tensors.


def _backend_for(device_type: str) -> str | None:
    backend = str(dist.get_backend())
    if ":" not in backend:
        return backend
    pairs = dict(part.split(":", 1) for part in backend.split(","))  # "cpu:gloo,cuda:nccl"
    return pairs.get(device_type)


def _comm_device(device: torch.device) -> torch.device:
    """``device`` if the backend moves tensors there, else the device it does move (CUDA for NCCL)."""
    backend = _backend_for(device.type)
    if backend is None or (backend == "nccl" and device.type != "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _count_device() -> torch.device:
    return _comm_device(torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# Collectives (no-ops without a process group)


def all_reduce_sum(*tensors: torch.Tensor | None) -> None:
    """Sum each tensor over the ranks, in place, in its own dtype (None entries are skipped).

    The operations are issued together and then awaited, so large statistics overlap their transfers.
    Every rank ends with bitwise the same values.
    """
    if not is_distributed():
        return
    pending = []
    for t in tensors:
        if t is None:
            continue
        dev = _comm_device(t.device)
        if dev == t.device and t.is_contiguous():
            pending.append((None, t, dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)))
        else:
            buf = t.to(dev).contiguous()
            pending.append((t, buf, dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)))
    for target, buf, work in pending:
        work.wait()
        if target is not None:
            target.copy_(buf)


def all_reduce_count(n: int, *, same: Sequence[int] = (), what: str = "") -> int:
    """The sum over the ranks of a Python int (a token or sequence count).

    ``same``: a few ints that must be equal on every rank (checked in the same collective, as
    :func:`check_same` does; ``what`` names them in the error).
    """
    if not is_distributed():
        return int(n)
    if same:
        got = _all_gather_ints([int(n), *same])
        _check_equal([g[1:] for g in got], what)
        return sum(g[0] for g in got)
    t = torch.tensor([int(n)], dtype=torch.int64, device=_count_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def all_reduce_max(n: int) -> int:
    """The largest over the ranks of a Python int."""
    if not is_distributed():
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.int64, device=_count_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (a decision all ranks must share)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_count_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_reduce_floats(values: Sequence[float]) -> list:
    """The sums over the ranks of a few Python floats (fp64), e.g. logged losses."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_count_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _all_gather_ints(values: Sequence[int]) -> list:
    """``[values of rank 0, values of rank 1, ...]`` (every rank passes the same number of ints)."""
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_count_device())
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [o.cpu().tolist() for o in out]


def broadcast(tensors: Iterable[torch.Tensor], src: int) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s, in place (same shapes and dtypes on
    every rank)."""
    broadcast_from_owners([(src, list(tensors))])


def broadcast_from_owners(jobs: Sequence[tuple]) -> None:
    """``jobs``: ``[(src rank, [tensors]), ...]``, the same list (shapes, dtypes, order) on every rank;
    each tensor is overwritten in place by its ``src``'s. All transfers are issued, then awaited."""
    if not is_distributed():
        return
    pending = []
    for src, tensors in jobs:
        for t in tensors:
            dev = _comm_device(t.device)
            if dev == t.device and t.is_contiguous():
                pending.append((None, t, dist.broadcast(t, src=int(src), async_op=True)))
            else:
                buf = t.to(dev).contiguous()
                pending.append((t, buf, dist.broadcast(buf, src=int(src), async_op=True)))
    for target, buf, work in pending:
        work.wait()
        if target is not None:
            target.copy_(buf)


def compute_on_owners(first: int, shapes: Sequence[tuple], compute, *, what: str, names: Sequence[str]) -> list:
    """Per-layer work spread over the ranks: layer ``j`` of this call is the run's layer ``first + j``,
    computed by its owner (``owner(first + j)``) as ``compute(j) -> (before, after, U, V)`` (U, V None
    for a layer kept dense) and broadcast, so every rank returns the same list.

    ``shapes[j] = (out, in, rank or None, dtype, device)`` tells the other ranks what to receive. A
    failure on an owner is re-raised there after the broadcast (the others raise an error naming the
    layer and the rank), so no rank is left waiting; without a process group it is raised at once."""
    distributed = is_distributed()
    jobs, results, failure = [], [], None
    for j, (m, n, rank_, dtype, device) in enumerate(shapes):
        # [before, after, 1 if the owner failed]; U, V filled by the owner's broadcast
        info = torch.zeros(3, dtype=torch.float64, device=device)
        U = V = None
        if not owns(first + j):
            if rank_ is not None:
                U = torch.empty(m, rank_, dtype=dtype, device=device)
                V = torch.empty(rank_, n, dtype=dtype, device=device)
        else:
            try:
                before, after, U, V = compute(j)
                info = torch.tensor([before, after, 0.0], dtype=torch.float64, device=device)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others were told
                if not distributed:
                    raise
                failure = failure or e
                info[2] = 1.0
                if rank_ is not None:  # something to broadcast in the factors' place
                    U = torch.zeros(m, rank_, dtype=dtype, device=device)
                    V = torch.zeros(rank_, n, dtype=dtype, device=device)
        results.append((U, V, info))
        jobs.append((owner(first + j), [info] + ([] if U is None else [U, V])))
    broadcast_from_owners(jobs)
    if failure is not None:
        raise failure
    out = []
    for j, (U, V, info) in enumerate(results):
        before, after, failed = info.tolist()
        if failed:
            raise PrehabError(f"{what} '{names[j]}' failed on rank {owner(first + j)}; see the error raised there")
        out.append((before, after, U, V))
    return out


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same(values: Sequence[int], what: str) -> None:
    """Raise :class:`PrehabError` on every rank when the ranks disagree on ``values`` (a few ints
    that must be equal everywhere, e.g. a layer input's width), instead of a mismatched collective."""
    if not is_distributed():
        return
    _check_equal(_all_gather_ints(values), what)


def _check_equal(got: list, what: str) -> None:
    if any(g != got[0] for g in got):
        raise PrehabError(
            f"the ranks disagree on {what}: {got} (rank order); every rank must run the same model "
            "with the same options, on batches of the same structure")


def raise_together(error: BaseException | None, what: str) -> None:
    """Agree on a failure: re-raise ``error`` where it happened and raise :class:`PrehabError` on the
    other ranks, so no rank is left waiting in a collective. Without an error anywhere, return."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    flags = _all_gather_ints([0 if error is None else 1])
    if error is not None:
        raise error
    failed = [r for r, (f,) in enumerate(flags) if f]
    if failed:
        raise PrehabError(f"{what} failed on rank(s) {failed}; see the error raised there")


# --------------------------------------------------------------------------------------------------
# Training


class LossModule(nn.Module):
    """``forward(*args) = fn(model, *args)``: the whole loss as one module call.

    DDP synchronizes the gradients of what its wrapped module's ``forward`` computes; wrapping the
    loss (task loss, several model calls, the regularizer) rather than the model lets the task
    functions receive the plain model (its ``config``, its forward signature), and lets DDP see
    every use of the parameters within the one forward it synchronizes.
    """

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, *args, **kwargs):
        return self._fn(self.model, *args, **kwargs)


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` when distributed
    (``module`` itself otherwise). Construction broadcasts rank 0's parameters and buffers, so every
    rank starts from the same weights (e.g. randomly initialized LoRA adapters).

    ``static_graph=True``: the parameters a step uses are found in the first step (a task loss need
    not touch every trainable parameter, e.g. BERT's pooler) and assumed the same in every later
    step, as they are for a fixed model and task loss.
    """
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in module.parameters()):
        raise PrehabError("nothing to train: no parameter of the model requires a gradient")
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    elif _backend_for(device.type) == "nccl":
        raise PrehabError(f"the model is on {device} but the process group's backend is NCCL, which "
                          "moves CUDA tensors only; put the model on this rank's GPU, or use gloo")
    return DistributedDataParallel(module, static_graph=True, **kwargs)
