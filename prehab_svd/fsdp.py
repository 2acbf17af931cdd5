"""FSDP2 for Prehab and rehab: train a model whose parameters are sharded over the ranks (``fully_shard``).

``prehab(model, ..., parallel="fsdp")`` on every rank of an initialized default process group trains
the model with its parameters, gradients and optimizer state sharded over the ranks (PyTorch's FSDP2,
:func:`torch.distributed.fsdp.fully_shard`), for a model that does not fit one device with an
optimizer. The model may come in

* already sharded by the caller (every parameter a ``DTensor`` on a 1-D mesh over all the ranks; the
  caller chooses the devices, mixed precision, offload, wrapping): used as it is; ``parallel="auto"``
  (the default) picks FSDP for such a model;
* whole on every rank: :func:`shard` applies ``fully_shard`` to each transformer block and then to
  the root, on a 1-D mesh of all the ranks, in place.

Either way the model stays sharded afterwards (FSDP2 has no public way back). To compress it, gather
its whole state dict on rank 0 (on the CPU) with :func:`full_state_dict` and save it::

    state = prehab_svd.fsdp.full_state_dict(model)     # every rank calls it; rank 0 gets the tensors
    if dist.get_rank() == 0:
        with torch.device("meta"):                     # a skeleton of the class, without weights
            skeleton = AutoModelForCausalLM.from_config(model.config)
        skeleton.save_pretrained("prehabbed/", state_dict=state)

then compress from disk one block at a time (:func:`prehab_svd.compress_pretrained`, one process),
or load it whole on each rank and call ``compress`` there. ``rehab(..., parallel="fsdp")`` shards a
compressed model the same way (see :func:`prehab_svd.rehab`); :func:`full_state_dict` gives
its layers their ``LowRankLinear`` names back.

The rank regularizer of layer ``i`` is computed once, on its owner ``i % world``: every step each
target weight is gathered whole (``DTensor.full_tensor()``, an all-gather, one layer at a time; the
owner keeps its own layers' weights), the owner computes the regularizer and its gradient, and the
gradient is scattered back from the owner into the layer's gradient shards
(``distribute_tensor(..., src_data_rank=owner)``) after FSDP's own reduce-scatter of the task
gradients. The ``"tail"`` surrogate's proximal step and the ``"compressed"`` surrogate's projected
weights travel the same way (gather to the owner, compute there, scatter the shards). The layers
are visited in rounds of :data:`GATHER_LAYERS_PER_RANK` per rank (:func:`rounds`): beyond its shards,
a rank holds at most that many whole weights and their gradients at a time and, for
``"compressed"``, the projections ``U_r`` of all its layers (``out × r`` each) through the backward
pass. The calibration covariances are accumulated one block per pass over the calibration batches
(``prehab(stats_blocks=...)``), so they are not whole either.

Cost per step, beyond FSDP's own all-gathers and reduce-scatter: one more all-gather of every target
weight (every rank receives it, only the owner keeps it) and one scatter of its regularizer gradient
from the owner; ``"compressed"`` adds a second forward and backward pass and a gather and scatter of
the projected layers' gradients. Tested with gloo on the CPU; NCCL on GPUs has not run yet.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from . import distributed as _dist
from .errors import PrehabError
from .models import find_block_list

__all__ = ["is_sharded", "shard", "reshard", "check_sharding", "rounds", "gather_to_owners", "scatter_from_owners",
           "local_copies", "restore_local", "merge_lora_shards", "full_state_dict"]


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is a ``DTensor`` (sharded with FSDP2 or another
    ``torch.distributed.tensor`` scheme)."""
    if not dist.is_available():
        return False
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) for p in model.parameters())


def shard(model: nn.Module, device: torch.device, *, frozen: bool = False) -> None:
    """``fully_shard`` each transformer block of ``model`` and then ``model`` itself (the embeddings,
    the final norm and the head), on a 1-D mesh of every rank of the default process group, in
    place. Each block is then one all-gather in the forward and one reduce-scatter in the backward.
    LowRankLinear factors are stored contiguously first (``fully_shard`` refuses the padded row
    strides they use for aligned kernel loads; see :func:`prehab_svd.layers.unpad`).

    ``frozen``: the model only runs forward passes under no_grad (a distillation reference), so the
    root's parameters are returned to their shards after each forward as well (FSDP2 keeps a root's
    whole for the backward pass that follows by default; there is none here)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .layers import unpad

    if device.type == "meta":
        raise PrehabError("the model is on the meta device: materialize its weights first")
    mesh = init_device_mesh(device.type, (_dist.world_size(),))
    unpad(model)
    found = find_block_list(model)
    for block in (found[1] if found is not None else []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True if frozen else None)


def reshard(model: nn.Module) -> None:
    """Return every FSDP module's parameters to their shards. FSDP2 leaves the root module's
    parameters whole after a forward pass (``reshard_after_forward`` is False for the root: the
    backward pass would gather them again at once), e.g. after a calibration pass under no_grad."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def check_sharding(model: nn.Module, names: Iterable[str]) -> None:
    """Every parameter of ``model`` sharded, and the targets' weights on a 1-D mesh of all the ranks
    (the layers are owned by global rank ``i % world``), or a :class:`PrehabError` saying so."""
    reshard(model)
    dtensor = _dtensor_type()
    plain = [n for n, p in model.named_parameters() if not isinstance(p, dtensor)]
    if plain:
        raise PrehabError(
            f"parallel='fsdp' with a partly sharded model: {len(plain)} parameters are not DTensors "
            f"(first: {plain[0]!r}); apply fully_shard to the root module too, or pass the model "
            "unsharded and let prehab shard it")
    world = _dist.world_size()
    for n in names:
        mesh = model.get_submodule(n).weight.device_mesh
        if mesh.ndim != 1 or mesh.size() != world:
            raise PrehabError(
                f"parallel='fsdp' needs the target weights on a 1-D mesh of all {world} ranks; "
                f"{n}.weight is on a mesh of shape {tuple(mesh.shape)} (HSDP and tensor parallelism "
                "are not supported)")


