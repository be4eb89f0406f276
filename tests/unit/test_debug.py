"""The layer-wise debugger (trtquant.debug): SQNR per layer in closed form, teacher-forced vs accumulated,
the first divergence of a graph with one corrupted scale, JSON, the plot, auto_fallback's ranking, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trtquant
from _models import TinyCNN, images, randomize_bn
from trtquant.debug import DebugReport, LayerDebug, debug
from trtquant.states import get_state

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return 10 * math.log10(float((ref ** 2).sum()) / float(((ref - got) ** 2).sum()))


def _fq(x: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """INT8 fake quant by hand: scale amax / 127, round half to even, saturate."""
    scale = amax / 127.0
    return np.clip(np.round(x / scale), -128, 127) * scale


def test_sqnr_of_one_linear_matches_the_hand_computation() -> None:
    """One bias-free Linear, max calibration on the data itself: input amax = max|x| (per tensor), weight
    amax = max|W| per output row. Teacher-forced = accumulated = output SQNR (one layer), each quantizer's
    own SQNR likewise in closed form."""
    w = np.array([[0.5, -0.25, 0.1], [0.3, 0.7, -0.2]], np.float32)
    x = np.array([[1.0, -0.3, 0.45], [0.2, 0.9, -2.0], [0.33, 0.61, -0.07]], np.float32)
    m = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.from_numpy(w))
    q = trtquant.quantize(m).eval()
    trtquant.calibrate(q, [torch.from_numpy(x)], method="max", progress=False)
    rep = debug(q, [torch.from_numpy(x)])

    xq = _fq(x.astype(np.float64), np.float64(np.float32(2.0)))
    wq = _fq(w.astype(np.float64), np.abs(w).max(axis=1, keepdims=True).astype(np.float64))
    expected = _sqnr(x @ w.T, xq @ wq.T)
    (layer,) = rep.layers
    assert layer.name == "0" and layer.kind == "Linear" and layer.calls == 1
    assert layer.sqnr_teacher_forced_db == pytest.approx(expected, abs=1e-3)
    assert layer.sqnr_accumulated_db == pytest.approx(expected, abs=1e-3)
    assert rep.output_sqnr_db == pytest.approx(expected, abs=1e-3)
    assert layer.quantizer_sqnr_db["0.input_quantizer"] == pytest.approx(_sqnr(x, xq), abs=1e-3)
    assert layer.quantizer_sqnr_db["0.weight_quantizer"] == pytest.approx(_sqnr(w, wq), abs=1e-3)
    assert rep.worst_layers == ["0"] and rep.num_samples == 3 and rep.runtime is None


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    q = trtquant.quantize(randomize_bn(TinyCNN()).eval()).eval()
    data = images(2, 4)
    trtquant.calibrate(q, data, method="max", progress=False)
    return q, data


def test_teacher_forced_and_accumulated_agree_where_they_must(tiny) -> None:
    """The first layer sees the model input in both passes (accumulated = teacher-forced); the classifier's
    output is the model's (accumulated = output SQNR); execution order; the model's state is untouched."""
    q, data = tiny
    before = {n: t.get_state() for n, t in trtquant.quantizers(q).items()}
    state = get_state(q)
    rep = debug(q, data)
    assert [l.name for l in rep.layers] == ["features.0", "features.3", "features.6", "pool.input_quantizer",
                                            "classifier"]
    first, last = rep.layers[0], rep.layers[-1]
    assert first.sqnr_accumulated_db == pytest.approx(first.sqnr_teacher_forced_db, abs=1e-9)
    assert last.sqnr_accumulated_db == pytest.approx(rep.output_sqnr_db, abs=1e-9)
    for l in rep.layers:
        assert l.calls == 2 and 20 < l.sqnr_teacher_forced_db < 80 and 20 < l.sqnr_accumulated_db < 80, l
    # Deeper layers inherit the error of those before: accumulated below teacher-forced there.
    assert all(l.sqnr_accumulated_db < l.sqnr_teacher_forced_db for l in rep.layers[1:4])
    assert rep.worst_layers[0] == min(rep.layers, key=lambda l: l.sqnr_teacher_forced_db).name
    assert {n: t.get_state() for n, t in trtquant.quantizers(q).items()} == before and get_state(q) == state
    assert not q.training


def _corrupt(path, out, index: int, factor: float = 3.0) -> str:
    """Multiply the scale of the ``index``-th activation QuantizeLinear by ``factor`` (an initializer with the
    dynamo exporter, a Constant node with the legacy one); its DequantizeLinear reads the same constant, as
    a wrong amax would write it. Returns the Q node's name."""
    from trtquant.export.parity import activation_quantize_nodes

    proto = onnx.load(str(path))
    q = activation_quantize_nodes(proto)[index]
    name = q.input[1]
    users = [n for n in proto.graph.node if name in n.input]
    assert {n.op_type for n in users} == {"QuantizeLinear", "DequantizeLinear"}, "the scale must be this Q/DQ's own"
    inits = {i.name: i for i in proto.graph.initializer}
    if name in inits:
        arr = onnx.numpy_helper.to_array(inits[name]) * np.float32(factor)
        inits[name].CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), name))
    else:
        (const,) = [n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] == name]
        attr = const.attribute[0]
        arr = onnx.numpy_helper.to_array(attr.t) * np.float32(factor)
        attr.t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), attr.t.name))
    onnx.save(proto, str(out))
    return q.name


