"""``compress_pretrained(src, dst, ...)``: compress a model from its safetensors on disk, one block in
memory at a time, resumable after a kill.

Memory. The model is built from ``src/config.json`` with its parameters on the meta device (buffers,
such as rotary tables, are built for real: they are small and not always in the checkpoint). The
weights outside the blocks (embeddings, final norm, head) are read, written to the first shard, used
to capture the first block's inputs, and freed. Then each block is read from the memory-mapped
safetensors, compressed by the same per-block code as :func:`prehab_svd.compress`, written to its own
shard and freed (its parameters go back to meta). Peak: one block (two copies for aa-svd, which keeps
the original beside the compressed one), that block's statistics, the calibration hidden states, and
a fixed overhead; the number of blocks does not enter.

Checkpoints. Everything is written under ``<dst>.partial/`` next to the destination::

    lock                           flock-ed by the running process (a second one is refused)
    progress.json                  the inputs' fingerprint, the next block, the report rows so far
    hidden-<k>.safetensors         the hidden states entering block k (aa-svd: both streams)
    model/                         the output being built: model-XXXXX-of-YYYYY.safetensors shards

Each file is written to a temporary name, flushed and renamed, in the order shard, hidden states,
progress, so ``progress.json`` only ever names finished work. A run killed at any point and started
again with the same arguments skips the finished blocks, restores the hidden states and goes on; the
computation is the same sequence of operations either way, so the shards are byte-identical to an
uninterrupted run's. At the end the index, ``prehab_svd.json``, ``config.json`` (and tokenizer and
extra files) are written into ``model/``, which is renamed to ``dst``; then the checkpoint is deleted.

The fingerprint in ``progress.json`` covers the method and every option, the dtype, the device type,
the torch version, the source files (size, modification time, header hash) and a hash of the
calibration tensors; a checkpoint of other inputs is refused, naming what changed. Byte-identity also
needs the same kernels: on CPU the same thread count (matrix products may split work by thread); on
CUDA deterministic cuBLAS (``CUBLAS_WORKSPACE_CONFIG=:4096:8``). Without them a resumed run is as good
as an uninterrupted one, only not equal to the last bit.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import compression as _c
from .calibration import Timings, as_batch, check_chain, eval_context
from . import distributed as _dist
from . import methods as _methods
from .errors import PrehabError
from .utils import replace_folder
from .io import INDEX_FILE, META_FILE, WEIGHTS_FILE, build_meta, build_model, config_dtype
from .models import plan_targets
from .utils import write_atomic

__all__ = ["checkpoint_dir", "compress_pretrained"]

PROGRESS_FILE = "progress.json"
PROGRESS_VERSION = 1
_MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is not a header


def checkpoint_dir(dst) -> Path:
    """Where :func:`compress_pretrained` keeps its checkpoint while writing ``dst``."""
    dst = Path(dst)
    return dst.with_name(dst.name + ".partial")


def compress_pretrained(
    src,
    dst,
    method: str,
    keep_ratio: float,
    calibration,
    *,
    resume: bool = True,
    overwrite: bool = False,
    device="cpu",
    dtype: torch.dtype | None = None,
    targets=None,
    exclude=None,
    stats_dtype: torch.dtype = torch.float32,
    model_class=None,
    tokenizer=None,
    extra: dict | None = None,
    extra_files: dict | None = None,
    on_block=None,
    progress: bool = False,
    **options,
) -> _c.CompressionReport:
    """Compress the Hugging Face model folder ``src`` into the folder ``dst`` without ever holding
    more than one of its blocks in memory; resumable.

    Args:
        src: a folder with ``config.json`` and ``model.safetensors`` (or shards listed in
            ``model.safetensors.index.json``).
        dst: the output folder, loadable with :func:`prehab_svd.load_compressed`: one shard per
            block, an index, ``prehab_svd.json`` and ``config.json``. An existing ``dst`` is only
            replaced with ``overwrite=True``.
        method, keep_ratio, calibration, targets, exclude, stats_dtype, options (the method's
            keyword options, e.g. ``damping``, ``shrinkage``, ``alpha``): as for
            :func:`prehab_svd.compress`; ``calibration`` is needed and is read once into memory.
            ``zs-svd`` is not supported (its task gradient needs the whole model: use ``compress``).
        resume: continue from the checkpoint in ``<dst>.partial/`` when one was left by a run with
            the same inputs (a checkpoint of different inputs is refused); ``False`` discards it.
        device: where blocks are loaded and compressed ("cpu", "cuda", ...).
        dtype: the weights' dtype; None uses ``config.dtype``, else the checkpoint's first floating
            tensor's (as ``from_pretrained(dtype="auto")`` does).
        model_class: the transformers class to build (default: ``config.architectures[0]``, else
            ``AutoModel``).
        tokenizer, extra: saved with the model, as in :func:`prehab_svd.save_compressed`.
        extra_files: {file name: ``write(path, report)``}, written into the output folder before it
            is renamed into place (the report is only known then).
        on_block: ``on_block(index, blocks)`` is called after block ``index`` is on disk and
            checkpointed.

    Returns:
        the :class:`~prehab_svd.CompressionReport` (``timings`` adds "load" and "write";
        ``details["resumed_at_block"]`` tells where a resumed run started).
    """
    t0 = time.perf_counter()
    if _dist.is_distributed():
        raise PrehabError(
            "compress_pretrained runs in one process: its checkpoint folder and output shards would be "
            "written by every rank at once. Under torch.distributed, load the model and call "
            "prehab_svd.compress on every rank (each with its calibration shard), then save from rank 0")
    if _methods.get(method).allocation is not None:
        raise PrehabError(
            "zs-svd ranks the components of every matrix of the model together by a task gradient "
            "of the whole model, so it cannot run one block at a time from disk; use "
            "prehab_svd.compress on the model in memory (the CLI without --low-memory)")
    m, _ = _c._setup(method, keep_ratio, stats_dtype, "uniform", None, options)
    if calibration is None:
        raise PrehabError(f"compress_pretrained needs calibration data (method {method!r})")
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise PrehabError(f"{dst} already exists; choose another output folder or pass overwrite")
    if dst.resolve() == src.resolve():
        raise PrehabError("the output folder must differ from the source folder")
    for name in extra_files or {}:
        if Path(name).name != name or name in (META_FILE, WEIGHTS_FILE, INDEX_FILE) or name.endswith(
                ".safetensors"):
            raise PrehabError(f"extra file name {name!r} must be a plain file name, not {META_FILE}, "
                              "the index or a .safetensors file")
    device = torch.device(device)
    source = _Source(src)
    dtype = dtype if dtype is not None else source.default_dtype()
    batches = [as_batch(item, "cpu") for item in calibration]
    if not batches:
        raise PrehabError("the calibration data is empty; pass at least one batch")

    model = _skeleton(source, model_class, dtype, device)
    plan = plan_targets(model, targets, exclude)
    if plan.blocks_name is None:
        raise PrehabError(
            "the targets include layers outside the transformer blocks (or the model has no block "
            "list), so the model cannot be compressed one block at a time; use prehab_svd.compress "
            "in memory, or target only layers inside the blocks")
    ranks = _c._uniform_ranks(plan, keep_ratio)
    inputs = {
        "method": method, "keep_ratio": float(keep_ratio), "options": asdict(m.options),
        "stats_dtype": str(stats_dtype), "dtype": str(dtype),
        "device": device.type, "targets": _names(targets), "exclude": _names(exclude),
        "model_class": type(model).__name__, "source": source.identity(),
        "calibration": _calibration_hash(batches), "torch": torch.__version__,
    }
    timer = Timings(device)
    report = _c.CompressionReport(method=method, keep_ratio=float(keep_ratio))
    report.details["options"] = inputs["options"]
    ckpt = _Checkpoint(dst, inputs, len(plan.stages) + 1)
    with ckpt.open(resume):
        hooks = _StreamHooks(model, plan, source, ckpt, report, timer, dtype, device, on_block)
        cfg = model.config
        with eval_context(model):
            hooks.load_outside()
            loop = _c._Loop(m, stats_dtype, progress, timer)
            _c._compress_calibrated(model, plan, ranks, [as_batch(b, device) for b in batches], report,
                                    device, loop, hooks=hooks)
        report.seconds = time.perf_counter() - t0
        report.timings = dict(timer.totals)  # as far as known when prehab_svd.json is written
        meta = build_meta(*_ranks_and_bias(model, report), type(model).__name__, report, extra)
        with timer("write"):
            ckpt.finish(cfg, meta, tokenizer, extra_files, overwrite, report)
    report.seconds = time.perf_counter() - t0
    report.timings = dict(timer.totals)
    _c._warn_short_calibration(report, stacklevel=3)
    return report


# --------------------------------------------------------------------------------------------------
# The source folder


def _read_header(path: Path) -> tuple[bytes, dict]:
    """The raw JSON header of a safetensors file and its parsed form."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, os.path.getsize(path) - 8):
                raise ValueError("bad header length")
            raw = f.read(n)
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as e:
        raise PrehabError(f"{path} is not a readable safetensors file ({e})") from None
    return raw, header


