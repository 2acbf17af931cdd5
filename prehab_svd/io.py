"""Save and load compressed models: safetensors weights + a JSON file of ranks. No pickle.

A saved folder holds::

    model.safetensors    every parameter and persistent buffer (factors U, V of compressed layers),
                         or shards model-00001-of-0000N.safetensors ... with
                         model.safetensors.index.json (Hugging Face's sharded layout, written by
                         :func:`prehab_svd.compress_pretrained`: one shard per block)
    prehab_svd.json      format version, method, keep_ratio, {layer name: rank}, the report
    config.json          the Hugging Face config (when the model has one), so loading needs no code
    tokenizer files      when a tokenizer is passed

The folder is written under a temporary name next to the destination and renamed into place, so an
interrupted save never leaves a half-written folder, and an existing folder is only replaced when
``overwrite=True``.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch
from torch import nn

from .errors import PrehabError
from .layers import LowRankLinear
from .utils import is_causal_config, new_folder_next_to, replace_folder, set_submodule

__all__ = ["save_compressed", "load_compressed", "apply_ranks", "read_config", "build_model", "load_model",
           "load_tokenizer", "META_FILE", "WEIGHTS_FILE", "INDEX_FILE"]

META_FILE = "prehab_svd.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # the sharded layout: {"weight_map": {name: shard file}}
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
    meta = build_meta({n: m.rank for n, m in layers.items()}, {n: m.bias is not None for n, m in layers.items()},
                      type(model).__name__, report, extra)
    with new_folder_next_to(path) as tmp:
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
        replace_folder(tmp, path)  # an existing folder (overwrite) is replaced only once this one is whole
    return path


def build_meta(ranks: dict, bias: dict, model_class: str, report=None, extra: dict | None = None) -> dict:
    """The content of prehab_svd.json: ranks and biases of the LowRankLinear layers, the report."""
    meta = {
        "format": "prehab-svd",
        "format_version": FORMAT_VERSION,
        "ranks": dict(ranks),
        "bias": dict(bias),
        "model_class": model_class,
    }
    if report is not None:
        meta["method"] = report.method
        meta["keep_ratio"] = report.keep_ratio
        meta["report"] = report.to_dict()
    if extra:
        meta.update(extra)
    return meta


def weight_files(path) -> list:
    """The safetensors files of a saved folder: [model.safetensors], or the shards that
    model.safetensors.index.json names (sorted); [] when there are neither."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, ValueError, AttributeError) as e:
            raise PrehabError(f"{index} is not a readable JSON index of shards ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PrehabError(f"{index} has no weight_map naming the shards")
        files = []
        for name in sorted(set(weight_map.values())):
            if not isinstance(name, str) or Path(name).name != name:
                raise PrehabError(f"{index} names the shard {name!r}: shards must be plain file names")
            if not (path / name).is_file():
                raise PrehabError(f"{index} names the shard {name}, which is missing: the folder is incomplete")
            files.append(path / name)
        return files
    return [path / WEIGHTS_FILE] if (path / WEIGHTS_FILE).is_file() else []


def apply_ranks(model: nn.Module, ranks: dict, bias: dict | None = None) -> None:
    """Swap the named ``nn.Linear`` layers of ``model`` for empty ``LowRankLinear`` of given ranks.

    Every name and rank is checked before the first layer is swapped, so a bad table leaves the
    model as it was."""
    todo = _linears_to_swap(model, ranks)
    for name, lin in todo.items():
        has_bias = lin.bias is not None if bias is None else bias.get(name, lin.bias is not None)
        new = LowRankLinear(lin.in_features, lin.out_features, int(ranks[name]), bias=has_bias,
                            device=lin.weight.device, dtype=lin.weight.dtype)
        set_submodule(model, name, new)


def _linears_to_swap(model: nn.Module, ranks: dict) -> dict:
    """{name: nn.Linear} of the layers ``ranks`` names that are not yet LowRankLinear; a PrehabError
    for a name the model lacks, a layer that is not nn.Linear, or a rank that is not a positive int."""
    todo = {}
    for name, rank in ranks.items():
        try:
            lin = model.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            lin = None
        if lin is None:
            raise PrehabError(f"the model has no layer {name!r} named in the saved ranks")
        if isinstance(lin, LowRankLinear):
            continue
        if not isinstance(lin, nn.Linear):
            raise PrehabError(f"layer '{name}' is a {type(lin).__name__}, expected nn.Linear")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise PrehabError(f"the rank of layer '{name}' must be a positive integer, got {rank!r}")
        todo[name] = lin
    return todo


def _check_stored_shapes(model: nn.Module, ranks: dict, files: list, path: Path) -> None:
    """Read the safetensors headers (not the data) and compare every stored shape with the model's
    after ``ranks`` is applied, before anything is changed: a damaged file, a ranks table from
    another save, or a config.json of other dimensions each get their own error."""
    from safetensors import SafetensorError, safe_open

    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, lin in _linears_to_swap(model, ranks).items():
        want.pop(f"{name}.weight", None)
        want[f"{name}.U"] = (lin.out_features, int(ranks[name]))
        want[f"{name}.V"] = (int(ranks[name]), lin.in_features)
    rank_bad, other_bad = [], []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise PrehabError(f"{file} is not a readable safetensors file ({e}): it is damaged or "
                              "truncated; copy or save the model again") from None
        for key, shape in stored.items():
            if key in want and want[key] != shape:
                layer, _, leaf = key.rpartition(".")
                r_dim = {"U": -1, "V": 0}.get(leaf)
                is_rank = layer in ranks and r_dim is not None and len(shape) == 2 and shape[r_dim] != ranks[layer]
                (rank_bad if is_rank else other_bad).append(f"{key} {list(shape)} in {file.name}, "
                                                            f"expected {list(want[key])}")
    if rank_bad:
        raise PrehabError(f"{path / META_FILE} and the weights disagree on ranks: {'; '.join(rank_bad[:3])}"
                          f"{' ...' if len(rank_bad) > 3 else ''}; the files come from different saves: "
                          "save the model again")
    if other_bad:
        raise PrehabError(f"the weights in {path} do not fit the {type(model).__name__} built from its "
                          f"config: {'; '.join(other_bad[:3])}{' ...' if len(other_bad) > 3 else ''}; "
                          "config.json and the weights come from different models")


def read_meta(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise PrehabError(f"{path} is not a folder of a compressed model (it does not exist or is a file)")
    meta_file = path / META_FILE
    if not meta_file.is_file() or not weight_files(path):
        raise PrehabError(f"{path} has no {META_FILE} and {WEIGHTS_FILE} (or {INDEX_FILE} with its shards): "
                          "not saved by prehab-svd")
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PrehabError(f"{meta_file} is not readable JSON ({e}); the folder is damaged: save or copy "
                          "the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != "prehab-svd" or not isinstance(
            meta.get("format_version", 0), int) or meta.get("format_version", 0) > FORMAT_VERSION:
        raise PrehabError(f"{meta_file} is not a prehab-svd file of a version this library reads")
    _check_meta_layers(meta, meta_file)
    return meta


def _check_meta_layers(meta: dict, meta_file: Path) -> None:
    """``ranks`` maps layer names to positive ints, ``bias`` (optional) layer names to bools."""
    ranks, bias = meta.get("ranks"), meta.get("bias", {})
    if not isinstance(ranks, dict):
        raise PrehabError(f"{meta_file} has no 'ranks' table of layer name -> rank; the file is damaged: "
                          "save the model again")
    for name, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise PrehabError(f"{meta_file} gives layer '{name}' the rank {rank!r}; ranks must be positive "
                              "integers: the file is damaged or was edited by hand")
    if bias is not None and (not isinstance(bias, dict) or not all(isinstance(v, bool) for v in bias.values())):
        raise PrehabError(f"{meta_file} has a malformed 'bias' table (layer name -> true/false)")


def load_compressed(path, model: nn.Module | None = None, *, model_class=None, device=None):
    """Rebuild a saved compressed model.

    With ``model`` given (an uncompressed skeleton of the same architecture) its layers are replaced
    and the weights loaded into it. Otherwise the Hugging Face config in the folder is used to build
    the model (class from ``config.architectures`` or ``model_class``), so no code is needed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    meta = read_meta(path)
    if model is None:
        model = build_model(path, model_class, hint=_SKELETON_HINT)
    files = weight_files(path)
    # everything is checked before the model (possibly the caller's skeleton) is changed
    try:
        _linears_to_swap(model, meta["ranks"])
    except PrehabError as e:
        raise PrehabError(f"{path / META_FILE} does not fit the {type(model).__name__} built for it: {e}; "
                          "config.json and prehab_svd.json come from different models, or pass the right "
                          "skeleton: load_compressed(path, model)") from None
    _check_stored_shapes(model, meta["ranks"], files, path)
    apply_ranks(model, meta["ranks"], meta.get("bias"))
    missing, unexpected = None, []
    for file in files:  # a key is missing when no shard has it
        try:
            m, u = load_model(model, str(file), strict=False)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise PrehabError(f"{file} could not be loaded ({e}); copy or save the model again") from None
        missing = set(m) if missing is None else missing & set(m)
        unexpected += u
    # Tied weights (e.g. lm_head = embed_tokens) are stored once; anything else must match.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = sorted(k for k in missing if k not in tied and not _is_tied(model, k))
    if missing or unexpected:
        where = files[0] if len(files) == 1 else path / INDEX_FILE
        raise PrehabError(
            f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
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


def read_config(path):
    """The Hugging Face config of the folder ``path``, read offline; a PrehabError naming config.json
    when it is not JSON, lacks ``model_type`` or names a type this transformers does not know."""
    import transformers

    try:  # huggingface_hub's strict configs raise their own error on invalid values
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        StrictDataclassError = ValueError

    path = Path(path)
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, StrictDataclassError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = " ".join(lines[:2]) if lines else type(e).__name__
        raise PrehabError(
            f"{path / 'config.json'} cannot be read by transformers {transformers.__version__} ({why}); fix "
            "or replace the file; if its model_type is newer than this transformers, upgrade it (pip install "
            "-U transformers); a compressed model also loads with load_compressed(path, model) given the "
            "uncompressed skeleton"
        ) from None


# --------------------------------------------------------------------------------------------------
# Building and loading models

_SKELETON_HINT = "pass the uncompressed model skeleton: load_compressed(path, model)"


def build_model(path, model_class=None, *, config=None, dtype=None, hint: str | None = None):
    """A model of the Hugging Face config in the folder ``path``, with new (untrained) weights: the one
    place the package builds a model from a config.

    The class is ``model_class``, else the transformers class ``config.architectures[0]`` names, else
    ``AutoModel``. ``config``: the folder's config when already read (else it is read here).
    ``dtype``: built in that dtype; None: built in torch's default dtype and then cast to the config's
    ``dtype``. Every failure is a PrehabError naming config.json, ending with ``hint`` (what else the
    caller's user can do). To build without memory, call it under a context that puts parameters on
    the meta device (as :func:`prehab_svd.compress_pretrained` does)."""
    import transformers

    path = Path(path)
    if config is None:
        if not (path / "config.json").is_file():
            raise PrehabError(f"{path} has no config.json; {hint or 'not a Hugging Face model folder'}")
        config = read_config(path)
    cls = model_class
    if cls is None:
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
        if archs and cls is None:
            todo = f"upgrade transformers, pass model_class=, or {hint}" if hint else \
                "upgrade transformers or pass model_class="
            raise PrehabError(f"{path / 'config.json'} names the architecture {archs[0]!r}, which transformers "
                              f"{transformers.__version__} does not have; {todo}")
        if cls is None:
            cls = transformers.AutoModel
    try:
        if not hasattr(cls, "from_config"):
            model = cls(config)
        elif dtype is None:
            model = cls.from_config(config)
        else:
            model = cls.from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        raise PrehabError(f"{getattr(cls, '__name__', cls)} cannot be built from {path / 'config.json'} ({e})"
                          f"{'; ' + hint if hint else ''}") from None
    if dtype is None:
        dtype = config_dtype(config)
        if dtype is not None:
            model.to(dtype)
    return model


def config_dtype(config):
    """The torch dtype a Hugging Face config names in ``dtype`` (a dtype or its name), else None."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def load_model(path, dtype: str = "auto"):
    """``(model, is_causal)`` from a plain Hugging Face folder, or from a prehab-svd folder (which
    rebuilds its LowRankLinear layers); a causal LM as ``AutoModelForCausalLM``, else ``AutoModel``;
    in eval mode. ``dtype``: "auto" (the folder's) or a torch dtype's name, for a plain folder."""
    import transformers
    from safetensors import SafetensorError

    path = Path(path)
    config = read_config(path)  # a PrehabError naming config.json when transformers cannot read it
    causal = is_causal_config(config)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    if (path / META_FILE).is_file():
        model = load_compressed(path, model_class=cls)
    else:
        kw = {}
        if dtype != "auto":
            kw["dtype"] = getattr(torch, dtype, None)
            if not isinstance(kw["dtype"], torch.dtype):
                raise PrehabError(f"unknown --dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        try:
            model = cls.from_pretrained(str(path), local_files_only=True, **kw)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PrehabError(f"the model in '{path}' could not be loaded ({why}); its weight files may be "
                              "damaged or not match config.json") from None
    model.eval()
    return model, causal


def load_tokenizer(path, fallback=None):
    """The tokenizer saved in the folder ``path`` (else in ``fallback``), read offline."""
    import transformers

    for p in (path, fallback):
        if p is None:
            continue
        try:
            return transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError):
            continue
    raise PrehabError(f"no tokenizer files in '{path}'; pass --tokenizer PATH")
