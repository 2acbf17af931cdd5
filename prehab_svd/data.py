"""Calibration and evaluation text, and turning it into model batches.

Sources (:func:`load_texts`):

``"builtin"``
    Real English prose built at run time from the docstrings of the Python standard library
    (:func:`builtin_corpus`): read from the ``.py`` source files with :mod:`ast`, never imported. It
    works offline everywhere; its exact content depends on the Python version (the standard library
    changes between versions) but is deterministic for a given installation.
a local path
    A ``.txt`` file (one passage per line), a folder of ``.txt`` files, or a ``.json``/``.jsonl`` file
    (or folder of them) whose records have a ``"text"`` field; read with ``datasets.load_dataset``
    (the ``"text"`` / ``"json"`` builders). Blank lines are dropped.
``"licenses"``
    English text of another kind than the built-in corpus, for held-out perplexity: the license texts
    that ship with the machine (the regular files in ``/usr/share/common-licenses`` on Debian and
    Ubuntu: GPL, LGPL, GFDL, MPL, Apache, Artistic, ...) and Python's own ``LICENSE.txt``, one passage
    per file, in file-name order. Legal prose, not docstrings: what calibrating on one kind of text
    does to another. The split is ignored (none of it is calibration text).
``"wikitext2"``, ``"ptb"``, ``"c4"``
    The usual data sets of the compression papers, downloaded with ``datasets.load_dataset`` from the
    Hugging Face Hub. Rows are returned verbatim (blank rows included), so that
    ``"\\n\\n".join(rows)`` -- what :func:`causal_lm_batches` and :func:`eval_lm_batches` do -- reproduces
    the GPTQ / SVD-LLM perplexity protocol. Without a network they fail fast with a
    :class:`PrehabError` that says how to point at local files instead.

Batches (dicts of tensors that ``model(**batch)`` accepts):

* :func:`causal_lm_batches` -- calibration windows for causal LMs: ``num_samples`` windows of
  ``seq_len`` tokens at random start positions (seeded), as SVD-LLM / AA-SVD calibrate.
* :func:`eval_lm_batches` -- consecutive non-overlapping windows for perplexity.
* :func:`sentence_batches` -- padded sentence batches for encoders.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import os
import random
import re
import socket
import sysconfig
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch

from prehab_svd.errors import PrehabError

__all__ = [
    "builtin_corpus",
    "split_texts",
    "load_texts",
    "causal_lm_batches",
    "eval_lm_batches",
    "sentence_batches",
    "license_texts",
    "HUB_DATASETS",
]

# --------------------------------------------------------------------------------------------------
# The built-in corpus

# Folders of the standard library that are skipped: third-party packages, test suites (full of
# deliberately odd strings), GUI/demo code and vendored tools.
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3",
    "tkinter", "turtledemo", "ensurepip", "venv", "pydoc_data",
})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Statements whose bodies can hold definitions with docstrings (e.g. `if sys.platform == ...: def f`).
_BLOCK_NODES = _DOC_NODES + (ast.If, ast.Try, ast.ExceptHandler, ast.With)
if hasattr(ast, "TryStar"):  # Python >= 3.11
    _BLOCK_NODES = _BLOCK_NODES + (ast.TryStar,)
_WS = re.compile(r"\s+")
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t]*\n")
_NOT_PROSE = re.compile(r"[^\w ]|[\d_]")  # anything but letters and spaces
_CODE_CHARS = re.compile(r"[{}\[\]()=<>_*|\\`#@$%^&~]")


def _stdlib_files() -> list[Path]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(node, out: list[str]) -> None:
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, _BLOCK_NODES):
                _docstrings(child, out)


def _prose_paragraphs(doc: str):
    """Yield the prose paragraphs of a (cleaned) docstring, whitespace-normalized."""
    for block in _PARAGRAPH_SPLIT.split(doc):
        lines = block.split("\n")
        # Indented blocks are code samples / literal blocks / tables after cleandoc.
        if any(line[:1] in (" ", "\t") for line in lines):
            continue
        if any(line.lstrip().startswith((">>>", "...", "$ ", "%")) for line in lines):
            continue
        text = _WS.sub(" ", block).strip()
        if len(text) < 40 or len(text.split()) < 6:
            continue
        if not text[0].isupper() or text[-1] not in ".!?:":
            continue
        if len(_NOT_PROSE.findall(text)) > 0.15 * len(text):
            continue
        if len(_CODE_CHARS.findall(text)) > 0.04 * len(text):
            continue
        yield text


@functools.lru_cache(maxsize=1)
def _builtin_corpus() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for path in _stdlib_files():
        docs: list[str] = []
        # ast.parse allocates many objects; with a large heap (torch imported) the cyclic GC would
        # more than double the time, and a syntax tree has no cycles to collect.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            _docstrings(ast.parse(path.read_bytes(), filename=str(path)), docs)
        except (SyntaxError, ValueError, OSError):  # e.g. a file for another Python version
            continue
        finally:
            if gc_was_enabled:
                gc.enable()
        for doc in docs:
            for para in _prose_paragraphs(doc):
                seen.setdefault(para, None)
    return tuple(seen)


def builtin_corpus() -> list[str]:
    """English prose paragraphs from the standard library's docstrings (a few thousand).

    Files under ``sysconfig.get_paths()["stdlib"]`` are visited in sorted order (test suites, GUI code
    and third-party packages skipped) and parsed with :mod:`ast`; the docstrings of modules, classes
    and functions are split on blank lines and whitespace-normalized. A paragraph is kept when it looks
    like prose: at least 40 characters and 6 words, starts with a capital letter and ends with
    ``. ! ? :``, is at least 85% letters and spaces, has few code characters, and contains no indented
    (literal/code) lines or doctest prompts. Duplicates are removed (first occurrence wins).

    Deterministic for a given Python installation; cached in-process (the first call takes ~2 s).
    Returns a new list each call.
    """
    return list(_builtin_corpus())


LICENSE_DIRS = ("/usr/share/common-licenses",)


def license_texts() -> list[str]:
    """The ``"licenses"`` source: license texts installed on this machine (see the module docstring)."""
    files = []
    for d in LICENSE_DIRS:
        p = Path(d)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and not f.is_symlink())
    py_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if py_license.is_file():
        files.append(py_license)
    texts = []
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if t.strip():
            texts.append(t)
    if not texts:
        raise PrehabError(f"no license texts found (looked in {', '.join(LICENSE_DIRS)} and Python's "
                          "LICENSE.txt); pass a text file with --data instead")
    return texts


def split_texts(texts, heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split ``texts`` into ``(calibration, heldout)``, deterministically and disjointly.

    Duplicates are removed first (so the two parts share no text), then the unique texts are shuffled
    with ``random.Random(seed)``; the first ``round(heldout_fraction * n)`` go to the held-out part.
    Both parts come back in that shuffled order, so a prefix of either is a random sample.
    """
    if not (0.0 <= float(heldout_fraction) <= 1.0):
        raise PrehabError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction}")
    unique = list(dict.fromkeys(texts))
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    k = int(round(heldout_fraction * len(unique)))
    heldout = [unique[i] for i in order[:k]]
    calibration = [unique[i] for i in order[k:]]
    return calibration, heldout