LAYERS = ["features.0", "features.3", "features.6", "pool.input_quantizer", "classifier"]


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    from trtquant.export import export_onnx

    q, data = tiny
    d = tmp_path_factory.mktemp("debug_onnx")
    paths = {}
    for exporter in ("dynamo", "legacy"):
        paths[exporter] = d / f"tiny_{exporter}.onnx"
        export_onnx(q, data[0], paths[exporter], exporter=exporter)
    return paths


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_clean_graph_has_no_divergence(tiny, exported, exporter) -> None:
    q, data = tiny
    rep = debug(q, data, onnx_path=exported[exporter])
    assert rep.runtime == "onnxruntime" and rep.first_divergence is None, rep.format_table()
    assert all(l.runtime_nodes and l.runtime_max_diff == 0 and not l.runtime_flagged for l in rep.layers)
    assert not any("TensorRT" in n for n in rep.notes)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("index", range(5))
def test_a_corrupted_scale_is_named_as_the_first_divergence(tiny, exported, tmp_path, exporter, index) -> None:
    """The acceptance test: one activation QuantizeLinear's scale x3 in the exported graph; the debugger names
    that node's layer as the first divergence and flags no other. (Dynamo node names carry no scope; the
    debugger maps them by their ``pkg.torch.onnx.name_scopes`` - code fit alone pinned a x3 scale on the
    quantizer whose scale is nearest, another layer.)"""
    q, data = tiny
    node = _corrupt(exported[exporter], tmp_path / "bad.onnx", index)
    rep = debug(q, data, onnx_path=tmp_path / "bad.onnx")
    assert rep.first_divergence == LAYERS[index], rep.format_table()
    bad = rep.layer(LAYERS[index])
    assert [l.name for l in rep.layers if l.runtime_flagged] == [LAYERS[index]]
    assert node in bad.runtime_nodes and bad.runtime_share > 0.1 and bad.runtime_max_diff > 1
    assert "<-" in rep.format_table() and rep.layer(LAYERS[index]).sqnr_teacher_forced_db is not None


