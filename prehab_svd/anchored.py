"""The two streams of an anchored method (AA-SVD) through one block, gathered group by group.

A group's statistics need its input in *both* streams for *every* calibration batch before the group
can be factorized, and the compressed stream's input of a later group depends on that factorization
(``o_proj`` sees what the compressed q/k/v produce). Two ways, one interface (``inputs(gi)``,
``installing(gi)``, ``outputs()``):

* :class:`RestartedStreams` (the default): for each group, run the block again from its input, in
  both streams, up to the group's first layer; one batch's activations are alive at a time, at about
  3 block forwards per stream on a Llama block.
* :class:`AnchoredPass` (``compress(..., pause_forwards=True)``): every forward (one per batch and
  stream) runs once, in its own thread used as a coroutine: it pauses at the first layer of each
  group, hands over that layer's input, and resumes once the group is compressed; the compressed
  stream then goes on through the new low-rank layers. Only one thread runs at a time (the driver
  resumes them one by one and waits), so there is no contention and the order of every operation is
  that of a plain loop. Memory: while a group is gathered, every batch's forward is alive at that
  layer (its activations so far): on SmolLM2 twice the default's peak (results/compress_speed.md).

Both give the same model bit for bit (tests/test_anchored.py).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .calibration import collect_group_input, run_stage, select_tokens
from .errors import PrehabError
from .utils import set_submodule

__all__ = ["AnchoredPass", "RestartedStreams"]

_local = threading.local()  # .worker: the _Worker whose forward runs on this thread


class _Cancelled(BaseException):
    """Raised inside a paused forward to unwind it when the pass is abandoned."""


class _Worker:
    """One forward, run on its own thread, paused and resumed by the driver (a coroutine)."""

    def __init__(self, fn):
        self._fn = fn
        self._go = threading.Event()
        self._stopped = threading.Event()
        self._cancel = False
        self.at = None  # (group index, its input) while paused at a group's first layer
        self.seen = set()  # groups already handed over by this forward
        self.done = False
        self.result = None
        self._error = None
        self._started = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="prehab-svd-forward")

    def _run(self):
        _local.worker = self
        self._go.wait()
        self._go.clear()
        try:
            if self._cancel:
                raise _Cancelled
            with torch.no_grad():  # grad mode is per thread
                self.result = self._fn()
        except _Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread
            self._error = e
        finally:
            self.done = True
            self.at = None
            self._stopped.set()

    def pause(self, group: int, x: torch.Tensor) -> None:
        """On the worker's thread: hand over ``x`` and wait to be resumed."""
        self.seen.add(group)
        self.at = (group, x)
        self._stopped.set()
        self._go.wait()
        self._go.clear()
        self.at = None
        if self._cancel:
            raise _Cancelled

    def resume(self) -> None:
        """On the driver's thread: run the forward until its next pause or its end."""
        if self.done:
            return
        self._stopped.clear()
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.set()
        self._stopped.wait()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def cancel(self) -> None:
        if self.done or not self._started:
            return
        self._cancel = True
        self._stopped.clear()
        self._go.set()
        self._thread.join()


