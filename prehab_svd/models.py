"""Finding what to compress in a model: the transformer blocks and the target linear layers.

Works on any ``nn.Module``. The block list is the ``nn.ModuleList`` holding the most ``nn.Linear``
layers (``model.layers`` of LLaMA/Mistral/Qwen2, ``encoder.layer`` of BERT, ``h`` of GPT-2-style
models, ...). Targets are the ``nn.Linear`` layers inside the blocks by default (attention and MLP
projections: never embeddings, and never the LM head, which lives outside the blocks), or those whose
full names match the caller's patterns. If a pattern selects a layer outside the blocks (say
``lm_head``), or the model has no block list, the whole model is treated as one block.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

from .errors import PrehabError

__all__ = ["Plan", "find_block_list", "plan_targets", "rank_for", "match_name"]


@dataclass
class Plan:
    """Where the targets are: ``stages`` is a list of (stage name, module, {full name: relative name})."""

    blocks_name: str | None  # dotted name of the ModuleList of blocks, or None (whole model = 1 stage)
    stages: list = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return [full for _, _, names in self.stages for full in names]


def _linear_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of transformer blocks: the one containing the most linear layers."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = _linear_count(module)
            if n > 0 and (best is None or n > best[2]):
                best = (name, module, n)
    return None if best is None else (best[0], best[1])


def match_name(name: str, patterns) -> bool:
    """A pattern matches a full module name as a glob (``*.q_proj``), or as a regular expression
    with ``re.fullmatch`` when it starts with ``re:``; a bare name also matches as the last
    component(s) of the dotted name (``q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or name == p or name.endswith("." + p):
            return True
    return False


def plan_targets(model: nn.Module, targets=None, exclude=None) -> Plan:
    """Decide the stages (blocks, processed in order) and the linear layers to compress in each."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = find_block_list(model)
    block_prefixes = []
    if found is not None:
        blocks_name, blocks = found
        block_prefixes = [f"{blocks_name}.{i}." if blocks_name else f"{i}." for i in range(len(blocks))]

    def in_blocks(name: str) -> bool:
        return any(name.startswith(p) for p in block_prefixes)

    if targets is None:
        chosen = [n for n in linears if in_blocks(n)]
        if not chosen:
            raise PrehabError(
                "found no linear layers inside transformer blocks to compress; pass targets "
                "(name patterns, e.g. targets=['*.fc1', '*.fc2']) to pick layers by name"
            )
    else:
        if isinstance(targets, str):
            targets = [targets]
        chosen = [n for n in linears if match_name(n, targets)]
        if not chosen:
            raise PrehabError(
                f"no nn.Linear layer matches targets={list(targets)!r}; the model's linear layers "
                f"are named like {list(linears)[:4]!r}"
            )
    if exclude:
        chosen = [n for n in chosen if not match_name(n, exclude)]
        if not chosen:
            raise PrehabError("every targeted layer is excluded; nothing left to compress")

    if found is not None and all(in_blocks(n) for n in chosen):
        blocks_name, blocks = found
        plan = Plan(blocks_name=blocks_name)
        for i, prefix in enumerate(block_prefixes):
            names = {n: n[len(prefix):] for n in chosen if n.startswith(prefix)}
            plan.stages.append((prefix.rstrip("."), blocks[i], names))
        return plan
    # Whole model as a single stage.
    return Plan(blocks_name=None, stages=[("<model>", model, {n: n for n in chosen})])


def rank_for(out_features: int, in_features: int, keep_ratio: float) -> int | None:
    """``floor(keep_ratio · m·n/(m+n))``, or None when that reaches the break-even rank
    ``m·n/(m+n)`` (the factored layer would be no smaller: keep it dense)."""
    m, n = out_features, in_features
    r = int(keep_ratio * m * n // (m + n))
    # guard against float rounding just under an integer
    if (r + 1) * (m + n) <= keep_ratio * m * n * (1 + 1e-12):
        r += 1
    if r * (m + n) >= m * n:
        return None
    return r