def test_tensorrt_runtime_is_reported_not_faked(tiny, exported, monkeypatch) -> None:
    """runtime='tensorrt' where TensorRT (or Polygraphy) is absent: ONNX Runtime's parity still runs, and the
    report says TensorRT was not checked - no TensorRT numbers."""
    import sys

    D = sys.modules["trtquant.debug"]  # trtquant.debug is the function; the module is in sys.modules
    monkeypatch.setattr(D, "_tensorrt_missing", lambda: "TensorRT is not installed (test)")
    q, data = tiny
    rep = debug(q, data, onnx_path=exported["dynamo"], runtime="tensorrt")
    assert rep.runtime == "tensorrt" and not rep.tensorrt_checked and rep.first_divergence_tensorrt is None
    assert any(n.startswith("TensorRT NOT checked: TensorRT is not installed") for n in rep.notes)
    assert all(l.tensorrt_sqnr_db is None for l in rep.layers)
    assert "TensorRT vs ORT" not in rep.format_table()


def test_tensorrt_path_plumbing_with_a_stub_polygraphy(tiny, exported, monkeypatch) -> None:
    """The TensorRT path's plumbing only, NOT TensorRT: a stand-in for Polygraphy's loaders and TrtRunner that
    answers with ONNX Runtime's own tensors, one of them (features.6's Q input) scaled x1.5. The marked
    outputs, the profile at the batch's shape and the first TensorRT divergence are what is checked."""
    import sys
    import types

    from trtquant.export.parity import run_with_outputs

    D = sys.modules["trtquant.debug"]
    seen = {}

    class Profile(dict):
        def add(self, name, min, opt, max):
            self[name] = (tuple(min), tuple(opt), tuple(max))
            return self

    class TrtRunner:
        def __init__(self, engine):
            self.engine = engine

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer(self, feed_dict):
            net = self.engine["network"]
            proto = onnx.load_from_string(net["onnx"])
            out = run_with_outputs(proto, {t: onnx.TensorProto.FLOAT for t in net["outputs"]}, feed_dict)
            bad = [n.input[0] for n in proto.graph.node if n.name == seen["bad"]][0]
            out[bad] = out[bad] * 1.5
            return out

    trt = types.ModuleType("polygraphy.backend.trt")
    trt.NetworkFromOnnxBytes = lambda data: {"onnx": data}
    trt.ModifyNetworkOutputs = lambda net, outputs: dict(net, outputs=outputs)
    trt.CreateConfig = lambda **kw: seen.setdefault("config", kw)
    trt.EngineFromNetwork = lambda network, config: {"network": network, "config": config}
    trt.Profile, trt.TrtRunner = Profile, TrtRunner
    monkeypatch.setitem(sys.modules, "polygraphy", types.ModuleType("polygraphy"))
    monkeypatch.setitem(sys.modules, "polygraphy.backend", types.ModuleType("polygraphy.backend"))
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", trt)
    monkeypatch.setattr(D, "_tensorrt_missing", lambda: None)
    q, data = tiny
    from trtquant.export.parity import activation_quantize_nodes

    seen["bad"] = activation_quantize_nodes(onnx.load(str(exported["dynamo"])))[2].name
    rep = debug(q, data, onnx_path=exported["dynamo"], runtime="tensorrt")
    assert rep.tensorrt_checked and rep.first_divergence_tensorrt == "features.6", rep.format_table()
    assert rep.first_divergence is None  # ONNX Runtime's codes are still right
    assert seen["config"]["int8"] and seen["config"]["profiles"][0]["input"] == ((4, 3, 64, 64),) * 3
    assert rep.layer("features.6").tensorrt_sqnr_db < 30 < rep.layer("features.3").tensorrt_sqnr_db
    assert "TensorRT vs ORT" in rep.format_table()


