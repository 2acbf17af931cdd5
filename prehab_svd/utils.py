"""Small helpers the rest of the package shares, each written once here.

* :func:`check_keep_ratio` -- the one rule for a keep ratio (the fraction of parameters KEPT), and
  :func:`keep_ratio_list` for one or several;
* :func:`is_causal_config` / :func:`is_causal_model` -- whether a config or a model is a causal LM;
* :func:`set_submodule` -- replace a submodule given by its dotted name;
* :func:`write_atomic` -- write a file that appears whole or not at all;
* :func:`new_folder_next_to` and :func:`replace_folder` -- write a folder under a temporary name, then
  rename it over the destination (the old folder is kept if that fails).

This module imports only the standard library and :mod:`prehab_svd.errors`, so every other module may
import it without an import cycle.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import PrehabError

__all__ = ["check_keep_ratio", "is_keep_ratio", "keep_ratio_list", "is_causal_config", "is_causal_model",
           "set_submodule", "write_atomic", "new_folder_next_to", "replace_folder", "TMP_MARK"]


# --------------------------------------------------------------------------------------------------
# keep_ratio


def is_keep_ratio(keep_ratio) -> bool:
    """True for a real number in (0, 1]: 1 keeps every parameter (a valid, if idle, compression).
    Not a bool, not NaN."""
    return (not isinstance(keep_ratio, bool) and isinstance(keep_ratio, (int, float))
            and not math.isnan(keep_ratio) and 0 < keep_ratio <= 1)


def check_keep_ratio(keep_ratio, name: str = "keep_ratio") -> None:
    """A PrehabError unless ``keep_ratio`` (the fraction of parameters KEPT) is in (0, 1];
    ``name``: how the message calls it (the CLI passes ``--keep-ratio``)."""
    if not is_keep_ratio(keep_ratio):
        raise PrehabError(
            f"{name} must be in (0, 1] (the fraction of parameters kept: 0.6 keeps 60%), got "
            f"{keep_ratio!r}"
        )


def keep_ratio_list(keep_ratio, name: str = "keep_ratio") -> list:
    """``keep_ratio`` (one, or a list or tuple of them) as a list, every one checked."""
    ratios = list(keep_ratio) if isinstance(keep_ratio, (list, tuple)) else [keep_ratio]
    for r in ratios:
        check_keep_ratio(r, name)
    return ratios


# --------------------------------------------------------------------------------------------------
# causal LM or not

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_config(config) -> bool:
    """True when a Hugging Face config names a causal-LM architecture (``*ForCausalLM`` /
    ``*LMHeadModel``) in ``architectures``."""
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)


def is_causal_model(model) -> bool:
    """True for a Hugging Face causal LM: its class is ``*ForCausalLM`` / ``*LMHeadModel``, or its
    config names one and it has output embeddings (an LM head)."""
    if type(model).__name__.endswith(_CAUSAL_SUFFIXES):
        return True
    return is_causal_config(getattr(model, "config", None)) and hasattr(
        model, "get_output_embeddings") and model.get_output_embeddings() is not None


# --------------------------------------------------------------------------------------------------
# modules


def set_submodule(root, name: str, new) -> None:
    """Put the module ``new`` at the dotted ``name`` under ``root`` (``"model.layers.0.mlp.up_proj"``);
    the parent must exist."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


# --------------------------------------------------------------------------------------------------
# files

# Temporary files and folders are named ".<final name>.tmp-<random>" next to their destination, so a
# crash leaves only hidden files that match ".*.tmp-*" (the streaming checkpoint deletes those).
TMP_MARK = ".tmp-"


def write_atomic(path, content) -> Path:
    """Write the file ``path`` so that it appears whole or not at all, never half-written.

    ``content`` is text (written as UTF-8), bytes, or a function ``write(tmp)`` that writes the file
    whose path (a str) it is given. It is written to a temporary file in the same folder, flushed to
    disk, made readable (0644: the temporary file is created private) and renamed over ``path``; on any
    failure the temporary file is removed and ``path`` is left as it was. The folder must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    try:
        if isinstance(content, str):
            content = content.encode("utf-8")
        if isinstance(content, (bytes, bytearray)):
            with open(tmp, "wb") as f:
                f.write(content)
        else:
            content(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextmanager
def new_folder_next_to(path):
    """A new empty folder beside ``path`` (whose parent is created if missing), named like the
    temporary files of :func:`write_atomic`, to be filled and then renamed to ``path``; it is deleted
    if the ``with`` block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new, path) -> None:
    """Rename the finished folder ``new`` to ``path`` (same file system). An existing ``path`` is moved
    aside first and deleted after the rename; if the rename fails it is put back (a PrehabError naming
    where it is kept when even that fails)."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.replace(path, old / "x")
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(new, path)
    except BaseException:  # the new folder did not land: put the old one back
        try:
            os.replace(old / "x", path)
        except OSError:
            raise PrehabError(f"could not replace {path}; the previous folder is kept at {old / 'x'}") from None
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
