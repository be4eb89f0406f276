"""Layer-wise quantization debugger: where fake quant loses accuracy, and where a runtime departs from it.

:func:`debug` walks the quantized layers of a calibrated model (the groups of
:func:`trtquant.sensitivity.quant_groups`: a Conv/Linear with its input and weight quantizers, or a
stand-alone quantizer) on a few batches and reports, per layer:

* **teacher-forced SQNR**: the layer run with only its own quantizers on, on the input it receives
  in the FP32 model, against its FP32 output. The error this layer adds by itself.
* **accumulated SQNR**: the layer's output in the fully fake-quantized model against the FP32 model,
  same model input. The error that reaches this point from every layer before it.
* **runtime parity** (given the exported ONNX): the teacher-forced code parity of
  :func:`trtquant.export.parity.teacher_forced` - each activation QuantizeLinear on ONNX Runtime's
  own float input, requantized in torch - per layer. The first layer, in graph order, whose codes
  differ beyond rounding is ``first_divergence``: a wrong scale, zero point or placement there.
  With ``runtime='tensorrt'`` and TensorRT plus Polygraphy installed, Polygraphy's runners also run
  the graph in TensorRT with every activation Q input marked as an output, compared with ONNX
  Runtime's tensors; without them the report says TensorRT was not checked.

``SQNR = 10 log10(sum(ref^2) / sum((ref - q)^2))`` in dB over all batches and output tensors; inf
when the two are identical. :meth:`DebugReport.ranking` feeds
:func:`trtquant.sensitivity.auto_fallback` (``rank_by='teacher_forced'``).
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .calibrate import _model_device, _progress, _to_device, quantizers, run_batch
from .errors import QuantizerNotCalibratedError, TrtQuantError
from .outputs import output_tensors
from .sensitivity import LayerSensitivity, _materialise, _only, _sqnr, quant_groups
from .states import preserved

logger = logging.getLogger(__name__)

__all__ = ["LayerDebug", "DebugReport", "debug"]

RUNTIMES = ("onnxruntime", "tensorrt")


@dataclass
class LayerDebug:
    """One quantized layer (or stand-alone quantizer); SQNR in dB, None where not measured."""

    name: str
    kind: str  # 'Conv2d', 'Linear', ... 'TensorQuantizer'; 'runtime only' for a graph node with no model layer
    quantizers: List[str]
    calls: int = 0  # times the layer ran on the data (0: never reached, no SQNR)
    sqnr_teacher_forced_db: Optional[float] = None
    sqnr_accumulated_db: Optional[float] = None
    quantizer_sqnr_db: Dict[str, float] = field(default_factory=dict)  # each quantizer on its own FP32 input
    runtime_nodes: List[str] = field(default_factory=list)  # the activation QuantizeLinear nodes of this layer
    runtime_codes: int = 0
    runtime_mismatched: int = 0
    runtime_max_diff: Optional[int] = None  # None: not checked (no ONNX given, or no Q node of this layer)
    runtime_flagged: bool = False
    tensorrt_sqnr_db: Optional[float] = None  # TensorRT's Q-input tensors against ONNX Runtime's (lowest node)

    @property
    def runtime_share(self) -> float:
        """Fraction of this layer's codes that differ from the runtime's."""
        return self.runtime_mismatched / self.runtime_codes if self.runtime_codes else 0.0


@dataclass
class DebugReport:
    """What :func:`debug` found; ``layers`` in execution order (graph order for runtime-only rows)."""

    layers: List[LayerDebug]
    num_samples: int
    output_sqnr_db: Optional[float]  # the model's outputs, fully fake-quantized vs FP32
    worst_layers: List[str]  # lowest teacher-forced SQNR first
    runtime: Optional[str] = None  # 'onnxruntime' / 'tensorrt'; None: no ONNX given
    onnx_path: Optional[str] = None
    first_divergence: Optional[str] = None  # first layer (graph order) whose runtime codes differ beyond rounding
    runtime_tolerance: float = 1e-4  # share of differing codes allowed per Q node (any diff > 1 code is flagged)
    tensorrt_checked: bool = False
    first_divergence_tensorrt: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def layer(self, name: str) -> LayerDebug:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no layer '{name}' in the report; layers: {', '.join(l.name for l in self.layers)}")

    def ranking(self) -> List[LayerSensitivity]:
        """Layers with a teacher-forced SQNR, lowest first, as :func:`trtquant.sensitivity.sensitivity` ranks
        them (for :func:`~trtquant.sensitivity.auto_fallback`'s ``ranking``)."""
        rows = [l for l in self.layers if l.sqnr_teacher_forced_db is not None]
        rows.sort(key=lambda l: l.sqnr_teacher_forced_db)  # type: ignore[arg-type,return-value]
        return [LayerSensitivity(l.name, l.kind, list(l.quantizers), l.sqnr_teacher_forced_db, None) for l in rows]

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON data; infinite SQNR (identical tensors) is written as the string 'inf'."""
        d = _finite(asdict(self))
        for l, ld in zip(self.layers, d["layers"]):
            ld["runtime_share"] = l.runtime_share
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DebugReport":
        d = _infinite(dict(d))
        names = {f.name for f in fields(LayerDebug)}
        layers = [LayerDebug(**{k: v for k, v in ld.items() if k in names}) for ld in d.pop("layers")]
        return cls(layers=layers, **{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    def summary(self) -> str:
        parts = [f"{len(self.layers)} layers on {self.num_samples} sample(s); output SQNR {_db(self.output_sqnr_db)} dB"]
        if self.worst_layers:
            parts.append("lowest teacher-forced SQNR: " + ", ".join(
                f"{n} ({_db(self.layer(n).sqnr_teacher_forced_db)} dB)" for n in self.worst_layers))
        if self.runtime is not None:
            parts.append(f"first divergence from ONNX Runtime: {self.first_divergence or 'none'}")
        if self.tensorrt_checked:
            parts.append(f"first divergence in TensorRT: {self.first_divergence_tensorrt or 'none'}")
        return "; ".join(parts)

    def format_table(self) -> str:
        """A markdown table in execution order; '<-' marks the first divergence."""
        rt = self.runtime is not None
        trt = self.tensorrt_checked
        head = "| # | layer | kind | SQNR teacher-forced (dB) | SQNR accumulated (dB) | quantizers (dB) |"
        sep = "|---|---|---|---|---|---|"
        if rt:
            head += " Q nodes | codes differ | max diff |"
            sep += "---|---|---|"
        if trt:
            head += " TensorRT vs ORT (dB) |"
            sep += "---|"
        lines = [self.summary(), "", head, sep]
        for i, l in enumerate(self.layers):
            qs = ", ".join(f"{n.rsplit('.', 1)[-1]} {_db(v)}" for n, v in l.quantizer_sqnr_db.items()) or "-"
            row = (f"| {i} | {l.name}{' <-' if l.name == self.first_divergence else ''} | {l.kind} | "
                   f"{_db(l.sqnr_teacher_forced_db)} | {_db(l.sqnr_accumulated_db)} | {qs} |")
            if rt:
                checked = l.runtime_max_diff is not None
                row += (f" {len(l.runtime_nodes)} | {f'{100 * l.runtime_share:.4f} %' if checked else '-'} | "
                        f"{l.runtime_max_diff if checked else '-'}{' FLAGGED' if l.runtime_flagged else ''} |")
            if trt:
                row += f" {_db(l.tensorrt_sqnr_db)} |"
            lines.append(row)
        return "\n".join(lines + [f"\n{n}" for n in self.notes])

    def plot(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """PNG of teacher-forced and accumulated SQNR per layer, the first divergence marked (matplotlib, Agg)."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("plotting needs matplotlib: pip install 'trtquant[bench]' (or pip install matplotlib)") from exc

        names = [l.name for l in self.layers]
        x = list(range(len(names)))
        fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 4.2), dpi=110)
        ax = fig.subplots()
        cap = 120.0  # identical tensors (inf dB) drawn at the top
        for attr, label, style in (("sqnr_teacher_forced_db", "teacher-forced", "o-"),
                                   ("sqnr_accumulated_db", "accumulated", "s--")):
            ys = [getattr(l, attr) for l in self.layers]
            ax.plot(x, [float("nan") if v is None else min(v, cap) for v in ys], style, label=label, markersize=4)
        if self.tensorrt_checked:
            ax.plot(x, [float("nan") if l.tensorrt_sqnr_db is None else min(l.tensorrt_sqnr_db, cap)
                        for l in self.layers], "^:", label="TensorRT vs ONNX Runtime", markersize=4)
        if self.first_divergence in names:
            i = names.index(self.first_divergence)
            ax.axvline(i, color="tab:red", linestyle=":", label=f"first divergence: {self.first_divergence}")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(f"Quantization error per layer (output SQNR {_db(self.output_sqnr_db)} dB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(str(path))
        return str(path)


def _db(v: Optional[float]) -> str:
    return "-" if v is None else ("inf" if v == math.inf else f"{v:.2f}")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _infinite(obj: Any) -> Any:
    if obj in ("inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _infinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_infinite(v) for v in obj]
    return obj


# ---- capture ----------------------------------------------------------------------------------------

def _clone(x: Any) -> Any:
    """Detached copies of every tensor in a call's args/kwargs (later in-place ops must not change them)."""
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_clone(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _floats(out: Any) -> List[Tensor]:
    return [t.detach().float().clone() for t in output_tensors(out) if t.is_floating_point()]


class _Noise:
    """Running sum(ref^2) and sum((ref - x)^2)."""

    def __init__(self) -> None:
        self.sig = 0.0
        self.noise = 0.0
        self.n = 0

    def add(self, ref: Sequence[Tensor], got: Sequence[Tensor]) -> None:
        for r, g in zip(ref, got):
            r64, g64 = r.double(), g.detach().double()
            self.sig += float((r64 * r64).sum())
            self.noise += float(((r64 - g64) ** 2).sum())
        self.n += 1

    @property
    def db(self) -> Optional[float]:
        return _sqnr(self.sig, self.noise) if self.n else None


class _Recorder:
    """Forward hooks on the layers: each call's (args, kwargs) when ``keep_inputs``, and its float outputs."""

    def __init__(self, modules: Dict[str, nn.Module], keep_inputs: bool) -> None:
        self.calls: Dict[str, List[Tuple[Any, Any, List[Tensor]]]] = defaultdict(list)
        self.order: Dict[str, None] = {}
        self._handles = []
        for name, m in modules.items():
            def hook(_m: nn.Module, args: Any, kwargs: Any, out: Any, name: str = name) -> None:
                self.order.setdefault(name)
                inputs = (_clone(args), _clone(kwargs)) if keep_inputs else (None, None)
                self.calls[name].append((*inputs, _floats(out)))

            self._handles.append(m.register_forward_hook(hook, with_kwargs=True))

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _quantizer_noise(qs: Mapping[str, nn.Module], names: Sequence[str], acc: Dict[str, _Noise]) -> list:
    """Hooks measuring each quantizer's own error (its output against its input)."""
    handles = []
    for n in names:
        def hook(_m: nn.Module, args: Any, out: Any, n: str = n) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                acc[n].add([args[0].detach().float()], [out.float()])

        handles.append(qs[n].register_forward_hook(hook))
    return handles


# ---- the debugger -------------------------------------------------------------------------------------

def debug(model: nn.Module, data: Iterable[Any], onnx_path: Optional[Union[str, "os.PathLike[str]"]] = None,
          num_batches: Optional[int] = 4, runtime: str = "onnxruntime", top_k: int = 5,
          runtime_tolerance: float = 1e-4, progress: bool = False) -> DebugReport:
    """Per quantized layer: fake quant against FP32 (teacher-forced and accumulated SQNR) and, given the
    exported graph, fake quant against the runtime (teacher-forced code parity; the first divergence).

    Args:
        model: a calibrated quantized model (every enabled quantizer needs an amax). Its quantizer
            states, train/eval mode and set_state record are restored afterwards.
        data: batches (tensors, ``(inputs, labels)`` tuples or kwargs dicts), e.g. calibration data.
        onnx_path: the graph exported from ``model`` (:func:`trtquant.export.export_onnx`); None skips
            the runtime check. Parity runs on the first batch, whose tensors are the graph's inputs.
        num_batches: use at most this many batches (None: all). Every layer's inputs of one batch
            are held in memory at once.
        runtime: 'onnxruntime', or 'tensorrt' to also run the graph in TensorRT through Polygraphy
            (ONNX Runtime still gives the per-node codes); without TensorRT and Polygraphy the report
            says TensorRT was not checked.
        top_k: how many layers ``worst_layers`` names.
        runtime_tolerance: share of a Q node's codes that may differ (by one: float division order)
            before it counts as diverged; any code off by more than one always does.
        progress: a tqdm bar over the batches.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    groups = quant_groups(model)
    if not groups:
        raise TrtQuantError("the model has no enabled quantizers: call trtquant.quantize(model) and calibrate first")
    modules = dict(model.named_modules())
    qs_all = quantizers(model)
    missing = [n for _, members in groups.values() for n in members if qs_all[n].amax is None]
    if missing:
        raise QuantizerNotCalibratedError(
            f"{len(missing)} quantizer(s) have no amax: {', '.join(missing[:20])}; calibrate the model (or load a "
            "calibration) before debugging, or disable them")
    batches = _materialise(data, num_batches)
    if not batches:
        raise ValueError("debug needs data: the data yielded no batches")
    layer_modules = {layer: modules[layer] for layer in groups}
    device = _model_device(model)
    tf = {layer: _Noise() for layer in groups}
    acc = {layer: _Noise() for layer in groups}
    per_q: Dict[str, _Noise] = defaultdict(_Noise)
    calls: Dict[str, int] = defaultdict(int)
    out_noise = _Noise()
    order: Dict[str, None] = {}
    n_samples = 0
    active = [n for _, members in groups.values() for n in members]
    with preserved(model) as qs, torch.no_grad():
        model.eval()
        for batch in _progress(batches, len(batches), "debug", progress):
            batch = _to_device(batch, device)
            n_samples += _batch_size(batch)
            _only(qs, [])
            rec = _Recorder(layer_modules, keep_inputs=True)
            try:
                ref_out = _floats(run_batch(model, batch))
            finally:
                rec.close()
            for name in rec.order:
                order.setdefault(name)
            for layer, (_, members) in groups.items():
                _only(qs, members)
                handles = _quantizer_noise(qs, members, per_q)
                try:
                    for args, kwargs, ref in rec.calls.get(layer, []):
                        tf[layer].add(ref, _floats(layer_modules[layer](*args, **kwargs)))
                        calls[layer] += 1
                finally:
                    for h in handles:
                        h.remove()
            fp32 = {layer: [c[2] for c in cs] for layer, cs in rec.calls.items()}
            del rec
            _only(qs, active)
            rec_q = _Recorder(layer_modules, keep_inputs=False)
            try:
                q_out = _floats(run_batch(model, batch))
            finally:
                rec_q.close()
            out_noise.add(ref_out, q_out)
            for layer, ref_calls in fp32.items():
                for ref, (_, _, got) in zip(ref_calls, rec_q.calls.get(layer, [])):
                    acc[layer].add(ref, got)
    ordered = list(order) + [layer for layer in groups if layer not in order]
    layers = []
    for layer in ordered:
        kind, members = groups[layer]
        layers.append(LayerDebug(layer, kind, list(members), calls[layer], tf[layer].db, acc[layer].db,
                                 {n: db for n in members if (db := per_q[n].db) is not None}))
    unreached = [l.name for l in layers if not l.calls]
    notes = []
    if unreached:
        notes.append(f"never ran on the data (no SQNR): {', '.join(unreached)}")
    measured = sorted((l for l in layers if l.sqnr_teacher_forced_db is not None),
                      key=lambda l: l.sqnr_teacher_forced_db)  # type: ignore[arg-type,return-value]
    report = DebugReport(layers, n_samples, out_noise.db, [l.name for l in measured[:top_k]], notes=notes,
                         runtime_tolerance=runtime_tolerance)
    if onnx_path is not None:
        _runtime_parity(report, model, groups, onnx_path, batches[0], runtime)
    return report


def _batch_size(batch: Any) -> int:
    t = next(iter(output_tensors(batch)), None)
    return int(t.shape[0]) if t is not None and t.dim() else 1


def _onnx_args(batch: Any, n_inputs: int) -> Tuple[Tensor, ...]:
    """The graph's inputs from one batch: a tensor, or the first ``n_inputs`` tensors of a tuple/list."""
    if isinstance(batch, Tensor):
        return (batch.detach().cpu(),)
    if isinstance(batch, (tuple, list)) and all(isinstance(a, Tensor) for a in batch[:n_inputs]):
        return tuple(a.detach().cpu() for a in batch[:n_inputs])
    raise TypeError("the runtime check feeds the first batch to the graph: it must be a tensor or a tuple of tensors "
                    f"(the model's positional inputs), got {type(batch).__name__}")


def _owner(groups: Dict[str, Tuple[str, List[str]]]) -> Dict[str, str]:
    return {q: layer for layer, (_, members) in groups.items() for q in members}


def _runtime_parity(report: DebugReport, model: nn.Module, groups: Dict[str, Tuple[str, List[str]]],
                    onnx_path: Union[str, "os.PathLike[str]"], batch: Any, runtime: str) -> None:
    """Teacher-forced code parity per layer (ONNX Runtime), the first divergence; TensorRT when asked."""
    import onnx

    from .export.parity import teacher_forced

    proto = onnx.load(str(onnx_path))
    args = _onnx_args(batch, len(_graph_inputs(proto)))
    rep = teacher_forced(model, proto, args)  # dynamo nodes map to quantizers by their module scopes
    report.runtime, report.onnx_path = runtime, str(onnx_path)
    report.notes.extend(rep.notes)
    owner = _owner(groups)
    by_name = {l.name: l for l in report.layers}
    node_layer: Dict[str, str] = {}
    for node in rep.nodes:
        name = _layer_of(node.quantizer, node.node, owner, groups)
        node_layer[node.node] = name
        found = by_name.get(name)
        if found is None:  # a Q node no model layer stands for (an ONNX Runtime observer, a graph-grid match)
            found = LayerDebug(name, "runtime only", [node.quantizer] if node.quantizer else [])
            report.layers.append(found)
            by_name[name] = found
        l = found
        l.runtime_nodes.append(node.node)
        l.runtime_codes += node.codes
        l.runtime_mismatched += node.mismatched
        l.runtime_max_diff = max(l.runtime_max_diff or 0, node.max_diff)
        if node.share > report.runtime_tolerance or node.max_diff > 1:
            l.runtime_flagged = True
            if report.first_divergence is None:
                report.first_divergence = name
    flagged = rep.flagged(report.runtime_tolerance)
    report.notes.append(rep.summary() if not flagged else
                        f"{len(flagged)} of {len(rep.nodes)} Q nodes diverge from ONNX Runtime; first in graph order: "
                        f"{flagged[0].node} (layer {report.first_divergence}: {100 * flagged[0].share:.2f} % of its "
                        f"codes differ, up to {flagged[0].max_diff})")
    if runtime == "tensorrt":
        _tensorrt(report, proto, args, rep, node_layer)


def _graph_inputs(proto: Any) -> List[str]:
    consts = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in consts]


def _layer_of(quantizer: Optional[str], node: str, owner: Dict[str, str],
              groups: Dict[str, Tuple[str, List[str]]]) -> str:
    if quantizer is None:
        return node
    if quantizer in owner:
        return owner[quantizer]
    parent = quantizer.rsplit(".", 1)[0] if "." in quantizer else ""
    return parent if parent in groups else quantizer


def _tensorrt_missing() -> Optional[str]:
    """Why the TensorRT check cannot run here, or None."""
    from .engine._trt import tensorrt_available

    if not tensorrt_available():
        return "TensorRT is not installed (or only its type stubs are)"
    try:
        import polygraphy  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return "Polygraphy is not installed (pip install polygraphy)"
    return None


def _tensorrt(report: DebugReport, proto: Any, args: Tuple[Tensor, ...], rep: Any, node_layer: Dict[str, str],
              min_sqnr_db: float = 30.0) -> None:
    """TensorRT through Polygraphy: every activation Q node's float input marked as an engine output and
    compared with ONNX Runtime's (SQNR, accumulated). Not exercised by this repository's CPU tests."""
    why = _tensorrt_missing()
    if why is not None:
        report.notes.append(f"TensorRT NOT checked: {why}; runtime parity above is ONNX Runtime only")
        logger.warning("debug: TensorRT not checked: %s", why)
        return
    import numpy as np
    from polygraphy.backend.trt import (  # type: ignore[import-not-found,unused-ignore]
        CreateConfig, EngineFromNetwork, ModifyNetworkOutputs, NetworkFromOnnxBytes, Profile, TrtRunner,
    )

    from .export.parity import activation_quantize_nodes, qdq_probe_outputs, run_with_outputs

    qnodes = activation_quantize_nodes(proto)
    tensors = {q.name or q.output[0]: q.input[0] for q in qnodes}
    feeds = {name: a.numpy() for name, a in zip(_graph_inputs(proto), args)}
    extra, _ = qdq_probe_outputs(proto, qnodes)
    ort = run_with_outputs(proto, {t: extra[t] for t in tensors.values()}, feeds)
    network = ModifyNetworkOutputs(NetworkFromOnnxBytes(proto.SerializeToString()), outputs=list(tensors.values()))
    profile = Profile()
    for name, arr in feeds.items():  # the exported batch dimension is dynamic: one profile at this batch's shape
        profile.add(name, min=arr.shape, opt=arr.shape, max=arr.shape)
    config = CreateConfig(int8=True, fp16=True, profiles=[profile])
    with TrtRunner(EngineFromNetwork(network, config=config)) as runner:
        got = runner.infer(feed_dict=feeds)
    report.tensorrt_checked = True
    by_name = {l.name: l for l in report.layers}
    for node, tensor in tensors.items():
        if tensor not in got or tensor not in ort:
            continue
        noise = _Noise()
        noise.add([torch.from_numpy(np.asarray(ort[tensor], dtype=np.float32))],
                  [torch.from_numpy(np.asarray(got[tensor], dtype=np.float32))])
        l = by_name.get(node_layer.get(node, ""))
        if l is None or noise.db is None:
            continue
        l.tensorrt_sqnr_db = noise.db if l.tensorrt_sqnr_db is None else min(l.tensorrt_sqnr_db, noise.db)
        if noise.db < min_sqnr_db and report.first_divergence_tensorrt is None:
            report.first_divergence_tensorrt = l.name
    report.notes.append(f"TensorRT (Polygraphy, INT8+FP16, every activation Q input marked as an output, which "
                        f"can change TensorRT's fusions): first Q input below {min_sqnr_db:g} dB against ONNX "
                        f"Runtime: {report.first_divergence_tensorrt or 'none'}")