class _Source:
    """A Hugging Face model folder: config and where each tensor lives (read lazily, mmap-ed)."""

    def __init__(self, path: Path):
        if not path.is_dir() or not (path / "config.json").is_file():
            raise PrehabError(f"{path} is not a Hugging Face model folder (no config.json)")
        if (path / META_FILE).is_file():
            raise PrehabError(f"{path} holds a model compressed by prehab-svd; compress_pretrained reads an "
                              "uncompressed Hugging Face model folder")
        self.path = path
        self._config = None
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {name: path / name for name in set(weight_map.values())}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise PrehabError(f"{index} is not a valid index of safetensors shards ({e})") from None
        elif (path / WEIGHTS_FILE).is_file():
            files = {WEIGHTS_FILE: path / WEIGHTS_FILE}
        else:
            raise PrehabError(
                f"{path} has no {WEIGHTS_FILE} or {INDEX_FILE}; compress_pretrained reads safetensors "
                "only (re-save the model with save_pretrained(..., safe_serialization=True))")
        self.headers = {}
        self.file_of = {}
        for name in sorted(files):
            if Path(name).name != name or not files[name].is_file():
                raise PrehabError(f"{index} names the shard {name!r}, which is not a file in {path}")
            raw, header = _read_header(files[name])
            self.headers[name] = raw
            for key in header:
                if key != "__metadata__":
                    self.file_of[key] = files[name]
        self.dtypes = {}
        for name in sorted(files):
            header = json.loads(self.headers[name])
            for key, spec in header.items():
                if key != "__metadata__" and isinstance(spec, dict):
                    self.dtypes[key] = spec.get("dtype")

    def identity(self) -> list:
        """What identifies the weights without reading them: per file its name, size, modification
        time and the hash of its header (names, dtypes, shapes, offsets)."""
        out = []
        for name, raw in sorted(self.headers.items()):
            st = (self.path / name).stat()
            out.append([name, st.st_size, st.st_mtime_ns, hashlib.sha256(raw).hexdigest()])
        return out

    @property
    def config(self):
        if self._config is None:
            from .io import read_config

            self._config = read_config(self.path)
        return self._config

    def default_dtype(self) -> torch.dtype:
        dtype = config_dtype(self.config)
        if dtype is not None:
            return dtype
        names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for key in sorted(self.dtypes):
            if self.dtypes[key] in names:
                return names[self.dtypes[key]]
        return torch.float32

    def key_for(self, names, prefix: str | None) -> str | None:
        """The checkpoint key of a tensor known under ``names`` (aliases of one tied tensor), also
        trying with the base model prefix added or removed (``bert.`` in a task model's file)."""
        for name in names:
            candidates = [name]
            if prefix:
                candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [
                    f"{prefix}.{name}"]
            for c in candidates:
                if c in self.file_of:
                    return c
        return None

    def read(self, keys, device: torch.device) -> dict:
        """{key: tensor} read with safetensors.safe_open (memory-mapped; one open per file)."""
        from safetensors import safe_open

        by_file: dict = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        out = {}
        where = "cpu" if device.type == "cpu" else str(device)
        for file, ks in by_file.items():
            with safe_open(str(file), framework="pt", device=where) as f:
                for key in ks:
                    out[key] = f.get_tensor(key)
        return out