def test_json_round_trip_and_plot(tiny, exported, tmp_path) -> None:
    q, data = tiny
    rep = debug(q, data, onnx_path=exported["dynamo"])
    rep.layers.append(LayerDebug("identical", "TensorQuantizer", ["identical"], 1, math.inf, math.inf))
    text = json.dumps(rep.to_dict(), allow_nan=False)  # strict JSON: inf is written as 'inf'
    d = json.loads(text)
    assert d["layers"][-1]["sqnr_teacher_forced_db"] == "inf" and "runtime_share" in d["layers"][0]
    assert DebugReport.from_dict(d) == rep
    png = tmp_path / "sqnr.png"
    assert rep.plot(png) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_arguments_name_the_fix(tiny) -> None:
    q, data = tiny
    with pytest.raises(ValueError, match="unknown runtime 'tensorrtt'; known: onnxruntime, tensorrt"):
        debug(q, data, runtime="tensorrtt")
    with pytest.raises(ValueError, match="no batches"):
        debug(q, [])
    with pytest.raises(trtquant.TrtQuantError, match="no enabled quantizers"):
        debug(nn.Linear(2, 2), data)


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_auto_fallback_ranks_by_teacher_forced_sqnr() -> None:
    """conv2's channel 0 is 1000x larger and conv3 divides it back (same float function): conv3's per-tensor
    input quantizer flushes the other channels. The debugger ranks conv3 worst, and auto_fallback with
    rank_by='teacher_forced' meets the budget by leaving exactly conv3 in float."""
    torch.manual_seed(0)
    m = Chain().eval()
    with torch.no_grad():
        m.conv2.weight[0] *= 1000.0
        m.conv2.bias[0] *= 1000.0
        m.conv3.weight[:, 0] /= 1000.0
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    with torch.no_grad():
        refs = [m(x) for x in data]
    q = trtquant.quantize(m).eval()
    trtquant.calibrate(q, data, method="max", progress=False)

    def metric(model):
        with torch.no_grad():
            return float(torch.stack([F.cosine_similarity(model(x).flatten(), r.flatten(), dim=0)
                                      for x, r in zip(data, refs)]).mean())

    rep = debug(q, data)
    assert rep.worst_layers[0] == "conv3" and rep.ranking()[0].name == "conv3"
    assert rep.layer("conv3").sqnr_teacher_forced_db < rep.layer("conv2").sqnr_teacher_forced_db - 10
    res = trtquant.auto_fallback(q, data, metric, budget=0.002, rank_by="teacher_forced")
    assert res.met and res.fallback_layers == ["conv3"] and res.ranking[0].name == "conv3"
    assert not q.conv3.input_quantizer.is_enabled and q.conv2.input_quantizer.is_enabled
    with pytest.raises(ValueError, match="rank_by='teacher_forced' needs data"):
        trtquant.auto_fallback(q, None, metric, budget=0.0, rank_by="teacher_forced")


def test_cli_debug_names_the_corrupted_layer(tmp_path, capsys) -> None:
    """quantize -> calibrate -> export -> corrupt one scale -> ``trtquant debug``: exit 1, the layer named, JSON
    and PNG written; the clean graph exits 0."""
    from trtquant.cli.main import main

    ck, cal, path = str(tmp_path / "q.pt"), str(tmp_path / "q_cal.pt"), tmp_path / "tiny.onnx"
    assert main(["quantize", "--model", "_models:TinyCNN", "-o", ck]) == 0
    assert main(["calibrate", ck, "--input-shape", "3,32,32", "--method", "max", "--num-batches", "2",
                 "--batch-size", "4", "--cache", "none", "--quiet", "-o", cal]) == 0
    assert main(["export", cal, "--input-shape", "3,32,32", "--no-check", "-o", str(path)]) == 0
    out = tmp_path / "out.json"
    assert main(["debug", cal, str(path), "--input-shape", "3,32,32", "--num-batches", "1", "--batch-size", "4",
                 "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["first_divergence"] is None
    _corrupt(path, tmp_path / "bad.onnx", 2)
    png = tmp_path / "sqnr.png"
    assert main(["debug", cal, str(tmp_path / "bad.onnx"), "--input-shape", "3,32,32", "--num-batches", "1",
                 "--batch-size", "4", "--quiet", "--json", str(out), "--plot", str(png)]) == 1
    text = capsys.readouterr().out
    assert "| features.6 <- |" in text and "SQNR teacher-forced" in text
    assert json.loads(out.read_text())["first_divergence"] == "features.6" and png.stat().st_size > 0
    assert main(["debug", cal, "--input-shape", "3,32,32", "--num-batches", "1", "--batch-size", "2", "--quiet"]) == 0