GATHER_LAYERS_PER_RANK = 4


def rounds(names: list, world: int, per_rank: int | None = None) -> list:
    """``names`` cut into runs of ``world · per_rank`` consecutive layers (default per_rank:
    :data:`GATHER_LAYERS_PER_RANK`): with layer ``i`` owned by rank ``i % world``, each run gives
    every rank ``per_rank`` layers to gather whole, so a rank holds that many whole weights (and
    their gradients) at a time, not all of its layers'."""
    step = max(1, world * (GATHER_LAYERS_PER_RANK if per_rank is None else per_rank))
    return [names[i:i + step] for i in range(0, len(names), step)]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


@torch.no_grad()
def gather_to_owners(model: nn.Module, names: list, owner_of: dict, *, of: str = "weight") -> dict:
    """``{name: whole weight}`` (``of="grad"``: whole gradient) for the layers of ``names`` this rank
    owns: detached plain tensors, one all-gather per layer on every rank, in the order of ``names``."""
    me = _dist.rank()
    reshard(model)
    out = {}
    for n in names:
        p = _weight(model, n)
        t = p if of == "weight" else p.grad
        if t is None:
            raise PrehabError(f"{n}.weight has no gradient after the backward pass; a target layer "
                              "must take part in the task loss")
        full = t.full_tensor()
        if owner_of[n] == me:
            out[n] = full
        del full
    return out


@torch.no_grad()
def scatter_from_owners(model: nn.Module, names: list, owner_of: dict, values: dict, *, into: str,
                        add: bool = False) -> None:
    """For each layer of ``names`` (in order, on every rank), scatter its owner's whole tensor
    ``values[name]`` over the shards of the layer's weight (``into="weight"``) or gradient
    (``into="grad"``): overwrite them, or with ``add`` add to them (a missing gradient is set).
    A rank passes ``values`` for the layers it owns only."""
    from torch.distributed.tensor import distribute_tensor

    if into not in ("weight", "grad"):
        raise ValueError(into)
    reshard(model)
    for n in names:
        p = _weight(model, n)
        src = owner_of[n]
        full = values.get(n)
        if full is None:  # not the owner: the receive side of the scatter
            full = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)
        part = distribute_tensor(full.to(p.dtype).contiguous(), p.device_mesh, p.placements,
                                 src_data_rank=src)
        if into == "weight":
            p.copy_(part)
        elif p.grad is None:
            p.grad = part
        elif add:
            p.grad.add_(part)
        else:
            p.grad.copy_(part)


def local_copies(tensors: dict) -> dict:
    """``{name: clone of the local shard}`` of DTensors."""
    return {n: t.to_local().detach().clone() for n, t in tensors.items()}


@torch.no_grad()
def restore_local(tensors: dict, saved: dict) -> None:
    """Write back the local shards saved by :func:`local_copies`."""
    for n, t in tensors.items():
        t.to_local().copy_(saved[n])


@torch.no_grad()
def merge_lora_shards(peft_model: nn.Module, adapter: str = "default") -> None:
    """Merge every LoRA adapter of a sharded ``peft`` model into its base weight's shards, in place:
    ``W += scaling · B A`` computed on each rank for its own rows only (``W`` and ``B`` share the
    row split; ``A``, rank × in, is gathered whole). The factors are never gathered."""
    from peft.tuners.lora import LoraLayer

    dtensor = _dtensor_type()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        W = module.get_base_layer().weight
        A = module.lora_A[adapter].weight
        B = module.lora_B[adapter].weight
        if not (isinstance(W, dtensor) and isinstance(B, dtensor)) or W.placements != B.placements \
                or W.device_mesh != B.device_mesh or any(not pl.is_shard(0) for pl in W.placements):
            raise PrehabError(f"{name}: the base weight and lora_B must both be sharded by rows on one "
                              "mesh to merge in place")
        A_full = A.full_tensor() if isinstance(A, dtensor) else A
        B_local, W_local = B.to_local(), W.to_local()
        delta = (B_local.float() @ A_full.float()) * module.scaling[adapter]
        W_local.add_(delta.to(W_local.dtype))


def full_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict:
    """The whole state dict of a sharded model, on the CPU: on rank 0 only (``rank0_only``, the
    others get ``{}``) or on every rank. The layers that :func:`prehab_svd.rehab` leaves as
    ``down``/``up`` pairs come back under the ``LowRankLinear`` names (``V``, ``U``, ``bias``), so
    the dict loads into a compressed skeleton (:func:`prehab_svd.io.apply_ranks`) for
    :func:`prehab_svd.save_compressed`. A collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .layers import FactorPair

    reshard(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))
    pairs = [n for n, m in model.named_modules() if isinstance(m, FactorPair)]
    rename = {}
    for n in pairs:
        rename.update({f"{n}.down.weight": f"{n}.V", f"{n}.up.weight": f"{n}.U", f"{n}.up.bias": f"{n}.bias"})
    return {rename.get(k, k): v.detach().cpu() for k, v in state.items()}