def _names(patterns):
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _calibration_hash(batches) -> str:
    """sha256 over every calibration tensor's key, dtype, shape and bytes (and other values' repr)."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            v = batch[key]
            h.update(key.encode())
            if isinstance(v, torch.Tensor):
                t = v.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(v).encode())
        h.update(b"|")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The model skeleton


@contextmanager
def _parameters_on_meta():
    """Build modules with every parameter on the meta device (no memory) and buffers for real."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(source: _Source, model_class, dtype, device) -> nn.Module:
    """The model of ``source``'s config with every parameter on the meta device (no memory: the
    blocks are loaded one at a time) and its buffers, which are real, on ``device``."""
    with _parameters_on_meta():
        model = build_model(source.path, model_class, config=source.config, dtype=dtype)
    for module in model.modules():  # buffers are real: move them where the blocks will run
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return model.eval()


def _param_groups(root: nn.Module, prefix: str, skip: str | None = None) -> list:
    """Parameters under ``root`` as [(aliases [(module, attribute, full name)], parameter)]: tied
    parameters (one tensor under several names) form one group. Names under ``skip`` are left out."""
    groups: dict = {}
    for mod_name, module in root.named_modules(prefix=prefix, remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            if skip is not None and full.startswith(skip):
                continue
            groups.setdefault(id(p), ([], p))[0].append((module, attr, full))
    return list(groups.values())


def _persistent_buffers(root: nn.Module, prefix: str, skip: str | None = None) -> list:
    out = []
    for mod_name, module in root.named_modules(prefix=prefix):
        for attr, b in module._buffers.items():
            full = f"{mod_name}.{attr}" if mod_name else attr
            if b is None or attr in module._non_persistent_buffers_set or (
                    skip is not None and full.startswith(skip)):
                continue
            out.append((module, attr, full))
    return out


# --------------------------------------------------------------------------------------------------
# Loading, writing and freeing blocks around the block loop


class _StreamHooks(_c._BlockHooks):
    in_memory = False

    def __init__(self, model, plan, source, ckpt, report, timer, dtype, device, on_block):
        self.model, self.plan, self.source, self.ckpt = model, plan, source, ckpt
        self.report, self.timer, self.dtype, self.device = report, timer, dtype, device
        self.on_block = on_block
        self.blocks_prefix = plan.blocks_name + "."
        self.base_prefix = getattr(model, "base_model_prefix", "") or None

    # loading and freeing -------------------------------------------------------------------------

    def _load(self, root, prefix, skip=None):
        groups = _param_groups(root, prefix, skip)
        keys = []
        for aliases, _ in groups:
            key = self.source.key_for([full for _, _, full in aliases], self.base_prefix)
            if key is None:
                raise PrehabError(
                    f"the weight '{aliases[0][2]}' of {type(self.model).__name__} is not in the "
                    f"safetensors of {self.source.path} (the checkpoint names its weights differently); "
                    "compress this model in memory with prehab_svd.compress (the CLI without --low-memory)")
            keys.append(key)
        buffers = [(m, a, self.source.key_for([full], self.base_prefix))
                   for m, a, full in _persistent_buffers(root, prefix, skip)]
        buffers = [(m, a, k) for m, a, k in buffers if k is not None]
        tensors = self.source.read(keys + [k for _, _, k in buffers], self.device)
        for (aliases, old), key in zip(groups, keys):
            t = tensors[key]
            if tuple(t.shape) != tuple(old.shape):
                raise PrehabError(f"'{key}' in {self.source.path} has shape {tuple(t.shape)}, but the "
                                  f"model built from config.json expects {tuple(old.shape)}")
            if t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)
            new = nn.Parameter(t, requires_grad=False)
            for module, attr, _ in aliases:
                module._parameters[attr] = new
        for module, attr, key in buffers:
            module._buffers[attr] = tensors[key].to(self.device)

    @staticmethod
    def _free(root, prefix, skip=None):
        for aliases, p in _param_groups(root, prefix, skip):
            empty = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for module, attr, _ in aliases:
                module._parameters[attr] = empty

    def _block(self, index):
        """(module, full name) of block ``index``."""
        name, module, _ = self.plan.stages[index]
        return module, name

    def load_outside(self):
        """Read the weights outside the blocks and write them as the first shard."""
        with self.timer("load"):
            self._load(self.model, "", skip=self.blocks_prefix)
        with self.timer("write"):
            state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(self.blocks_prefix)}
            self.ckpt.write_shard(0, _dedupe(state))

    # the hooks of the block loop -----------------------------------------------------------------

    def blocks_chain(self, model, blocks, batch) -> bool:
        """Check the chain on a short input (:func:`prehab_svd.calibration.check_chain`), loading each block just before it runs and freeing it
        after, and stopping after the last block."""
        handles = []
        for i, block in enumerate(blocks):
            def load(_m, _args, i=i):
                with self.timer("load"):
                    self._load(*self._block(i))

            def free(_m, _args, _out, i=i):
                self._free(*self._block(i))

            handles.append(block.register_forward_pre_hook(load))
            handles.append(block.register_forward_hook(free))
        try:
            return check_chain(model, blocks, batch)
        finally:
            for h in handles:
                h.remove()
            for i in range(len(blocks)):  # after an error inside a block
                self._free(*self._block(i))

    def start(self, state) -> int:
        # The weights outside the blocks are on disk already and no longer needed.
        self._free(self.model, "", skip=self.blocks_prefix)
        k = self.ckpt.next_block
        if k == 0:
            return 0
        self.report.layers = [_c.LayerReport(**row) for row in self.ckpt.progress["layers"]]
        self.report.short_calibration = list(self.ckpt.progress["short_calibration"])
        self.report.details["resumed_at_block"] = k
        if k >= len(self.plan.stages):  # every block was done; only the final folder was missing
            return k
        with self.timer("load"):
            saved = self.ckpt.read_hidden(self.device)
        for name, streams in (("h", [i.hidden for i in state.inputs]), ("s", state.shifted)):
            for b, h in enumerate(streams or []):
                t = saved.get(f"{name}.{b}")
                if t is None or t.shape != h.shape or t.dtype != h.dtype:
                    raise PrehabError(f"the checkpoint in {self.ckpt.dir} does not hold the hidden states "
                                      "these calibration batches need; rerun with resume=False (--no-resume)")
        for b, inp in enumerate(state.inputs):
            inp.hidden = saved[f"h.{b}"]
        if state.shifted is not None:
            state.shifted = [saved[f"s.{b}"] for b in range(len(state.inputs))]
        return k

    def before_block(self, index, module):
        with self.timer("load"):
            self._load(*self._block(index))

    def after_block(self, index, module, state):
        n = len(self.plan.stages)
        with self.timer("write"):
            self.ckpt.write_shard(index + 1, _dedupe(module.state_dict(prefix=self._block(index)[1] + ".")))
            hidden = {}
            if index + 1 < n:  # what the next block starts from
                for b, inp in enumerate(state.inputs):
                    # Contiguous in memory as after reading back: the next block's ops then see the
                    # same layout whether this run goes on or a resumed one starts here.
                    inp.hidden = inp.hidden.contiguous()
                    hidden[f"h.{b}"] = inp.hidden
                for b, h in enumerate(state.shifted or []):
                    state.shifted[b] = h.contiguous()
                    hidden[f"s.{b}"] = state.shifted[b]
            self.ckpt.save_progress(index + 1, _dedupe(hidden, tied=False), self.report)
        self._free(*self._block(index))
        if self.on_block is not None:
            self.on_block(index, n)


