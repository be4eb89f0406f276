"""The TensorRT detection of tests/conftest.py: type stubs are not TensorRT."""

from __future__ import annotations

import importlib
import types

import pytest

import conftest


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def test_namespace_package_of_stubs_is_not_tensorrt() -> None:
    stubs = _module("tensorrt", __file__=None, __path__=["/site-packages/tensorrt"])
    reason = conftest._not_tensorrt(stubs)
    assert reason is not None and "namespace package" in reason and "/site-packages/tensorrt" in reason


def test_module_without_builder_or_version_is_not_tensorrt() -> None:
    reason = conftest._not_tensorrt(_module("tensorrt", __file__="/x/tensorrt/__init__.py"))
    assert reason is not None and "__version__, Builder" in reason


def test_real_looking_module_is_tensorrt() -> None:
    trt = _module("tensorrt", __file__="/x/tensorrt/__init__.py", __version__="10.13.0", Builder=object)
    assert conftest._not_tensorrt(trt) is None


def test_installed_tensorrt_module_is_judged_by_its_contents() -> None:
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        pytest.skip("no 'tensorrt' module at all")
    real = bool(getattr(trt, "__file__", None)) and hasattr(trt, "Builder") and hasattr(trt, "__version__")
    assert (conftest._not_tensorrt(trt) is None) == real
