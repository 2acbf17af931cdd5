"""The anchored two-stream pass: every block forward runs once per batch and stream, its group inputs
equal those of restarting the block for each group, and an error leaves no paused forward behind."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from prehab_svd import NonFiniteActivationError, compress
from prehab_svd.anchored import AnchoredPass, _Slot
from prehab_svd.calibration import capture_block_inputs, collect_group_input, eval_context, find_groups
from prehab_svd.models import plan_targets
from prehab_svd.utils import set_submodule


def _block_setup(model, batches, index=0):
    plan = plan_targets(model)
    _, module, names = plan.stages[index]
    inputs = capture_block_inputs(model, plan.stages[0][1], batches, "cpu", False)
    groups = find_groups(module, names, inputs[0])
    return module, names, groups, inputs


def _perturb(module, names, group, scale):
    """Stand-in for a factorization: replace the group's layers by scaled copies."""
    for full in group:
        lin = module.get_submodule(names[full])
        new = copy.deepcopy(lin)
        with torch.no_grad():
            new.weight.mul_(scale)
        set_submodule(module, names[full], new)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_paused_streams_match_restarted_streams(make_model, make_batches, kind):
    """Group by group, the inputs handed over by the paused forwards are bit for bit those of running
    the block from its input again (the old way), in both streams, with each group replaced before the
    next one is gathered; and so are the block's outputs."""
    model = make_model(kind)
    batches = make_batches(n=3, pad_last=5)
    with eval_context(model):
        module, names, groups, inputs = _block_setup(model, batches)
        shifted = [inp.hidden * 1.01 for inp in inputs]  # a compressed stream that differs
        ref_module, ref_original = copy.deepcopy(module), copy.deepcopy(module)
        original = copy.deepcopy(module)
        got, want = [], []
        with AnchoredPass(original, module, names, groups, inputs, shifted) as p:
            for gi, g in enumerate(groups):
                got.append(list(p.inputs(gi)))
                with p.installing(gi):
                    _perturb(module, names, g, 0.5 + 0.1 * gi)
            outs, outs_shifted = p.outputs()
        for gi, g in enumerate(groups):
            want.append([(collect_group_input(ref_original, names, g, inp, inp.hidden),
                          collect_group_input(ref_module, names, g, inp, hp))
                         for inp, hp in zip(inputs, shifted)])
            _perturb(ref_module, names, g, 0.5 + 0.1 * gi)
        assert len(got) == len(want) == len(groups) >= 3
        for a, b in zip(got, want):
            assert len(a) == len(b) == len(batches)
            for (x, xp), (rx, rxp) in zip(a, b):
                assert torch.equal(x, rx) and torch.equal(xp, rxp)
        from prehab_svd.calibration import run_stage
        for inp, hp, o, os_ in zip(inputs, shifted, outs, outs_shifted):
            assert torch.equal(o, run_stage(ref_original, inp))
            assert torch.equal(os_, run_stage(ref_module, inp, hp))
        # the stand-ins are gone: the block holds the installed layers themselves
        assert not any(isinstance(m, _Slot) for m in module.modules())
        for g in groups:
            assert type(module.get_submodule(names[g[0]])) is torch.nn.Linear


def test_aa_svd_runs_each_block_forward_once_per_stream(make_model, make_batches):
    """aa-svd with pause_forwards: one forward per batch, stream and block (plus the chain check on a
    short input and the one forward per kind of block that finds the groups); by default each group
    restarts the block in both streams."""
    model = make_model("llama", layers=3)
    batches = make_batches(n=4)
    calls = []
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    compress(model, "aa-svd", 0.6, batches, pause_forwards=True)
    blocks = len(model.model.layers)
    check, groups = blocks, 1
    assert len(calls) == check + groups + 2 * len(batches) * blocks
    for i in range(blocks):
        assert calls.count(i) == 1 + 2 * len(batches) + (i == 0)


def test_error_in_a_paused_stream_unwinds_every_forward(make_model, make_batches):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    before = threading.active_count()
    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        compress(model, "aa-svd", 0.5, make_batches(), exclude=["o_proj"], pause_forwards=True)
    assert threading.active_count() == before
    assert not any(isinstance(m, _Slot) for m in model.modules())


def test_an_exception_inside_a_forward_reaches_the_caller(make_model, make_batches):
    model = make_model("llama")
    batches = make_batches(n=2)

    def boom(_m, _a):
        raise RuntimeError("boom in the MLP")

    with eval_context(model):
        module, names, groups, inputs = _block_setup(model, batches)
        before = threading.active_count()
        module.mlp.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom in the MLP"):
            with AnchoredPass(copy.deepcopy(module), module, names, groups, inputs,
                              [i.hidden for i in inputs]) as p:
                for gi in range(len(groups)):
                    list(p.inputs(gi))
        assert threading.active_count() == before


@pytest.mark.parametrize("kind", ["llama", "qwen2", "bert"])
def test_paused_and_restarted_compressions_are_identical(make_model, make_batches, kind):
    """The two ways of running aa-svd's streams give the same model, bit for bit."""
    batches = make_batches(n=3, pad_last=4)
    a, b = make_model(kind), make_model(kind)
    ra = compress(a, "aa-svd", 0.6, batches)
    rb = compress(b, "aa-svd", 0.6, batches, pause_forwards=True)
    assert [la.rank for la in ra.layers] == [lb.rank for lb in rb.layers]
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_pause_forwards_is_checked(make_model, make_batches):
    from prehab_svd import PrehabError

    with pytest.raises(PrehabError, match="pause_forwards must be True or False"):
        compress(make_model("llama"), "aa-svd", 0.6, make_batches(), pause_forwards="yes")