def _dedupe(tensors: dict, tied: bool = True) -> dict:
    """CPU, contiguous tensors that safetensors accepts. With ``tied``, a tensor under several names
    (tied weights) is stored under its first name only (loading re-ties it); any other sharing of
    memory is undone by a copy."""
    out, storages, views = {}, set(), set()
    for k, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.numel() > 0:
            storage = t.untyped_storage().data_ptr()
            view = (storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if tied and view in views:
                continue
            if storage in storages:
                t = t.clone()
            storages.add(storage)
            views.add(view)
        out[k] = t.contiguous()
    return out


def _ranks_and_bias(model, report) -> tuple[dict, dict]:
    """The compressed layers' ranks (from the report: blocks finished by an earlier run are not in
    this process's model) and whether each has a bias (from the skeleton)."""
    ranks, bias = {}, {}
    for layer in report.layers:
        if layer.rank is None:
            continue
        ranks[layer.name] = layer.rank
        mod = model.get_submodule(layer.name)
        bias[layer.name] = mod.bias is not None
    return ranks, bias


# --------------------------------------------------------------------------------------------------
# The checkpoint folder


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


class _Checkpoint:
    def __init__(self, dst: Path, inputs: dict, shards: int):
        self.dst, self.inputs, self.shards = dst, inputs, shards
        self.dir = checkpoint_dir(dst)
        self.model_dir = self.dir / "model"
        self.next_block = 0
        self.progress: dict = {}

    def shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.shards:05d}.safetensors"

    @contextmanager
    def open(self, resume: bool):
        """Lock the checkpoint folder; keep its progress (same inputs, ``resume``) or start clean."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.dir / "lock", "a")  # noqa: SIM115  (held open while compressing)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise PrehabError(f"another process is compressing into {self.dst} (it holds {self.dir}/lock); "
                              "wait for it to finish or choose another output folder") from None
        try:
            self._recover(resume)
            yield self
        except BaseException:
            if not (self.dir / PROGRESS_FILE).is_file():  # no finished block: nothing to resume
                shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            lock.close()  # releases the flock

    def _recover(self, resume: bool):
        progress = None
        path = self.dir / PROGRESS_FILE
        if path.is_file():
            try:
                progress = json.loads(path.read_text())
            except ValueError:
                progress = None  # cannot happen with atomic writes; start over
        if progress is not None and resume:
            if progress.get("version") != PROGRESS_VERSION:
                raise PrehabError(f"{self.dir} holds a checkpoint of another prehab-svd version; rerun "
                                  "with resume=False (--no-resume) to discard it")
            old = progress.get("inputs", {})
            changed = sorted(k for k in set(old) | set(self.inputs) if old.get(k) != self.inputs.get(k))
            if changed:
                what = ", ".join(f"{k} ({_short(old.get(k))} -> {_short(self.inputs.get(k))})" for k in changed)
                raise PrehabError(
                    f"{self.dir} holds the checkpoint of a compression with other inputs: {what}. Rerun "
                    "with the same arguments to resume it, or with resume=False (--no-resume) to discard "
                    "it and start over")
            hidden = progress.get("hidden")
            if progress["next_block"] > 0 and progress["next_block"] < self.shards - 1 and not (
                    hidden and (self.dir / hidden).is_file()):
                raise PrehabError(f"{self.dir} is incomplete (no hidden states); rerun with resume=False "
                                  "(--no-resume)")
            self.progress, self.next_block = progress, int(progress["next_block"])
            for folder in (self.dir, self.model_dir):  # files a kill left half-written
                for tmp in folder.glob(".*.tmp-*"):
                    tmp.unlink()
            return
        # No usable progress (or resume=False): start from an empty folder.
        for entry in self.dir.iterdir():
            if entry.name == "lock":
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.model_dir.mkdir()

    def write_shard(self, k: int, tensors: dict) -> None:
        _save_tensors(self.model_dir / self.shard_name(k), tensors)

    def read_hidden(self, device) -> dict:
        from safetensors.torch import load_file

        path = self.dir / self.progress["hidden"]
        return load_file(str(path), device="cpu" if device.type == "cpu" else str(device))

    def save_progress(self, next_block: int, hidden: dict, report) -> None:
        name = f"hidden-{next_block:05d}.safetensors" if hidden else None
        if hidden:
            _save_tensors(self.dir / name, hidden)
        progress = {
            "version": PROGRESS_VERSION, "inputs": self.inputs, "blocks": self.shards - 1,
            "next_block": next_block, "hidden": name,
            "layers": [asdict(layer) for layer in report.layers],
            "short_calibration": list(report.short_calibration),
        }
        write_atomic(self.dir / PROGRESS_FILE, json.dumps(progress, indent=1))
        self.progress, self.next_block = progress, next_block
        for old in self.dir.glob("hidden-*.safetensors"):
            if old.name != name:
                old.unlink()

    def finish(self, config, meta: dict, tokenizer, extra_files, overwrite: bool, report) -> None:
        """Complete ``model/`` and rename it to ``dst``; then delete the checkpoint."""
        weight_map, total = {}, 0
        for k in range(self.shards):
            name = self.shard_name(k)
            _, header = _read_header(self.model_dir / name)
            for key, spec in header.items():
                if key == "__metadata__":
                    continue
                weight_map[key] = name
                total += spec["data_offsets"][1] - spec["data_offsets"][0]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
        config.save_pretrained(str(self.model_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.model_dir))
        (self.model_dir / META_FILE).write_text(json.dumps(meta, indent=2))
        for name, write in (extra_files or {}).items():
            write(self.model_dir / name, report)
        if self.dst.exists() and not overwrite:
            raise PrehabError(f"{self.dst} appeared while compressing; not replaced (pass overwrite)")
        replace_folder(self.model_dir, self.dst)
        shutil.rmtree(self.dir, ignore_errors=True)


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."