# --------------------------------------------------------------------------------------------------
# Loading text

# name -> (load_dataset args, load_dataset kwargs, text field, {our split: their split})
HUB_DATASETS = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}, "text",
                  {"train": "train", "validation": "validation", "test": "test"}),
    "ptb": (("ptb_text_only", "penn_treebank"), {}, "sentence",
            {"train": "train", "validation": "validation", "test": "test"}),
    # C4 has no test split: "test" reads the first validation shard, as the papers do.
    "c4": (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz",
                                            "validation": "en/c4-validation.00000-of-00008.json.gz"}},
           "text", {"train": "train", "validation": "validation", "test": "validation"}),
}
_SPLITS = ("train", "validation", "test")
_LOCAL_HINT = ("point at local files instead, e.g. `--data path/to/wiki.train.txt` (a .txt file with "
               "one passage per line, a folder of .txt files, or a .jsonl file with a \"text\" field), "
               "or use `--data builtin`")


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise PrehabError("reading data files needs the 'datasets' package: pip install datasets, "
                          "or use `--data builtin`") from e
    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    """No 'Generating train split' progress bars from `datasets` while we load."""
    try:
        was_disabled = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
    except AttributeError:  # another datasets version: leave its bars alone
        yield
        return
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Can we open a TCP connection to the Hub within ``timeout`` seconds? (DNS included.)"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""  # behind a proxy we cannot judge: let the download try
    try:
        from huggingface_hub.constants import ENDPOINT as default_endpoint
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        return True, ""
    url = urlparse(os.environ.get("HF_ENDPOINT") or default_endpoint)
    host = url.hostname
    if not host:
        return True, ""
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return False, f"no answer from {host}:{port} within {timeout:.0f} s"
    if result[0] is not None:
        return False, f"cannot connect to {host}:{port} ({result[0]})"
    return True, ""


