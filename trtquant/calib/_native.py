"""The CPU histogram kernel (_native_hist.c): compiled on first use with the system C compiler.

A pure-Python wheel cannot ship a binary for every CPU, and this kernel is 60 lines of C with no
dependency, so it is built once per machine (~1 s) into the trtquant cache directory and loaded
with ctypes. Without a compiler (or with ``TRTQUANT_NATIVE_HISTOGRAM=0``) calibration falls back to
torch.histc: identical counts, about 5x slower.

The loaded library (``_lib``, with ``_tried`` and ``_lock``) is this module's one deliberate global:
a shared library is loaded once per process by the dynamic linker anyway, and loading (or failing
to) is idempotent. Tests reset ``_lib``/``_tried`` to load again. The switch and the compiler come
from :mod:`trtquant.settings` (read at the moment of loading).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._io import cache_dir
from ..settings import get_settings

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_native_hist.c")
_lib: Optional[ctypes.CDLL] = None
_tried = False
_lock = threading.Lock()


class HistStats(NamedTuple):
    max_abs: float  # over finite values
    zeros: int
    over: int  # finite values above the range: not counted
    nonfinite: int  # NaN/inf: not counted


def _compiler() -> Optional[str]:
    cc = get_settings().cc or (sysconfig.get_config_var("CC") or "").split(" ")[0] or "cc"
    return shutil.which(cc) or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    try:
        for flags in (["-fopenmp"], []):  # without OpenMP: one thread, still one read of x
            cmd = [cc, "-O3", "-fno-trapping-math", "-shared", "-fPIC", *flags, "-o", tmp, str(_SOURCE)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[:500]}")
        os.replace(tmp, out)  # atomic: a concurrent process loads either nothing or a whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return ""


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (no compiler, build error, or disabled): callers fall back."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            _lib = _load()
            _tried = True
    return _lib


def _load() -> Optional[ctypes.CDLL]:
    if not get_settings().native_histogram or sys.platform == "win32":
        return None
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler found: CPU histograms use torch.histc (slower)")
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + platform.machine().encode() + cc.encode()
                         + _compiler_version(cc).encode()).hexdigest()[:16]
    path = cache_dir() / "native" / f"abs_histogram-{key}.so"
    try:
        if not path.is_file():
            _build(cc, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a stale or foreign build (a cache shared between machines): rebuild once
            _build(cc, path)
            lib = ctypes.CDLL(str(path))
        fn = lib.trtq_abs_histogram_f32
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p,
                       ctypes.c_int32, ctypes.c_void_p]
        return lib
    except Exception as e:  # never fail calibration over the fast path
        logger.warning("CPU histogram kernel unavailable (%s); using torch.histc", e)
        return None


def dense_view(x: Tensor) -> Optional[Tensor]:
    """``x`` itself when its elements fill one dense block (any dim order), else None."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return None


def abs_histogram(x: Tensor, nbins: int, range_: float, counts: Tensor) -> HistStats:
    """Add the histogram of |x| over [0, range_] to ``counts`` (int64, CPU, contiguous); one read of x."""
    lib = load()
    assert lib is not None and x.dtype == torch.float32 and x.device.type == "cpu"
    assert counts.dtype == torch.int64 and counts.is_contiguous() and counts.numel() == nbins
    dense = dense_view(x)
    if dense is None:
        dense = x.contiguous()
    stats = torch.zeros(4, dtype=torch.float64)
    rc = lib.trtq_abs_histogram_f32(dense.data_ptr(), dense.numel(), nbins, range_, counts.data_ptr(),
                                    torch.get_num_threads(), stats.data_ptr())
    if rc != 0:
        raise MemoryError("CPU histogram kernel: out of memory")
    s = stats.tolist()
    return HistStats(s[0], int(s[1]), int(s[2]), int(s[3]))
