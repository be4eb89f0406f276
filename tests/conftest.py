"""Shared test set-up: markers that skip with a reason, deterministic seeds, torch.nn left unpatched.

Markers (declared in pyproject.toml):
  gpu  - needs a CUDA GPU; skipped where ``torch.cuda.is_available()`` is False.
  trt  - needs the TensorRT Python package and a GPU; skipped where either is missing (type stubs such as
         tensorrt-stubs make ``import tensorrt`` succeed without TensorRT: they do not count).
  slow - longer CPU tests; run by default, deselect with ``-m "not slow"``.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# Keep tests/_models.py importable as ``_models`` however pytest is invoked (any --import-mode).
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def _not_tensorrt(module: object) -> str | None:
    """Why an imported ``tensorrt`` module is not the TensorRT library, or None when it is.

    The ``tensorrt-stubs`` package (type hints only) installs ``tensorrt/__init__.pyi`` and no code,
    so ``import tensorrt`` succeeds with an empty namespace package where TensorRT is absent.
    """
    file = getattr(module, "__file__", None)
    if not file:
        where = ", ".join(getattr(module, "__path__", None) or ["?"])
        return (f"TensorRT is not installed: 'tensorrt' ({where}) is a namespace package without code, "
                "e.g. the type stubs of tensorrt-stubs")
    missing = [name for name in ("__version__", "Builder") if not hasattr(module, name)]
    if missing:
        return f"TensorRT is not installed: 'tensorrt' ({file}) has no {', '.join(missing)}"
    return None


def _tensorrt_missing() -> str | None:
    """Why TensorRT tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "TensorRT tests need a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        module = importlib.import_module("tensorrt")
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"TensorRT Python package not importable: {type(e).__name__}: {e}"
    return _not_tensorrt(module)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    has_cuda = torch.cuda.is_available()
    trt_reason = None
    trt_checked = False
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))
        if item.get_closest_marker("trt") is not None:
            if not trt_checked:
                trt_reason, trt_checked = _tensorrt_missing(), True
            if trt_reason:
                item.add_marker(pytest.mark.skip(reason=trt_reason))


@pytest.fixture(autouse=True)
def _seed_and_unpatched_nn():
    """Every test starts from seed 0 and leaves torch.nn as it found it (quant_modules patches it)."""
    torch.manual_seed(0)
    nn_before = {name: getattr(torch.nn, name) for name in dir(torch.nn) if isinstance(getattr(torch.nn, name), type)}
    yield
    from trtquant import quant_modules

    if quant_modules._originals:
        quant_modules.deactivate()
    for name, cls in nn_before.items():
        if getattr(torch.nn, name) is not cls:  # pragma: no cover - a test patched torch.nn by hand
            setattr(torch.nn, name, cls)
