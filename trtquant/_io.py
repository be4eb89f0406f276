"""Atomic file writes shared by every artifact and cache trtquant writes, and where the caches live."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union


def atomic_write_bytes(path: Union[str, "os.PathLike[str]"], data: Any) -> Path:
    """Write ``data`` (bytes or any buffer, e.g. TensorRT's IHostMemory) to ``path`` atomically.

    A temp file in the same folder, fsync, ``os.replace``: readers see the old file or the complete
    new one, never a torn engine, cache or checkpoint, even when the process dies mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: Union[str, "os.PathLike[str]"], text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def cache_dir() -> Path:
    """trtquant's per-user cache (trained models, compiled kernels): ``$TRTQUANT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/trtquant`` or ``~/.cache/trtquant`` (never in git); read through :mod:`trtquant.settings`."""
    from .settings import get_settings

    return get_settings().cache_root
