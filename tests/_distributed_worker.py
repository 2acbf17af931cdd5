"""Run by test_distributed.py under torchrun (2 gloo ranks on the CPU), and in-process for the
single-process reference: compress (several methods), one Prehab run and one rehab run of tiny
Llamas, each rank passing its shard of the batches.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 _distributed_worker.py OUT
writes OUT/rank{r}.pt (torch.save of plain dicts and tensors).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_model, token_batches  # noqa: E402
from prehab_svd.training.surrogates import CompressedTask  # noqa: E402

SHAPE = dict(layers=2, hidden=64, intermediate=128)
ODD = dict(layers=2, hidden=40, intermediate=75)
F64 = {"stats_dtype": torch.float64}
F32 = {"stats_dtype": torch.float32}  # fp32 per-batch products (the default; float64 sums)
# (name, method, keyword arguments): what is compared
COMPRESS = [
    ("svd-llm", "svd-llm", {}),
    ("asvd", "asvd", {}),
    ("aa-svd-fp32", "aa-svd", F32),
    ("svd-llm-fp64", "svd-llm", F64),
    ("aa-svd", "aa-svd", F64),
    ("zs-svd", "zs-svd", {"correction": True, "correction_grads": 2, **F64}),
]
KEEP = 0.5
# issue 15's case: aa-svd with default options on a GQA Llama, 384 calibration tokens, compared by logits
ORDER_SHAPE = dict(layers=2, hidden=64, intermediate=120)


def order_calibration():
    return token_batches(n=8, batch=2, tokens=24, seed=1)


def probe_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**token_batches(n=1, batch=2, tokens=24, seed=7)[0]).logits.double()
PREHAB = dict(steps=2, lam=2.0, warmup_steps=0, optimizer="sgd", lr=0.05, grad_clip=0.5)
REHAB = dict(steps=2, lr=1e-2, lora_rank=2)


def calibration():
    """4 batches of 2 sequences; the last has a padded tail, so the ranks' token counts differ."""
    return token_batches(n=4, batch=2, tokens=24, seed=1, pad_last=5)


def training(parts: int = 1, part: int = 0):
    """2 global batches of 4 sequences (no padding: every rank's share of the loss weighs the same);
    ``part`` of ``parts``: that slice of every batch's sequences, as one rank of ``parts`` gets."""
    out = []
    for b in token_batches(n=2, batch=4, tokens=16, seed=2):
        k = 4 // parts
        out.append({key: v[part * k:(part + 1) * k] for key, v in b.items()})
    return out