class _Slot(nn.Module):
    """Stands in the compressed block for a group's first layer while its forwards are paused in
    front of it, so that they go on through whatever the layer has become by then."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class AnchoredPass:
    """Both streams of one block over every batch, gathered group by group.

    >>> with AnchoredPass(original, module, names, groups, inputs, shifted) as p:
    ...     for gi in range(len(groups)):
    ...         for x, xp in p.inputs(gi):    # the group's input in both streams, batch by batch
    ...             stats.add(x, xp)
    ...         with p.installing(gi):        # the group's layers are the block's own again
    ...             factorize and install the group's layers
    ...     originals, compressed = p.outputs()   # the block's outputs in both streams

    ``original`` is a copy of the block as it was, ``module`` the block being compressed;
    ``inputs[b]`` (:class:`StageInput`) carries the original stream's input of batch ``b``,
    ``shifted[b]`` the compressed stream's hidden states.
    """

    def __init__(self, original: nn.Module, module: nn.Module, names: dict, groups: list, inputs: list,
                 shifted: list):
        self.module = module
        self.inputs_ = inputs
        self.leads = [names[g[0]] for g in groups]
        self._handles = []
        self._slots = []
        for gi, rel in enumerate(self.leads):
            slot = _Slot(module.get_submodule(rel))
            set_submodule(module, rel, slot)
            self._slots.append(slot)
            self._handles.append(slot.register_forward_pre_hook(self._hook(gi)))
            self._handles.append(original.get_submodule(rel).register_forward_pre_hook(self._hook(gi)))
        self.pairs = [(_Worker(lambda m=original, i=inp: run_stage(m, i)),
                       _Worker(lambda m=module, i=inp, h=hp: run_stage(m, i, h)))
                      for inp, hp in zip(inputs, shifted)]

    @staticmethod
    def _hook(gi):
        def hook(_m, args):
            w = getattr(_local, "worker", None)
            if w is not None and gi not in w.seen:  # a layer called twice: its first call counts
                w.pause(gi, args[0])
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for orig, comp in self.pairs:  # abandoned (an error, or the whole model as one stage)
            orig.cancel()
            comp.cancel()
        for h in self._handles:
            h.remove()
        for rel, slot in zip(self.leads, self._slots):
            if self.module.get_submodule(rel) is slot:
                set_submodule(self.module, rel, slot.inner)
        return False

    @staticmethod
    def _advance(w: _Worker, gi: int):
        """Resume ``w`` until it pauses at group ``gi`` (its input), at a later group, or ends (None).
        A pause at an earlier group (a layer reached out of order) hands nothing over."""
        while not w.done and (w.at is None or w.at[0] < gi):
            w.resume()
        return w.at[1] if w.at is not None and w.at[0] == gi else None

    def inputs(self, gi: int):
        """Yield ``(x, x')`` of group ``gi`` for each batch whose forwards both reach it, the tokens
        selected by the batch's mask (their finiteness is checked on the sums, GroupStats.finalize)."""
        for inp, (orig, comp) in zip(self.inputs_, self.pairs):
            x = self._advance(orig, gi)
            xp = self._advance(comp, gi)
            if x is None or xp is None:
                continue
            yield select_tokens(x, inp.mask), select_tokens(xp, inp.mask)

    @contextmanager
    def installing(self, gi: int):
        """Inside, group ``gi``'s first layer is the block's own module again (to be read and
        replaced); on leaving, the paused forwards are pointed at whatever is installed there."""
        rel, slot = self.leads[gi], self._slots[gi]
        set_submodule(self.module, rel, slot.inner)
        try:
            yield
        finally:
            slot.inner = self.module.get_submodule(rel)
            set_submodule(self.module, rel, slot)

    def outputs(self) -> tuple[list, list]:
        """Run every forward to its end: the block's outputs in the original and compressed streams."""
        outs = ([], [])
        for pair in self.pairs:
            for k, w in enumerate(pair):
                while not w.done:
                    w.resume()
                if w.result is None:
                    raise PrehabError("a paused block forward ended without an output")
                outs[k].append(w.result.detach())
        return outs



class RestartedStreams:
    """The interface of :class:`AnchoredPass`, by running the block again from its input for each group
    (both streams, up to the group's first layer) and once more for the outputs."""

    def __init__(self, original: nn.Module, module: nn.Module, names: dict, groups: list, inputs: list,
                 shifted: list):
        self.original, self.module, self.names, self.groups = original, module, names, groups
        self.inputs_, self.shifted = inputs, shifted

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def inputs(self, gi: int):
        g = self.groups[gi]
        for inp, hp in zip(self.inputs_, self.shifted):
            yield (collect_group_input(self.original, self.names, g, inp, inp.hidden),
                   collect_group_input(self.module, self.names, g, inp, hp))

    def installing(self, gi: int):
        return nullcontext()

    def outputs(self) -> tuple[list, list]:
        return ([run_stage(self.original, inp).detach() for inp in self.inputs_],
                [run_stage(self.module, inp, hp).detach() for inp, hp in zip(self.inputs_, self.shifted)])
