"""TensorRT's legacy (implicit INT8) calibration cache: header, hex float32 scales, round trip, malformed files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

import trtquant
import trtquant.calib_cache as calib_cache
from trtquant.calib_cache import read_trt_cache, trt_version_number, write_trt_cache


def _scale(amax: float) -> float:
    """scale = amax / 127 in float32, as TensorRT stores it."""
    return float(np.float32(amax) / np.float32(127))


def _hex(value: float) -> str:
    return struct.pack(">f", value).hex()


def _lines(path) -> list:
    return path.read_text().splitlines()


@pytest.mark.parametrize("version,header", [
    ("8.6.1", "TRT-8601-EntropyCalibration2"),
    ("8.5.3", "TRT-8503-EntropyCalibration2"),
    ("10.3.0", "TRT-100300-EntropyCalibration2"),
    ("10.13.2", "TRT-101302-EntropyCalibration2"),
])
def test_header_encodes_the_tensorrt_version(tmp_path, version, header):
    path = write_trt_cache({"input": 0.02}, tmp_path / "calib.cache", trt_version=version)
    assert _lines(path)[0] == header


def test_version_numbers():
    assert trt_version_number("8.6.1") == 8601
    assert trt_version_number("10.3.0") == 100300
    assert trt_version_number("10.0") == 100000


def test_lines_are_hex_of_float32_big_endian_scale(tmp_path):
    amaxes = {"input": 2.640625, "/conv1/Conv_output_0": 127 * 2.0 ** -6, "x.3": 1.0, "relu:0": 6.0}
    path = write_trt_cache({k: _scale(a) for k, a in amaxes.items()}, tmp_path / "calib.cache", "8.6.1")
    lines = _lines(path)
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    assert lines[1:] == [f"{k}: {_hex(_scale(a))}" for k, a in amaxes.items()]
    # Known values, independent of the helper above.
    assert lines[1] == "input: 3caa54a9"  # 2.640625 / 127 = 0.020792322 -> 0x3caa54a9
    assert lines[2] == "/conv1/Conv_output_0: 3c800000"  # 2^-6, exact
    assert lines[3] == "x.3: 3c010204"  # 1/127
    assert struct.unpack(">f", bytes.fromhex("3caa54a9"))[0] == np.float32(2.640625) / np.float32(127)


def test_round_trip_gives_amax_back_within_one_ulp_of_the_scale(tmp_path):
    g = torch.Generator().manual_seed(0)
    amaxes = {f"t{i}": float(a) for i, a in enumerate(torch.rand(200, generator=g).float() * 50 + 1e-3)}
    amaxes["tiny"] = 1e-20
    amaxes["huge"] = 3e30
    amaxes["name:with:colons"] = 0.5
    path = write_trt_cache({k: _scale(a) for k, a in amaxes.items()}, tmp_path / "calib.cache")
    back = read_trt_cache(path)
    assert list(back) == list(amaxes)
    for name, amax in amaxes.items():
        tol = 127 * np.spacing(np.float32(_scale(amax)))
        assert abs(back[name] - amax) <= tol, (name, amax, back[name])
        # The stored scale survives to float32 rounding.
        assert np.float32(back[name]) / np.float32(127) == pytest.approx(np.float32(_scale(amax)), rel=2e-7)


def test_zero_scale_writes_0_and_reads_back_0(tmp_path):
    path = write_trt_cache({"dead": 0.0, "live": _scale(1.0)}, tmp_path / "calib.cache")
    assert _lines(path)[1] == "dead: 0"
    assert read_trt_cache(path) == {"dead": 0.0, "live": pytest.approx(1.0, rel=1e-6)}


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_invalid_scales_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="scale of t"):
        write_trt_cache({"t": bad}, tmp_path / "calib.cache")
    assert not (tmp_path / "calib.cache").exists()


def test_tensorrt_written_cache_without_leading_zeros(tmp_path):
    # TensorRT prints the hex without padding: a tiny scale can have fewer than 8 digits.
    path = tmp_path / "calib.cache"
    path.write_text("TRT-8601-EntropyCalibration2\ninput: 3c010204\nsmall: 1\n")
    back = read_trt_cache(path)
    assert back["input"] == pytest.approx(1.0, rel=1e-6)
    assert back["small"] == pytest.approx(struct.unpack(">f", bytes.fromhex("00000001"))[0] * 127, rel=1e-6)


# ---- malformed files ------------------------------------------------------------------------------

@pytest.mark.parametrize("body,lineno", [
    ("input: 3c010204\nno colon here\n", 3),
    ("input: 3c010204\nx: 3c01020g\n", 3),
    ("x: not-hex\n", 2),
    (": 3c010204\n", 2),
])
def test_malformed_line_names_file_and_line(tmp_path, body, lineno):
    path = tmp_path / "calib.cache"
    path.write_text("TRT-8601-EntropyCalibration2\n" + body)
    with pytest.raises(trtquant.CacheFileError) as info:
        read_trt_cache(path)
    assert f"{path}:{lineno}:" in str(info.value)


@pytest.mark.parametrize("text", ["", "input: 3c010204\n", "\x00\x01binary"])
def test_missing_header(tmp_path, text):
    path = tmp_path / "calib.cache"
    path.write_text(text)
    with pytest.raises(trtquant.CacheFileError, match="header"):
        read_trt_cache(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "calib.cache"
    path.write_bytes(b"TRT-8601-EntropyCalibration2\n\xff\xfe: 3c010204\n")
    with pytest.raises(trtquant.CacheFileError, match=str(path)):
        read_trt_cache(path)
    with pytest.raises(trtquant.CacheFileError, match="cannot read"):
        read_trt_cache(tmp_path / "missing.cache")


# Known bugs in read_trt_cache (reported with a patch; remove the markers when it is applied).
def test_overlong_hex_is_a_cache_error(tmp_path):
    path = tmp_path / "calib.cache"
    path.write_text("TRT-8601-EntropyCalibration2\nx: 3c01020400\n")
    with pytest.raises(trtquant.CacheFileError, match=f"{path}:2:"):
        read_trt_cache(path)


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "calib.cache"
    path.write_text("TRT-8601-EntropyCalibration2\n\nx: 3c010204\n\nbroken\n")
    with pytest.raises(trtquant.CacheFileError, match=f"{path}:5:"):
        read_trt_cache(path)


@pytest.mark.parametrize("value", ["", "bf800000", "7fc00000", "7f800000"])
def test_empty_or_invalid_scale_is_a_cache_error(tmp_path, value):
    path = tmp_path / "calib.cache"
    path.write_text(f"TRT-8601-EntropyCalibration2\nx: {value}\n")
    with pytest.raises(trtquant.CacheFileError, match=f"{path}:2:"):
        read_trt_cache(path)


# ---- export_trt_cache(onnx_path, cache_path, trt_version) / import_trt_cache ----------------------

def test_export_and_import_are_public_api():
    """The functions the tests below use exist under these names (a rename must fail, not skip)."""
    assert callable(calib_cache.export_trt_cache) and callable(calib_cache.import_trt_cache)
    assert callable(trtquant.calib_cache.read_trt_cache) and callable(trtquant.calib_cache.write_trt_cache)


def test_export_trt_cache_from_qdq_onnx(tmp_path):
    """One line per activation QuantizeLinear input tensor, scale taken from the ONNX graph."""
    # A rename or removal fails here (AttributeError), it is not a skip: the API is implemented and documented.
    export_trt_cache = calib_cache.export_trt_cache
    import onnx  # a dependency of trtquant: missing is an error, not a skip

    from _models import SmallNet, images
    from trtquant.export.onnx import export_onnx
    from trtquant.graph.index import GraphIndex

    torch.manual_seed(0)
    model = trtquant.quantize(SmallNet().eval())
    trtquant.calibrate(model, images(2, 4, seed=3), method="max", progress=False)
    onnx_path = export_onnx(model, images(1, 1)[0], tmp_path / "small.onnx", exporter="legacy").path
    cache_path = tmp_path / "small.cache"
    export_trt_cache(onnx_path, cache_path, "10.3.0")

    proto = onnx.load(str(onnx_path))
    graph = GraphIndex(proto)
    want = {n.input[0]: float(graph.const(n.input[1])) for n in graph.nodes
            if n.op_type == "QuantizeLinear" and graph.const(n.input[0]) is None}
    assert want and "input" in want

    lines = _lines(cache_path)
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert sorted(line.rpartition(":")[0] for line in lines[1:]) == sorted(want)
    for line in lines[1:]:
        name, _, value = line.rpartition(":")
        assert value.strip() == _hex(want[name]), name  # the exact float32 bits of the ONNX scale
    back = read_trt_cache(cache_path)
    # Every activation amax of the model appears, and nothing else.
    model_amax = sorted({float(q.amax) for n, q in trtquant.quantizers(model).items()
                         if q.is_enabled and q._if_quant and "weight" not in n})
    got = sorted(set(back.values()))
    assert len(got) == len(model_amax)
    for a, b in zip(got, model_amax):
        assert a == pytest.approx(b, rel=1e-6)


def test_import_trt_cache_round_trip(tmp_path):
    """export_trt_cache -> import_trt_cache into a fresh model: every activation amax back to float32 rounding."""
    export_trt_cache = calib_cache.export_trt_cache  # AttributeError on a rename: fails, never skips
    import_trt_cache = calib_cache.import_trt_cache
    from _models import SmallNet, images
    from trtquant.export.onnx import export_onnx

    def quantized():
        torch.manual_seed(0)
        return trtquant.quantize(SmallNet().eval())

    model = quantized()
    trtquant.calibrate(model, images(2, 4, seed=3), method="entropy", progress=False)
    onnx_path = export_onnx(model, images(1, 1)[0], tmp_path / "small.onnx", exporter="legacy").path
    cache_path = tmp_path / "small.cache"
    export_trt_cache(onnx_path, cache_path, "8.6.1")
    assert _lines(cache_path)[0] == "TRT-8601-EntropyCalibration2"

    fresh = quantized()
    applied = import_trt_cache(fresh, cache_path, onnx_path)
    original = trtquant.quantizers(model)
    assert applied and all("weight" not in n for n in applied)
    for name, amax in applied.items():
        want = original[name].amax
        assert abs(amax - float(want)) <= 127 * float(np.spacing(np.float32(float(want) / 127))), name
        assert torch.equal(trtquant.quantizers(fresh)[name].amax, torch.tensor(amax, dtype=torch.float32))
    # Every activation quantizer got its tensor's amax (quantizers sharing a tensor share a line).
    assert set(applied) == {n for n, q in original.items()
                            if q.is_enabled and q._if_quant and not q.quant_desc.per_channel}
    assert len(applied) >= len(read_trt_cache(cache_path))

    other = tmp_path / "other.cache"
    write_trt_cache({"no_such_tensor": 0.01}, other)
    with pytest.raises(trtquant.CacheFileError, match="no tensor name matched"):
        import_trt_cache(quantized(), other, onnx_path)


def test_import_trt_cache_reaches_quantizers_that_share_a_tensor(tmp_path, caplog):
    """ResNet-18: a block output feeds the next conv1 and the next identity; export merges their two
    identical Q/DQ pairs into one, and the cache has one line for it. Both quantizers get the amax."""
    import torchvision  # dependencies of trtquant: missing is an error, not a skip

    from trtquant.export.onnx import export_onnx

    def quantized():
        torch.manual_seed(0)
        return trtquant.quantize(torchvision.models.resnet18().eval())

    model = quantized()
    trtquant.calibrate(model, [torch.randn(2, 3, 64, 64)], method="max", progress=False)
    onnx_path = export_onnx(model, torch.zeros(1, 3, 64, 64), tmp_path / "r18.onnx", exporter="legacy").path
    cache_path = tmp_path / "r18.cache"
    calib_cache.export_trt_cache(onnx_path, cache_path, "10.3.0")
    fresh = quantized()
    with caplog.at_level("WARNING"):
        applied = calib_cache.import_trt_cache(fresh, cache_path, onnx_path)
    assert "got no amax" not in caplog.text
    wanted = {n for n, q in trtquant.quantizers(model).items()
              if q.is_enabled and q._if_quant and not q.quant_desc.per_channel}
    assert len(read_trt_cache(cache_path)) < len(wanted)  # some tensors are shared
    assert set(applied) == wanted
    for name in wanted:
        a, b = float(trtquant.quantizers(fresh)[name].amax), float(trtquant.quantizers(model)[name].amax)
        assert a == pytest.approx(b, rel=1e-6), name