def _state(model) -> dict:
    """A copy of the state dict (rehab changes the factors in place afterwards)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def recipe(rank: int = 0, world: int = 1, out_dir: str | None = None) -> dict:
    """Everything compared, on this rank's shard (``world == 1``: all the data)."""
    from prehab_svd import compress
    from prehab_svd import rehab

    shard = calibration()[rank::world]
    out = {}
    for name, method, kwargs in COMPRESS:
        model = tiny_model("llama", **SHAPE)
        report = compress(model, method, KEEP, shard, **kwargs)
        out[name] = {"state": _state(model), "report": report.to_dict()}
        if name == "svd-llm":
            torch.manual_seed(123)  # the adapters' random init (rank 0's, broadcast by DDP)
            rep = rehab(model, training(world, rank), **REHAB)
            out["rehab"] = {"state": _state(model), "report": rep.to_dict()}
    model = tiny_model("llama", **ORDER_SHAPE)
    report = compress(model, "aa-svd", KEEP, order_calibration()[rank::world])
    out["aa-svd-default"] = {"state": _state(model), "report": report.to_dict(), "logits": probe_logits(model)}
    model = tiny_model("llama", **ORDER_SHAPE)  # float64 per-batch products
    report = compress(model, "aa-svd", KEEP, order_calibration()[rank::world], **F64)
    out["aa-svd-f64-products"] = {"state": _state(model), "report": report.to_dict(), "logits": probe_logits(model)}
    if world > 1:  # rehab with FSDP2: the compressed model sharded after the adapters are attached
        from prehab_svd import fsdp

        model = tiny_model("llama", **SHAPE)
        compress(model, "svd-llm", KEEP, shard)
        torch.manual_seed(123 if rank == 0 else 1000)  # rank 1 draws other adapters: rank 0's must win
        rep = rehab(model, training(world, rank), parallel="fsdp", **REHAB)
        out["fsdp-rehab"] = {"state": fsdp.full_state_dict(model, rank0_only=False),
                             "rank0_only": fsdp.full_state_dict(model), "report": rep.to_dict()}
    out["prehab"] = prehab_run(rank, world)
    out["prehab-tail"] = prehab_run(rank, world, lam=0.3, surrogate="tail", keep_ratio=KEEP)
    # the exact projector on whole batches (what FSDP runs), and the tracked one (the default, but on
    # whole batches: a split of each rank's shard is not a split of the single process's batch)
    # (cross-entropy named: the default task with this surrogate, distillation, starts at loss 0,
    # where the comparison would be of fp32 noise; the encoder runs below cover distillation)
    out["prehab-compressed"] = prehab_run(rank, world, lam=1.0, keep_ratio=KEEP, task="causal_lm",
                                          surrogate=CompressedTask(track=False, split=False))
    out["prehab-compressed-tracked"] = prehab_run(rank, world, lam=1.0, keep_ratio=KEEP, task="causal_lm",
                                                  surrogate=CompressedTask(track=True, split=False))
    out["prehab-nuclear"] = prehab_run(rank, world, lam=1.0, surrogate="nuclear")
    if world > 1:  # FSDP2: the same runs with the parameters sharded over the ranks
        saved = os.path.join(out_dir, "fsdp-prehabbed") if out_dir else None
        out["fsdp"] = prehab_run(rank, world, parallel="fsdp", save_to=saved)
        out["fsdp"]["saved"] = saved
        out["fsdp-tail"] = prehab_run(rank, world, lam=0.3, surrogate="tail", keep_ratio=KEEP,
                                      parallel="fsdp")
        out["fsdp-compressed"] = prehab_run(rank, world, lam=1.0, surrogate=CompressedTask(track=False, split=False),
                                            keep_ratio=KEEP, parallel="fsdp", task="causal_lm")
        # sharded by the caller (each block, then the root), found by parallel="auto"
        out["fsdp-nuclear-presharded"] = prehab_run(rank, world, lam=1.0, surrogate="nuclear",
                                                    preshard=True)
    # a causal LM distilling to the original (the default task of the compressed surrogate), with
    # what FSDP runs: the exact projector on whole batches
    out["prehab-distill"] = prehab_run(rank, world, lam=1.0, keep_ratio=KEEP,
                                       surrogate=CompressedTask(track=False, split=False))
    if world > 1:
        out["fsdp-distill"] = prehab_run(rank, world, lam=1.0, keep_ratio=KEEP, parallel="fsdp",
                                         surrogate=CompressedTask(track=False, split=False))
    # an odd width: FSDP splits gate/up's 75 rows as 38 + 37 (the same model in one process too)
    out["prehab-odd"] = prehab_run(rank, world, shape=ODD)
    # an encoder distilling to a copy of itself taken before sharding
    out["prehab-bert"] = prehab_run(rank, world, kind="bert", lam=1.0)
    if world > 1:
        out["fsdp-odd"] = prehab_run(rank, world, shape=ODD, parallel="fsdp")
        out["fsdp-bert"] = prehab_run(rank, world, kind="bert", lam=1.0, parallel="fsdp")
    return out


def prehab_run(rank: int = 0, world: int = 1, lam: float = PREHAB["lam"], preshard: bool = False,
               shape: dict = SHAPE, save_to: str | None = None, kind: str = "llama", **kw) -> dict:
    from prehab_svd import fsdp
    from prehab_svd import prehab

    model = tiny_model(kind, **shape)
    if preshard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    losses = []  # the task loss prehab builds (a distillation holds its reference)
    with _capture_task(losses):
        rep = prehab(model, calibration()[rank::world], training(world, rank), **{**PREHAB, "lam": lam, **kw})
    out = {"report": rep.to_dict()}
    if fsdp.is_sharded(model):
        # what a rank holds: the rows of its shard of every weight
        out["local_rows"] = {n: p.to_local().shape[0] for n, p in model.named_parameters() if p.dim() == 2}
        reference = getattr(losses[0], "reference", None) if losses else None
        if reference is not None:  # the distillation's frozen original: sharded as well
            out["reference_local_rows"] = {
                n: (p.to_local().shape[0] if fsdp.is_sharded(reference) else -1)
                for n, p in reference.named_parameters() if p.dim() == 2}
        out["state"] = fsdp.full_state_dict(model, rank0_only=False)
        if save_to is not None:  # rank 0 writes the whole model, as a caller would before compressing
            state = fsdp.full_state_dict(model)
            if rank == 0:  # a skeleton on the meta device holds no weights (README's recipe)
                import transformers

                with torch.device("meta"):
                    skeleton = transformers.AutoModelForCausalLM.from_config(model.config)
                skeleton.save_pretrained(save_to, state_dict=state)
    else:
        out["state"] = _state(model)
    return out


