"""Explicit state objects: the calibration session, the shared quantization result, the export mode
and the settings object (no module globals, no attributes on tensors)."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch

import trtquant
from trtquant import settings
from trtquant.calib.histogram import HistogramCalibrator
from trtquant.calib.max import MaxCalibrator
from trtquant.calibrate import CalibrationSession, quantizers
from trtquant.export.onnx import export_mode
from trtquant.quantizer import ExportMode, SharedQuantResult, TensorQuantizer

from _models import SmallNet, images


@pytest.fixture
def fresh_settings(monkeypatch):
    """get_settings() reads the (monkeypatched) environment again; the old settings come back afterwards."""
    monkeypatch.setattr(settings, "_current", None)
    return monkeypatch


def _count_collects(monkeypatch) -> list:
    calls: list = []
    for cls in (HistogramCalibrator, MaxCalibrator):
        orig = cls.collect

        def counting(self, x, _orig=orig):
            calls.append(self)
            return _orig(self, x)

        monkeypatch.setattr(cls, "collect", counting)
    return calls


def _manual_calibrate(model, data, method="entropy") -> None:
    """pytorch-quantization's flow: enable_calib on each quantizer, run data, load_calib_amax - no session."""
    qs = [q for q in quantizers(model).values() if q.is_enabled and q._calibrator is not None]
    for q in qs:
        q._calibrator.reset()
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        for x in data:
            model(x)
    for q in qs:
        assert q.calib_session is None
        q.load_calib_amax("max" if isinstance(q._calibrator, MaxCalibrator) else method)
        q.disable_calib()
        q.enable_quant()


def test_session_shares_binning_and_gives_the_amax_of_a_run_without_one(monkeypatch):
    data = images(3, batch=2)
    base = trtquant.quantize(SmallNet().eval())
    a, b = copy.deepcopy(base), copy.deepcopy(base)

    calls = _count_collects(monkeypatch)
    trtquant.calibrate(a, data, method="entropy", progress=False)
    with_session = len(calls)
    calls.clear()
    _manual_calibrate(b, data)
    without = len(calls)
    # conv2's input quantizer and the residual quantizer read one tensor: binned once per batch in a session.
    assert with_session == without - len(data)
    qa, qb = quantizers(a), quantizers(b)
    assert qa.keys() == qb.keys()
    for n in qa:
        if qa[n].amax is None:
            assert qb[n].amax is None, n
        else:
            assert torch.equal(qa[n].amax, qb[n].amax), n
    # The session is closed: no quantizer still reports to it.
    assert all(q.calib_session is None for q in qa.values())


def test_session_alias_resolves_on_close_and_breaks_on_new_data():
    qa, qb = TensorQuantizer(), TensorQuantizer()
    for q in (qa, qb):
        q.disable_quant()
        q.enable_calib()
    x = torch.randn(4, 8)
    with CalibrationSession([qa, qb]) as session:
        qa(x)
        qb(x)
        assert session.aliases == {qb: qa._calibrator}
        assert qb._calibrator.num_batches == 0  # not binned twice
    assert qb.calib_session is None and not session.aliases
    assert torch.equal(qb._calibrator.compute_amax(), qa._calibrator.compute_amax())
    # A different tensor later: qb collects by itself from its (copied) statistics.
    y = torch.randn(4, 8) * 3
    with CalibrationSession([qa, qb]):
        qa(x)
        qb(y)
    solo = TensorQuantizer()
    solo.disable_quant()
    solo.enable_calib()
    solo(x)
    solo(y)
    assert torch.equal(qb._calibrator.compute_amax(), solo._calibrator.compute_amax())


def test_set_state_calibrate_shares_binning_per_forward(monkeypatch):
    data = images(2, batch=2)
    base = trtquant.quantize(SmallNet().eval())
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    calls = _count_collects(monkeypatch)
    trtquant.set_state(a, "calibrate")
    with torch.no_grad():
        for x in data:
            a(x)
    shared = len(calls)
    trtquant.compute_amax(a, method="entropy")
    _manual_calibrate(b, data)
    assert shared < len(calls) - shared
    for n, q in quantizers(a).items():
        other = quantizers(b)[n]
        assert (q.amax is None and other.amax is None) or torch.equal(q.amax, other.amax), n


def test_no_attribute_is_left_on_any_tensor_and_the_block_input_is_quantized_once():
    model = trtquant.quantize(SmallNet().eval())
    trtquant.calibrate(model, images(2, batch=2), method="max", progress=False)
    seen: list = []
    outs: dict = {}

    def record(name):
        def hook(module, inputs, output):
            seen.extend(t for t in inputs if isinstance(t, torch.Tensor))
            if isinstance(output, torch.Tensor):
                seen.append(output)
                outs[name] = output
        return hook

    for name, m in model.named_modules():
        m.register_forward_hook(record(name))
    x = images(1, batch=2)[0]
    with torch.no_grad():
        y = model(x)
    assert seen and all(t.__dict__ == {} for t in seen + [x, y])
    groups = trtquant.placement.fx_pass.placement_state(model).shared_inputs
    assert groups, "placement found no quantizers sharing a tensor in SmallNet"
    for group in groups:
        slots = {id(model.get_submodule(n).shared_result) for n in group}
        assert len(slots) == 1
        assert outs[group[0]] is outs[group[1]]  # the second reused the first's result
    # Bit-exact with quantizing again, and the slot let go of the activation once both read it.
    for group in groups:
        q = model.get_submodule(group[0])
        assert q.shared_result._out is None


