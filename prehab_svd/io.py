"""Save and load compressed models: safetensors weights + a JSON file of ranks. No pickle.

A saved folder holds::

    model.safetensors    every parameter and persistent buffer (factors U, V of compressed layers)
    prehab_svd.json      format version, method, keep_ratio, {layer name: rank}, the report
    config.json          the Hugging Face config (when the model has one), so loading needs no code
    tokenizer files      when a tokenizer is passed

The folder is written under a temporary name next to the destination and renamed into place, so an
interrupted save never leaves a half-written folder, and an existing folder is only replaced when
``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import PrehabError
from .layers import LowRankLinear

__all__ = ["save_compressed", "load_compressed", "apply_ranks", "META_FILE", "WEIGHTS_FILE"]

META_FILE = "prehab_svd.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _lowrank_layers(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def save_compressed(model: nn.Module, path, report=None, *, tokenizer=None, overwrite=False,
                    extra: dict | None = None, extra_files: dict | None = None) -> Path:
    """Write ``model`` (with its ``LowRankLinear`` layers) to the folder ``path`` atomically.

    ``extra`` entries are added to prehab_svd.json; ``extra_files`` maps a file name to a function
    ``write(path)`` that writes it (plots, logs): they are written inside the temporary folder, so
    they appear together with the model or not at all.
    """
    from safetensors.torch import save_model

    path = Path(path)
    if path.exists() and not overwrite:
        raise PrehabError(f"{path} already exists; choose another output folder or pass overwrite")
    layers = _lowrank_layers(model)
    meta = {
        "format": "prehab-svd",
        "format_version": FORMAT_VERSION,
        "ranks": {n: m.rank for n, m in layers.items()},
        "bias": {n: m.bias is not None for n, m in layers.items()},
        "model_class": type(model).__name__,
    }
    if report is not None:
        meta["method"] = report.method
        meta["keep_ratio"] = report.keep_ratio
        meta["report"] = report.to_dict()
    if extra:
        meta.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_model(model, str(tmp / WEIGHTS_FILE))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2)
        for name, write in (extra_files or {}).items():
            if Path(name).name != name or name in (META_FILE, WEIGHTS_FILE):
                raise PrehabError(f"extra file name {name!r} must be a plain file name, not {META_FILE} "
                                  f"or {WEIGHTS_FILE}")
            write(tmp / name)
        if path.exists():  # overwrite: move the old folder aside first, delete it after the rename
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def apply_ranks(model: nn.Module, ranks: dict, bias: dict | None = None) -> None:
    """Swap the named ``nn.Linear`` layers of ``model`` for empty ``LowRankLinear`` of given ranks."""
    for name, rank in ranks.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise PrehabError(f"the model has no layer '{name}' named in the saved ranks") from e
        if isinstance(lin, LowRankLinear):
            continue
        if not isinstance(lin, nn.Linear):
            raise PrehabError(f"layer '{name}' is a {type(lin).__name__}, expected nn.Linear")
        has_bias = lin.bias is not None if bias is None else bias.get(name, lin.bias is not None)
        new = LowRankLinear(lin.in_features, lin.out_features, int(rank), bias=has_bias,
                            device=lin.weight.device, dtype=lin.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def read_meta(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise PrehabError(f"{path} is not a folder of a compressed model (it does not exist or is a file)")
    meta_file = path / META_FILE
    if not meta_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise PrehabError(f"{path} has no {META_FILE} and {WEIGHTS_FILE}: not saved by prehab-svd")
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get("format") != "prehab-svd" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise PrehabError(f"{meta_file} is not a prehab-svd file of a version this library reads")
    return meta


def load_compressed(path, model: nn.Module | None = None, *, model_class=None, device=None):
    """Rebuild a saved compressed model.

    With ``model`` given (an uncompressed skeleton of the same architecture) its layers are replaced
    and the weights loaded into it. Otherwise the Hugging Face config in the folder is used to build
    the model (class from ``config.architectures`` or ``model_class``), so no code is needed.
    """
    from safetensors.torch import load_model

    path = Path(path)
    meta = read_meta(path)
    if model is None:
        model = _build_from_config(path, model_class)
    apply_ranks(model, meta["ranks"], meta.get("bias"))
    missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False)
    # Tied weights (e.g. lm_head = embed_tokens) are stored once; anything else must match.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not _is_tied(model, k)]
    if missing or unexpected:
        raise PrehabError(
            f"{path / WEIGHTS_FILE} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    """True when parameter ``key`` shares storage with another parameter that was loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    t = params.get(key)
    if t is None:
        return False
    return any(o is t for k, o in params.items() if k != key)


def _build_from_config(path: Path, model_class=None):
    import transformers

    if not (path / "config.json").is_file():
        raise PrehabError(
            f"{path} has no config.json; pass the uncompressed model skeleton as load_compressed(path, model)"
        )
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = model_class
    if cls is None:
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            cls = transformers.AutoModel
    if hasattr(cls, "from_config"):
        model = cls.from_config(config)
    else:
        model = cls(config)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    return model
