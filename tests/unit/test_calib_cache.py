"""Calibration cache: exact round trip, amax recomputed from stored statistics, corrupt files, atomic writes."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import trtquant
from _models import SmallNet, TinyCNN, images
from trtquant.calib_cache import FORMAT_VERSION, fingerprint, load_calibration, save_calibration


def _quantized(cls=SmallNet):
    torch.manual_seed(0)
    return trtquant.quantize(cls().eval())


def _calibrated(method: str = "entropy", cls=SmallNet):
    model = _quantized(cls)
    trtquant.calibrate(model, images(3, 4, seed=11), method=method, progress=False)
    return model


def _amaxes(model):
    return {n: q.amax for n, q in trtquant.quantizers(model).items()}


@functools.lru_cache(maxsize=None)
def _direct(method: str, percentile: float = 99.99):
    """amax of every quantizer after trtquant.calibrate(method=...) on the shared data (computed once)."""
    model = _quantized()
    kw = {"percentile": percentile} if method == "percentile" else {}
    trtquant.calibrate(model, images(3, 4, seed=11), method=method, progress=False, **kw)
    return _amaxes(model)


@pytest.fixture(scope="module")
def _entropy_cache(tmp_path_factory):
    model = _calibrated("entropy")
    path = save_calibration(model, tmp_path_factory.mktemp("cache") / "small.safetensors")
    return model, path.read_bytes()


@pytest.fixture
def cache(_entropy_cache, tmp_path):
    """(the calibrated model - do not modify it, a fresh copy of its cache file)."""
    model, data = _entropy_cache
    path = tmp_path / "small.safetensors"
    path.write_bytes(data)
    return model, path


def test_round_trip_restores_every_amax_exactly(cache):
    model, path = cache
    assert path.is_file()
    fresh = _quantized()
    assert all(q.amax is None for q in trtquant.quantizers(fresh).values())
    load_calibration(fresh, path)
    want, got = _amaxes(model), _amaxes(fresh)
    assert set(want) == set(got) and len(want) >= 7
    for name in want:
        assert want[name] is not None, name
        assert torch.equal(got[name], want[name]), name
    # The statistics came back too: the restored model computes the same amax from them.
    x = images(1, 2, seed=12)[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("method,kw", [("mse", {}), ("percentile", {"percentile": 99.9}), ("max", {})])
def test_recompute_with_another_method_equals_calibrating_with_it(cache, method, kw):
    model, path = cache
    from_cache = load_calibration(_quantized(), path, method=method, **kw)
    a, b = _amaxes(from_cache), _direct(method, **kw)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: cache+{method} {a[name]} vs calibrate({method}) {b[name]}"
    # And at least one activation amax differs from the entropy one that was saved.
    saved = _amaxes(model)
    assert any(not torch.equal(a[n], saved[n]) for n in a if "input_quantizer" in n)


def test_default_path_is_under_calib_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _calibrated("max")
    path = save_calibration(model)
    assert path.parent.name == "calib_cache" and path.suffix == ".safetensors"
    assert fingerprint(model)[:12] in path.name
    load_calibration(_quantized(), path)


# ---- corrupt or mismatched files -----------------------------------------------------------------

def _assert_cache_error(path, match: str, model=None):
    with pytest.raises(trtquant.CacheFileError) as info:
        load_calibration(model if model is not None else _quantized(), path)
    msg = str(info.value)
    assert str(path) in msg, f"the error does not name the file: {msg}"
    assert match in msg, msg
    return msg


def test_missing_file(tmp_path):
    _assert_cache_error(tmp_path / "nope.safetensors", "no such calibration cache")


@pytest.mark.parametrize("keep", [0, 7, 100, "half", "minus_one"])
def test_truncated_file(cache, keep):
    _, path = cache
    data = path.read_bytes()
    n = {"half": len(data) // 2, "minus_one": len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:n])
    _assert_cache_error(path, "truncated or corrupt")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                     .numpy().tobytes())
    _assert_cache_error(path, "truncated or corrupt")


def test_valid_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    _assert_cache_error(path, "not a trtquant calibration cache")
    save_file({"x": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    _assert_cache_error(path, "not a trtquant calibration cache")


def _rewrite(path, **meta_changes):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("version", [str(FORMAT_VERSION + 1), "0", "banana"])
def test_wrong_format_version(cache, version):
    _, path = cache
    _rewrite(path, version=version)
    msg = _assert_cache_error(path, "version")
    assert version in msg


def test_corrupt_quantizer_table(cache):
    _, path = cache
    _rewrite(path, quantizers="{not json")
    _assert_cache_error(path, "corrupt quantizer table")


def test_cache_of_another_model_lists_missing_quantizers(tmp_path):
    path = save_calibration(_calibrated("max", cls=TinyCNN), tmp_path / "tiny.safetensors")
    target = _quantized(SmallNet)
    msg = _assert_cache_error(path, "different model structure", model=target)
    assert "quantizers not in the cache" in msg
    assert "conv1.input_quantizer" in msg  # a SmallNet quantizer TinyCNN does not have
    assert "features.0.input_quantizer" in msg  # and a cache entry SmallNet does not have
    # Nothing was loaded.
    assert all(q.amax is None for q in trtquant.quantizers(target).values())


def test_same_names_other_descriptors_is_a_mismatch(cache):
    _, path = cache
    target = trtquant.quantize(SmallNet().eval(), config=trtquant.QuantConfig(input=trtquant.QuantDescriptor()))
    _assert_cache_error(path, "different descriptors", model=target)


def test_tampered_histogram_is_reported(cache):
    _, path = cache
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("::calib::hist"))
    tensors[key] = tensors[key][:100].clone()
    save_file(tensors, str(path), metadata=meta)
    msg = _assert_cache_error(path, "do not fit its calibrator")
    assert key.split("::")[0] in msg


# ---- atomic writes -------------------------------------------------------------------------------

def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(cache, monkeypatch):
    model, path = cache
    old = path.read_bytes()
    other = _quantized()
    load_calibration(other, path, method="max")
    assert any(not torch.equal(a, b) for a, b in zip(_amaxes(model).values(), _amaxes(other).values()))

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save_calibration(other, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    load_calibration(_quantized(), path)  # still a valid cache

    # Without the failure the new file replaces the old one completely.
    save_calibration(other, path)
    assert path.read_bytes() != old
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    restored = load_calibration(_quantized(), path)
    for name, a in _amaxes(other).items():
        assert torch.equal(_amaxes(restored)[name], a)


def test_cache_stores_statistics_and_fingerprint(cache):
    model, path = cache
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "trtquant-calibration"
    assert meta["fingerprint"] == fingerprint(model)
    info = json.loads(meta["quantizers"])
    assert set(info) == set(trtquant.quantizers(model))
    for name, q in trtquant.quantizers(model).items():
        assert f"{name}::amax" in keys
        kind = q._calibrator.kind
        assert info[name]["calibrator"] == kind
        stats = {"histogram": ("hist", "range"), "max": ("amax",)}[kind]
        for s in stats:
            assert f"{name}::calib::{s}" in keys