class _capture_task:
    """Within the block, record every task loss prehab resolves by name (in ``into``)."""

    def __init__(self, into: list):
        self.into = into

    def __enter__(self):
        import prehab_svd.training.prehab as prehab_module

        self.module, self.original = prehab_module, prehab_module.default_task

        def resolved(*args, **kwargs):
            loss = self.original(*args, **kwargs)
            self.into.append(loss)
            return loss

        prehab_module.default_task = resolved

    def __exit__(self, *exc):
        self.module.default_task = self.original


def errors(rank: int) -> dict:
    """Messages of the errors every rank must raise when rank 1 alone has bad input (no rank may be
    left waiting in a collective)."""
    from prehab_svd import PrehabError, compress

    out = {}
    mine = calibration()[rank::2]
    for name, run in {
        "compress, rank 1 without calibration":
            lambda: compress(tiny_model("llama", **SHAPE), "svd-llm", KEEP, mine if rank == 0 else []),
        "zs-svd, a non-finite task loss on rank 1":
            lambda: compress(tiny_model("llama", **SHAPE), "zs-svd", KEEP, mine,
                             task=lambda m, b: torch.tensor(float("nan") if rank == 1 else 1.0,
                                                            requires_grad=True)),
        "svd-llm, a factorization fails on rank 1": lambda: _failing_factorization(rank, mine),
        "prehab, a sharded model with parallel='ddp'": lambda: _sharded_prehab(rank, "ddp", root=True),
        "prehab, the blocks sharded but not the root": lambda: _sharded_prehab(rank, "auto", root=False),
        "rehab, a sharded compressed model": lambda: _sharded_rehab(rank),
        "prehab, a caller-sharded encoder distilling to itself": lambda: _sharded_encoder(rank),
    }.items():
        try:
            run()
            out[name] = "no error"
        except PrehabError as e:
            out[name] = str(e)
    return out


def _sharded_prehab(rank, parallel, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prehab_svd import prehab

    model = tiny_model("llama", **SHAPE)
    mesh = init_device_mesh("cpu", (2,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    if root:
        fully_shard(model, mesh=mesh)
    prehab(model, calibration()[rank::2], training(2, rank), parallel=parallel, **PREHAB)


def _sharded_encoder(rank):
    from prehab_svd import fsdp
    from prehab_svd import prehab

    model = tiny_model("bert")
    fsdp.shard(model, torch.device("cpu"))
    prehab(model, calibration()[rank::2], training(2, rank), **PREHAB)


def _sharded_rehab(rank):
    from prehab_svd import compress, fsdp
    from prehab_svd import rehab

    model = tiny_model("llama", **SHAPE)
    compress(model, "svd-llm", KEEP, calibration()[rank::2])
    fsdp.shard(model, torch.device("cpu"))
    rehab(model, training(2, rank), parallel="fsdp", **REHAB)


def _failing_factorization(rank, batches):
    from prehab_svd import PrehabError, compress, methods

    cls = methods.get("svd-llm")
    original = cls.factorize

    def factorize(*args, **kwargs):
        if rank == 1:
            raise PrehabError("injected failure")
        return original(*args, **kwargs)

    cls.factorize = factorize
    try:
        compress(tiny_model("llama", **SHAPE), "svd-llm", KEEP, batches)
    finally:
        cls.factorize = original


def main(out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        results = recipe(rank, world, out_dir)
        results["errors"] = errors(rank)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(results, path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