def test_shared_result_misses_on_an_in_place_change():
    slot = SharedQuantResult(2)
    a, b = TensorQuantizer(), TensorQuantizer()
    for q in (a, b):
        q.amax = 1.0
        q.shared_result = slot
    x = torch.randn(2, 8)
    with torch.no_grad():
        ya = a(x)
        x.mul_(0.5)  # the input changed: the second quantizer must not reuse the first result
        yb = b(x)
    assert yb is not ya and torch.equal(yb, trtquant.functional.fake_quant(x, torch.tensor(1.0)))
    assert x.__dict__ == {}


def test_shared_slots_survive_deepcopy_and_pickle_empty():
    model = trtquant.quantize(SmallNet().eval())
    groups = trtquant.placement.fx_pass.placement_state(model).shared_inputs
    work = copy.deepcopy(model)
    for group in groups:
        slots = {id(work.get_submodule(n).shared_result) for n in group}
        assert len(slots) == 1 and work.get_submodule(group[0]).shared_result is not \
            model.get_submodule(group[0]).shared_result
    restored = pickle.loads(pickle.dumps(SharedQuantResult(3)))
    assert restored.size == 3 and restored._out is None


def test_export_mode_is_typed_and_reset_after_an_exception():
    model = trtquant.quantize(SmallNet().eval())
    trtquant.calibrate(model, images(1, batch=2), method="max", progress=False)
    active = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled and q._if_quant]
    with pytest.raises(RuntimeError, match="boom"):
        with export_mode(model):
            modes = [q.export_mode for q in active]
            assert all(isinstance(m, ExportMode) for m in modes)
            with pytest.raises(dataclasses.FrozenInstanceError):
                modes[0].axis = 3  # type: ignore[misc]
            raise RuntimeError("boom")
    assert all(q.export_mode is None for q in model.modules() if isinstance(q, TensorQuantizer))
    # Export-mode Q/DQ equals fake quantization for a per-tensor quantizer.
    q = next(q for q in active if not q.quant_desc.per_channel)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        expected = q(x)
        q.export_mode = ExportMode.of(q)
        try:
            got = q(x)
        finally:
            q.export_mode = None
    assert torch.equal(got, expected)


def test_settings_read_the_environment_and_aliases(fresh_settings, tmp_path):
    mp = fresh_settings
    for name in ("TRTQUANT_CACHE_DIR", "TRTQUANT_TEST_BUILD_DELAY_S", "TRTQUANT_SERVICE_BACKEND"):
        mp.delenv(name, raising=False)
    mp.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    mp.setenv("TRTQUANT_FUSED_KERNELS", "0")
    mp.setenv("TRTQUANT_NATIVE_HISTOGRAM", "0")
    mp.setenv("CC", "my-cc")
    mp.setenv("TRTQUANT_SERVICE_TEST_BUILD_DELAY_S", "2.5")  # the service's existing name
    mp.setenv("TRTQUANT_SERVICE_TOKEN", "s3cret")
    s = settings.get_settings()
    assert s is settings.get_settings()  # read once
    assert not s.fused_kernels and not s.native_histogram and s.cc == "my-cc"
    assert s.test_build_delay_s == 2.5 and s.service_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert s.cache_root == tmp_path / "xdg" / "trtquant"
    from trtquant._io import cache_dir
    from trtquant.functional import KERNELS

    # Follow the settings, whatever another test's monkeypatch of ``KERNELS.enabled`` restored.
    mp.setattr(KERNELS, "_enabled", None)
    assert cache_dir() == tmp_path / "xdg" / "trtquant"
    assert KERNELS.enabled is False

    mp.setenv("TRTQUANT_CACHE_DIR", str(tmp_path / "own"))
    mp.delenv("TRTQUANT_SERVICE_TEST_BUILD_DELAY_S")
    mp.setenv("TRTQUANT_TEST_BUILD_DELAY_S", "1")  # the field's own name
    mp.setenv("TRTQUANT_SERVICE_BACKEND", " ONNXRuntime ")
    mp.setenv("TRTQUANT_FUSED_KERNELS", "1")
    assert settings.get_settings().test_build_delay_s == 2.5  # cached until reloaded
    s = settings.reload_settings()
    assert s.cache_root == tmp_path / "own" and s.test_build_delay_s == 1.0
    assert s.service_backend == "onnxruntime" and s.fused_kernels
    with settings.override_settings(fused_kernels=False):
        assert KERNELS.enabled is False
    assert KERNELS.enabled is True


def test_service_reads_its_variables_through_the_settings(fresh_settings, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("onnxruntime")
    from trtquant.service.app import ServiceConfig
    from trtquant.service.backends import OnnxRuntimeBackend, select_backend

    fresh_settings.setenv("TRTQUANT_SERVICE_TEST_BUILD_DELAY_S", "0.25")
    fresh_settings.setenv("TRTQUANT_SERVICE_BACKEND", "onnxruntime")
    assert ServiceConfig.from_env(tmp_path).build_delay_s == 0.25
    assert isinstance(select_backend(), OnnxRuntimeBackend)