def _is_offline(datasets) -> bool:
    cfg = datasets.config
    return bool(getattr(cfg, "HF_HUB_OFFLINE", False) or getattr(cfg, "HF_DATASETS_OFFLINE", False))


def _load_hub(name: str, split: str) -> list[str]:
    args, kwargs, field, splits = HUB_DATASETS[name]
    if split not in splits:
        raise PrehabError(f"data set '{name}' has no split '{split}'; use one of {', '.join(splits)}")
    datasets = _import_datasets()
    what = f"'{name}' ({', '.join(args)})"
    offline = _is_offline(datasets)
    if offline:
        offline_hint = ("Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the "
                        "Hugging Face cache. Download it where there is a network and " + _LOCAL_HINT + ".")
    else:
        offline_hint = ("If it is already in your Hugging Face cache, set HF_DATASETS_OFFLINE=1 and "
                        "HF_HUB_OFFLINE=1 to read the cached copy. Otherwise download it where there is "
                        "a network and " + _LOCAL_HINT + ".")
    if not offline:
        # A fast check first: without a network `load_dataset` retries for ~30 s before failing.
        ok, why = _hub_reachable()
        if not ok:
            raise PrehabError(f"the data set {what} could not be downloaded from the Hugging Face Hub: "
                              f"{why}. {offline_hint}")
    try:
        with _quiet(datasets):
            ds = datasets.load_dataset(*args, split=splits[split], **kwargs)
    except Exception as e:  # connection, hub, offline-cache and builder errors alike
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrehabError(f"the data set {what} could not be downloaded or loaded "
                          f"({type(e).__name__}: {reason}). {offline_hint}") from e
    if field not in ds.column_names:
        raise PrehabError(f"data set {what} has no '{field}' field (fields: {ds.column_names})")
    texts = list(ds[field])
    if not any(t.strip() for t in texts):
        raise PrehabError(f"data set {what} split '{split}' contains no text")
    return texts


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) for a local file or folder."""
    def kind(p: Path):
        name = p.name.lower()
        if name.endswith(".txt"):
            return "text"
        if name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            return "json"
        return None

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        txt = [str(p) for p in files if kind(p) == "text"]
        if txt:
            return "text", txt
        js = [str(p) for p in files if kind(p) == "json"]
        if js:
            return "json", js
        raise PrehabError(f"folder '{path}' contains no .txt, .json or .jsonl files; " + _LOCAL_HINT)
    k = kind(path)
    if k is None:
        raise PrehabError(f"cannot read '{path}': expected a .txt, .json or .jsonl file (or a folder of "
                          "them)")
    return k, [str(path)]


def _load_local(path: Path) -> list[str]:
    builder, files = _local_files(path)
    datasets = _import_datasets()
    try:
        with _quiet(datasets):
            ds = datasets.load_dataset(builder, data_files={"train": files}, split="train")
    except Exception as e:
        raise PrehabError(f"could not read '{path}' as {builder} data "
                          f"({type(e).__name__}: {str(e).strip()[:300]})") from e
    if "text" not in ds.column_names:
        raise PrehabError(f"'{path}' has no \"text\" field (fields: {ds.column_names}); each JSON record "
                          "needs a \"text\" string")
    texts = [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise PrehabError(f"'{path}' contains no text (all lines/records are empty)")
    return texts


def load_texts(source: str, split: str = "train") -> list[str]:
    """Load a list of passages from ``source`` (see the module docstring).

    ``split``: ``"train"`` (calibration), ``"validation"`` or ``"test"`` (held out). For ``"builtin"``,
    ``"train"`` is the calibration part of :func:`split_texts` and ``"validation"``/``"test"`` are its
    held-out part. For local files the split is ignored: the file is what was asked for.
    """
    source = str(source)
    if split not in _SPLITS:
        raise PrehabError(f"unknown split '{split}'; use one of {', '.join(_SPLITS)}")
    if source == "builtin":
        calibration, heldout = split_texts(builtin_corpus())
        texts = calibration if split == "train" else heldout
        if not texts:
            raise PrehabError("the built-in corpus is empty: the Python standard library sources were "
                              "not found; pass text files with --data")
        return texts
    if source == "licenses":
        return license_texts()
    if source in HUB_DATASETS:
        return _load_hub(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise PrehabError(f"data source '{source}' is neither a known data set ('builtin', 'licenses', "
                          f"{', '.join(repr(k) for k in HUB_DATASETS)}) nor an existing file or folder; "
                          "check the path")
    return _load_local(path)


# --------------------------------------------------------------------------------------------------
# Batches


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    """Token ids of one long text, tokenized once, without truncation or the too-long warning."""
    try:
        enc = tokenizer(text, truncation=False, verbose=False)
    except TypeError:  # a tokenizer-like object without these options
        enc = tokenizer(text)
    ids = enc["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1)
    elif ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _check_positive(**kw):
    for name, v in kw.items():
        if v is None or int(v) < 1:
            raise PrehabError(f"{name} must be a positive integer, got {v}")


def _to_batches(windows: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": w.clone(), "attention_mask": torch.ones_like(w)}
            for w in windows.split(batch_size)]


def causal_lm_batches(tokenizer, texts, *, num_samples: int, seq_len: int, batch_size: int = 1,
                      seed: int = 0) -> list[dict]:
    """Calibration batches for a causal LM.

    The texts are joined with ``"\\n\\n"`` and tokenized once (special tokens as the tokenizer adds
    them, e.g. LLaMA's BOS at the very start). ``num_samples`` windows of ``seq_len`` tokens are cut at
    start positions drawn uniformly at random from a ``torch.Generator`` seeded with ``seed`` (windows
    may overlap), as SVD-LLM and AA-SVD calibrate. They are grouped into dicts
    ``{"input_ids": LongTensor[b, seq_len], "attention_mask": ones}`` of ``batch_size`` windows (the
    last may be smaller).
    """
    _check_positive(num_samples=num_samples, seq_len=seq_len, batch_size=batch_size)
    texts = list(texts)
    ids = _token_ids(tokenizer, "\n\n".join(texts))
    n = ids.numel()
    if n < seq_len:
        raise PrehabError(f"calibration text has {n} tokens, need at least seq_len={seq_len}; "
                          "pass more text or lower --seq-len")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seq_len + 1, (num_samples,), generator=g)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return _to_batches(windows, batch_size)


def eval_lm_batches(tokenizer, texts, *, seq_len: int, batch_size: int = 1,
                    max_batches: int | None = None) -> list[dict]:
    """Perplexity batches: the joined text (``"\\n\\n"``) cut into consecutive non-overlapping windows
    of ``seq_len`` tokens (the trailing partial window is dropped, as in the GPTQ/SVD-LLM protocol),
    ``batch_size`` windows a batch, at most ``max_batches`` batches."""
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    if max_batches is not None:
        _check_positive(max_batches=max_batches)
    ids = _token_ids(tokenizer, "\n\n".join(list(texts)))
    n = ids.numel()
    if n < seq_len:
        raise PrehabError(f"evaluation text has {n} tokens, need at least seq_len={seq_len}; "
                          "pass more text or lower --seq-len")
    count = n // seq_len
    if max_batches is not None:
        count = min(count, int(max_batches) * batch_size)
    windows = ids[: count * seq_len].view(count, seq_len)
    return _to_batches(windows, batch_size)


def sentence_batches(tokenizer, texts, *, batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Padded batches for encoders, in the order of ``texts``.

    Each text is truncated to ``max_length`` tokens (special tokens included) and padded to the longest
    in its batch on the tokenizer's ``padding_side`` with its pad token (or, if it has none, its EOS
    token or 0: the attention mask is 0 there). Keys: ``input_ids``, ``attention_mask``, and
    ``token_type_ids`` when the tokenizer produces them.
    """
    _check_positive(batch_size=batch_size, max_length=max_length)
    texts = list(texts)
    if not texts:
        raise PrehabError("no texts to batch")
    if not all(isinstance(t, str) for t in texts):
        raise PrehabError("sentence_batches expects a list of strings")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        pad_id = 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length)
        rows = enc["input_ids"]
        width = max(len(r) for r in rows)
        keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in enc else [])
        batch = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in keys}
        batch["input_ids"].fill_(pad_id)
        for j, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            batch["input_ids"][j, sl] = torch.as_tensor(r, dtype=torch.long)
            mask = enc["attention_mask"][j] if "attention_mask" in enc else [1] * len(r)
            batch["attention_mask"][j, sl] = torch.as_tensor(mask, dtype=torch.long)
            if "token_type_ids" in enc:
                batch["token_type_ids"][j, sl] = torch.as_tensor(enc["token_type_ids"][j], dtype=torch.long)
        out.append(batch)
    return out
