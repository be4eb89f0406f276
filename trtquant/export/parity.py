"""Teacher-forced parity: every activation QuantizeLinear of an ONNX graph, checked on ONNX Runtime's own input.

End-to-end numbers (cosine, relative L2) cannot tell a wrong graph from chaos: a quantized network
amplifies every rounding flip, so ONNX Runtime and the PyTorch fake-quant model drift apart even
when both are right, and a wrong scale on one layer can hide in that drift. :func:`teacher_forced`
takes the float tensor each activation ``QuantizeLinear`` reads *in ONNX Runtime* (graph
optimisations off, Q/DQ executed literally), quantizes it again in torch with the grid of the
PyTorch quantizer that node stands for, and counts the codes that differ from ONNX Runtime's. Both
sides start from the same float values, so nothing upstream can excuse a difference: a correct
graph differs in at most a few codes by one (float division order), a wrong scale or zero point in
a large share of them.

The probing helpers (extra graph outputs, relative-noise inputs, relative L2) are public because
the export parity tests use them directly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["QuantizeParity", "TeacherForcedReport", "teacher_forced", "activation_quantize_nodes", "qdq_probe_outputs",
           "with_extra_outputs", "run_with_outputs", "requantize", "amax_for_scale", "relative_l2", "cosine",
           "with_relative_noise", "WeightParity", "weight_parity", "fp8_ordinals"]

OnnxModel = Union[str, "os.PathLike[str]", Any]  # a path or an onnx.ModelProto


# ---- ONNX probing ---------------------------------------------------------------------------------

def _load(model: OnnxModel) -> Any:
    import onnx

    return onnx.load(str(model)) if isinstance(model, (str, os.PathLike)) else model


def activation_quantize_nodes(model: OnnxModel) -> list:
    """QuantizeLinear nodes whose data input is computed, not a constant (weights are constants)."""
    from ..graph.index import GraphIndex

    g = GraphIndex(_load(model))
    return [n for n in g.nodes if n.op_type == "QuantizeLinear" and g.const(n.input[0]) is None]


def _q_constants(g: Any, q: Any) -> Tuple[np.ndarray, np.ndarray, int]:
    """(scale, zero point, axis) of a QuantizeLinear; ONNX's default zero point is uint8 0."""
    scale = g.const(q.input[1])
    if scale is None:
        raise ValueError(f"QuantizeLinear '{q.name}': its scale '{q.input[1]}' is not a constant; teacher-forced "
                         "parity needs constant scales (export with trtquant.export.export_onnx)")
    zp = g.const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros(scale.shape, np.uint8)
    if zp is None:
        raise ValueError(f"QuantizeLinear '{q.name}': its zero point '{q.input[2]}' is not a constant")
    return scale, zp, int(g.attr(q, "axis", 1))


def qdq_probe_outputs(model: OnnxModel, qnodes: Sequence[Any]) -> Tuple[Dict[str, int], Dict[str, list]]:
    """Extra graph outputs that expose each QuantizeLinear's float input, its codes (int8 or uint8, as
    its zero point) and the outputs of its DequantizeLinear consumers, as ``{tensor: onnx elem type}``
    for :func:`with_extra_outputs`; and those consumers per Q output."""
    from onnx import helper

    from ..graph.index import GraphIndex

    g = GraphIndex(_load(model))
    consumers = {q.output[0]: [n for _, _, n in g.consumer_nodes(q.output[0])] for q in qnodes}
    extra: Dict[str, int] = {}
    for q in qnodes:
        scale, zp, _ = _q_constants(g, q)
        float_type = helper.np_dtype_to_tensor_dtype(scale.dtype)
        extra[q.input[0]] = float_type
        extra[q.output[0]] = helper.np_dtype_to_tensor_dtype(zp.dtype)
        for dq in consumers[q.output[0]]:
            if dq.op_type == "DequantizeLinear":
                extra[dq.output[0]] = float_type
    return extra, consumers


def with_extra_outputs(model: OnnxModel, outputs: Mapping[str, int]) -> Any:
    """A copy of ``model`` that also returns the tensors ``{name: onnx elem type}`` (graph inputs and
    existing outputs are left as they are)."""
    from onnx import helper

    m = copy.deepcopy(_load(model))
    present = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for name, elem in outputs.items():
        if name not in present:
            m.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return m


def run_with_outputs(model: OnnxModel, extra: Mapping[str, int], feeds: Mapping[str, np.ndarray],
                     path: Optional[Union[str, "os.PathLike[str]"]] = None) -> Dict[str, np.ndarray]:
    """Run ``model`` with ``extra`` exposed as outputs in ONNX Runtime (CPU, optimisations off, so
    every Q/DQ runs as written): every output by name, plus the ``feeds`` themselves.

    ``path``: where to write the probe model (kept for inspection); in memory when None.
    """
    import onnxruntime as ort

    from .compare import ort_session

    probe = with_extra_outputs(model, extra)
    if path is not None:
        import onnx

        onnx.save(probe, str(path))
        sess = ort_session(path, optimize=False)
    else:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, dict(feeds))))
    values.update(feeds)
    return values


# ---- numerics -------------------------------------------------------------------------------------

def requantize(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int) -> Tensor:
    """QuantizeLinear in torch: ``saturate(round_half_even(x / scale) + zero_point)`` as int32 codes.

    Computed in float32 (an fp16 input and scale are widened first); a 1-D ``scale``/``zero_point``
    applies along ``axis`` (negative counts from the end).
    """
    x32 = x.float()
    s = scale.float()
    zp = zero_point.to(torch.int32)
    if s.dim() == 1 and x32.dim() > 0:
        shape = [1] * x32.dim()
        shape[axis % x32.dim()] = -1
        s, zp = s.reshape(shape), zp.reshape(shape)
    return (torch.round(x32 / s).to(torch.int32) + zp).clamp_(qmin, qmax)


def amax_for_scale(scale: Union[float, np.floating], bound: int = 127) -> Tensor:
    """A float32 amax whose trtquant scale (amax / bound in float32) is exactly ``scale``."""
    from ..functional import amax_to_scale

    target = torch.tensor(scale, dtype=torch.float32)
    amax = target * bound
    for _ in range(4):
        got = amax_to_scale(amax, bound)
        if torch.equal(got, target):
            return amax
        amax = torch.nextafter(amax, amax + (1.0 if bool(got < target) else -1.0))
    raise ValueError(f"no float32 amax maps to scale {float(scale)!r} with bound {bound}")


def relative_l2(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b is zero)."""
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    den = float(b64.norm())
    num = float((a64 - b64).norm())
    return num / den if den > 0 else num


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of the flattened tensors in float64 (1.0 when either is zero)."""
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    den = float(a64.norm() * b64.norm())
    return float(a64 @ b64) / den if den > 0 else 1.0


def with_relative_noise(x: Tensor, rel: float, seed: int) -> Tensor:
    """``x`` plus Gaussian noise with ||noise|| = rel * ||x|| per sample (dimension 0)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
    if x.dim() == 0:
        return x + noise * (rel * x.abs() / noise.abs().clamp_min(1e-30))
    shape = (-1,) + (1,) * (x.dim() - 1)
    scale = rel * x.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1).clamp_min(1e-30)
    return x + noise * scale.reshape(shape)


@contextlib.contextmanager
def layer_noise(model: nn.Module, rel: float, seed: int = 0) -> Iterator[None]:
    """While active, every enabled activation quantizer of ``model`` sees its input plus ``rel`` relative
    Gaussian noise (:func:`with_relative_noise`, a new seed per call).

    The chaos floor for comparing another runtime: its convolutions sum in another order at every layer,
    so about 1e-7 of relative difference enters before each quantizer, not only at the image. Noise on
    the image alone understates the floor of a deep net (the first quantizer absorbs nearly all of it):
    measured on a random-init EfficientNet-B3 at 64x64, image noise moves the output by cosine 1.0,
    noise at every quantizer by 0.83, and ONNX Runtime differs by 0.93.
    """
    from ..calibrate import quantizers

    calls = [0]

    def hook(_m: nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
            return args
        calls[0] += 1
        return (with_relative_noise(args[0], rel, seed=seed * 100_003 + calls[0]),) + tuple(args[1:])

    handles = [q.register_forward_pre_hook(hook) for name, q in quantizers(model).items()
               if q.is_enabled and q._if_quant and not name.endswith("weight_quantizer")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- the report -----------------------------------------------------------------------------------

@dataclass
class QuantizeParity:
    """One activation QuantizeLinear: ONNX Runtime's codes against torch's, from the same float input."""

    node: str  # ONNX node name
    tensor: str  # the float tensor it quantizes
    quantizer: Optional[str]  # the PyTorch quantizer whose grid torch used; None: the graph's own grid
    matched_by: str  # 'name' (node scope), 'best fit' (the quantizer whose grid fits best), 'graph' (no model)
    codes: int
    mismatched: int
    max_diff: int
    graph_scale: float  # the node's scale (the largest, for a per-channel node)
    reference_scale: float  # the scale torch quantized with
    graph_zero_point: int
    off_by_one: int = 0

    @property
    def share(self) -> float:
        """Fraction of codes that differ."""
        return self.mismatched / self.codes if self.codes else 0.0


@dataclass
class TeacherForcedReport:
    """Per-node and total code agreement of :func:`teacher_forced`."""

    nodes: List[QuantizeParity]
    num_samples: int
    target: Optional[str]  # 'tensorrt' / 'onnxruntime' as export_onnx recorded it
    notes: List[str] = field(default_factory=list)

    @property
    def codes(self) -> int:
        return sum(n.codes for n in self.nodes)

    @property
    def mismatched(self) -> int:
        return sum(n.mismatched for n in self.nodes)

    @property
    def off_by_one(self) -> int:
        return sum(n.off_by_one for n in self.nodes)

    @property
    def max_diff(self) -> int:
        return max((n.max_diff for n in self.nodes), default=0)

    @property
    def share(self) -> float:
        return self.mismatched / self.codes if self.codes else 0.0

    def flagged(self, max_share: float = 1e-4) -> List[QuantizeParity]:
        """Nodes where more than ``max_share`` of the codes differ or any code differs by more than one."""
        return [n for n in self.nodes if n.share > max_share or n.max_diff > 1]

    def worst(self, k: int = 5) -> List[QuantizeParity]:
        return sorted(self.nodes, key=lambda n: (n.max_diff > 1, n.share), reverse=True)[:k]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(codes=self.codes, mismatched=self.mismatched, off_by_one=self.off_by_one, max_diff=self.max_diff,
                 share=self.share, flagged=[n.node for n in self.flagged()])
        for node, nd in zip(self.nodes, d["nodes"]):
            nd["share"] = node.share
        return d

    def summary(self) -> str:
        flagged = self.flagged()
        head = (f"teacher-forced: {len(self.nodes)} activation QuantizeLinear nodes, {self.codes} codes on "
                f"{self.num_samples} sample(s): {self.mismatched} differ ({100 * self.share:.4f} %), "
                f"{self.off_by_one} by one, largest difference {self.max_diff}")
        if not flagged:
            return head
        return head + "; FLAGGED: " + ", ".join(
            f"{n.node} ({n.quantizer or 'graph grid'}: {100 * n.share:.2f} % differ, up to {n.max_diff})" for n in flagged)

    def format_table(self) -> str:
        lines = [self.summary(), "",
                 "| Q node | quantizer | matched by | codes | differ | max diff | graph scale | torch scale |",
                 "|---|---|---|---|---|---|---|---|"]
        for n in self.nodes:
            lines.append(f"| {n.node} | {n.quantizer or '-'} | {n.matched_by} | {n.codes} | {100 * n.share:.4f} % | "
                         f"{n.max_diff} | {n.graph_scale:.6g} | {n.reference_scale:.6g} |")
        return "\n".join(lines + [f"\n{x}" for x in self.notes])


# ---- teacher forcing ------------------------------------------------------------------------------

@dataclass
class _Grid:
    """A PyTorch quantizer's export grid: what its QuantizeLinear must compute."""

    name: str
    scale: Tensor
    zero_point: Tensor
    axis: int
    qmin: int
    qmax: int
    numel: Optional[int] = None  # elements of the input it saw (shape filter for best-fit matching)
    fp8: bool = False  # FP8 E4M3: levels are the ordinals of the E4M3 values (one step = one FP8 ulp)

    def levels(self, x: Tensor) -> Tensor:
        """Signed level index ``code - zero_point``: int8 (zp 0) and uint8 (zp 128) codes of one grid agree."""
        if self.fp8:
            from ..functional import fp8_round

            return fp8_ordinals(fp8_round(x.float() / self.scale.float(), (4, 3)).to(torch.float8_e4m3fn))
        return requantize(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax) - self._zp(x)

    def _zp(self, x: Tensor) -> Tensor:
        zp = self.zero_point.to(torch.int32)
        if zp.dim() == 1 and x.dim() > 0:
            shape = [1] * x.dim()
            shape[self.axis % x.dim()] = -1
            zp = zp.reshape(shape)
        return zp


def fp8_ordinals(codes: Union[Tensor, np.ndarray]) -> Tensor:
    """E4M3 values (a float8 tensor, or their uint8 bit patterns as ONNX Runtime returns them) as signed
    ordinals, so that neighbouring FP8 values differ by one and +0/-0 are both 0."""
    if isinstance(codes, np.ndarray):
        bits = torch.from_numpy(codes.view(np.uint8).astype(np.int32))
    else:
        bits = codes.view(torch.uint8).to(torch.int32)
    magnitude = bits & 0x7F
    return torch.where(bits & 0x80 != 0, -magnitude, magnitude)


def _module_path(node_name: str) -> str:
    """'/layer1/layer1.0/conv1/input_quantizer/QuantizeLinear' (legacy exporter scopes) ->
    'layer1.0.conv1.input_quantizer'."""
    path: List[str] = []
    for comp in node_name.strip("/").split("/")[:-1]:
        if path and comp.startswith(path[-1] + "."):
            path[-1] = comp
        else:
            path.append(comp)
    return ".".join(path)


def _model_grids(model: nn.Module, args: Tuple[Tensor, ...], scale_dtype: torch.dtype) -> Dict[str, _Grid]:
    """Every quantizing activation quantizer's grid, with the size of the input it sees on ``args``."""
    from ..calibrate import quantizers
    from ..quantizer import ExportMode

    grids: Dict[str, _Grid] = {}
    handles = []
    for name, q in quantizers(model).items():
        if name.endswith("weight_quantizer") or not (q.is_enabled and q._if_quant) or q.amax is None:
            continue
        mode = ExportMode.of(q, scale_dtype)
        if mode.kind == "block":
            continue  # blocked weights only (weight_parity checks them)
        grid = _Grid(name, mode.scale.detach().cpu(), mode.zero_point.detach().cpu().to(torch.int32)
                     if mode.kind == "fp8" else mode.zero_point.detach().cpu(), mode.axis, mode.qmin, mode.qmax,
                     fp8=mode.kind == "fp8")
        grids[name] = grid

        def record(_m: nn.Module, inp: Tuple[Any, ...], grid: _Grid = grid) -> None:
            if inp and isinstance(inp[0], Tensor):
                grid.numel = int(inp[0].numel())

        handles.append(q.register_forward_pre_hook(record))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*[a.to(device) for a in args])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return grids


def _is_fp8(zp: np.ndarray) -> bool:
    return "float8" in str(zp.dtype)


def _graph_grid(node: Any, scale: np.ndarray, zp: np.ndarray, axis: int) -> _Grid:
    if _is_fp8(zp):
        return _Grid(node.name, torch.from_numpy(np.array(scale, np.float32)), torch.zeros((), dtype=torch.int32), axis,
                     -448, 448, fp8=True)
    info = np.iinfo(zp.dtype)
    return _Grid(node.name, torch.from_numpy(np.array(scale)), torch.from_numpy(np.array(zp).astype(np.int32)),
                 axis, int(info.min), int(info.max))


def _as_args(inputs: Union[Tensor, Sequence[Tensor]]) -> Tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(a, Tensor) for a in inputs):
        return tuple(inputs)
    raise TypeError("inputs must be one batch: a tensor or a tuple of tensors (the model's positional inputs)")


def teacher_forced(model: Optional[nn.Module], onnx_path: OnnxModel, inputs: Union[Tensor, Sequence[Tensor]],
                   probe_path: Optional[Union[str, "os.PathLike[str]"]] = None) -> TeacherForcedReport:
    """Each activation QuantizeLinear of ``onnx_path``, teacher-forced: ONNX Runtime's float input
    quantized again in torch, codes compared.

    Args:
        model: the calibrated PyTorch model the graph was exported from. Each Q node is checked against
            the grid (scale, zero point) of the quantizer it stands for: the one its node scope names
            (legacy exporter), else - dynamo names, the ONNX Runtime graph's requantization nodes,
            copies moved through ReLU/MaxPool - the quantizer, among those seeing an input of the same
            size, whose grid reproduces ONNX Runtime's codes best (any if none has that size). A wrong
            scale or zero point matches no quantizer and shows as a large share of differing codes.
            For a graph exported with target='onnxruntime' the ONNX Runtime flavour of ``model`` is
            used (a copy; see :func:`trtquant.export.ort_flavor.ort_flavor_`). None checks only the
            Q numerics: torch quantizes with the graph's own scale and zero point.
        onnx_path: the exported graph (path or ModelProto).
        inputs: one batch: a tensor or tuple of tensors, fed to both.
        probe_path: where to keep the probe graph (the model plus the probed outputs); in memory if None.

    Codes are compared as signed levels (code - zero point), so the ONNX Runtime graph's uint8 codes
    with zero point 128 are compared with the int8 grid of the quantizer they encode.
    """
    from ..graph.index import GraphIndex
    from .compare import TARGET_KEY

    proto = _load(onnx_path)
    g = GraphIndex(proto)
    target = next((p.value for p in proto.metadata_props if p.key == TARGET_KEY), None)
    qnodes = activation_quantize_nodes(proto)
    if not qnodes:
        raise ValueError(f"{onnx_path if isinstance(onnx_path, (str, os.PathLike)) else 'the graph'} has no activation "
                         "QuantizeLinear: nothing to teacher-force (was it exported from a calibrated, quantized model?)")
    args = _as_args(inputs)
    feeds = {i: a.detach().cpu().numpy() for i, a in zip(g.inputs, args)}
    extra, _ = qdq_probe_outputs(proto, qnodes)
    values = run_with_outputs(proto, extra, feeds, probe_path)
    notes: List[str] = []
    grids: Dict[str, _Grid] = {}
    if model is not None:
        if target == "onnxruntime":
            from .ort_flavor import ort_flavor_

            model = ort_flavor_(copy.deepcopy(model), tuple(args))
            notes.append("reference: the ONNX Runtime flavour of the model (export target 'onnxruntime')")
        scale_dtype = torch.float16 if any(_q_constants(g, q)[0].dtype == np.float16 for q in qnodes) else torch.float32
        grids = _model_grids(model, args, scale_dtype)
        if not grids:
            notes.append("the model has no quantizing activation quantizer: checked against the graph's own grids")
    nodes = [_check_node(g, q, values, grids) for q in qnodes]
    return TeacherForcedReport(nodes, int(args[0].shape[0]) if args[0].dim() else 1, target, notes)


def _check_node(g: Any, q: Any, values: Mapping[str, np.ndarray], grids: Mapping[str, _Grid]) -> QuantizeParity:
    scale, zp, axis = _q_constants(g, q)
    x = torch.from_numpy(np.asarray(values[q.input[0]]))
    graph = _graph_grid(q, scale, zp, axis)
    if graph.fp8:
        got = fp8_ordinals(np.asarray(values[q.output[0]]))
    else:
        got = torch.from_numpy(np.asarray(values[q.output[0]]).astype(np.int32)) - graph._zp(x)
    grids = {k: v for k, v in grids.items() if v.fp8 == graph.fp8}  # an FP8 node stands for an FP8 quantizer
    if not grids:
        ref, how, name = graph, "graph", None
    else:
        ref, how = _match(q, x, got, graph, grids)
        name = ref.name
    diff = (ref.levels(x) - got).abs()
    return QuantizeParity(
        node=q.name or q.output[0], tensor=q.input[0], quantizer=name, matched_by=how, codes=int(diff.numel()),
        mismatched=int((diff > 0).sum()), max_diff=int(diff.max()) if diff.numel() else 0,
        graph_scale=float(np.max(scale)), reference_scale=float(ref.scale.float().max()),
        graph_zero_point=0 if graph.fp8 else int(np.max(zp)), off_by_one=int((diff == 1).sum()))


def _match(q: Any, x: Tensor, got: Tensor, graph: _Grid, grids: Mapping[str, _Grid]) -> Tuple[_Grid, str]:
    """The quantizer a Q node stands for: by its scope name, else the best-fitting grid.

    Best fit: the fewest differing codes; ties (quantizers sharing a grid) go to one that saw an input of
    this size, then the closest scale, then the name. Every quantizer is a candidate - a Q moved
    through ReLU/MaxPool reads a tensor of another size than its quantizer - screened on a sample of
    the codes, the three best checked in full.
    """
    # Only an exporter's own Q node is named after its quantizer's scope ('.../input_quantizer/QuantizeLinear').
    # A node the ONNX Runtime rewrite inserted ('<tensor>_q__ort12') is named after the tensor it reads:
    # the producer's scope, which in the flavoured model can itself be a quantizer (a folded BatchNorm's
    # output observer) - the wrong one for a requantization of that tensor by its readers.
    own_name = bool(q.name) and q.name.rsplit("/", 1)[-1].startswith("QuantizeLinear")
    named = (grids.get(_module_path(q.name)) if own_name else None) or _scoped(q, grids)
    if named is not None:
        return named, "name"
    g_scale = max(float(graph.scale.float().max()), 1e-30)

    def cost(gr: _Grid, xs: Tensor, gs: Tensor) -> Tuple[int, bool, float, str]:
        ratio = abs(float(np.log(max(float(gr.scale.float().max()), 1e-30) / g_scale)))
        return int((gr.levels(xs) != gs).sum()), gr.numel != x.numel(), ratio, gr.name

    per_tensor = all(gr.scale.dim() == 0 for gr in grids.values()) and graph.scale.dim() == 0
    if per_tensor and x.numel() > _SCREEN:
        idx = screen_indices(x.numel(), _SCREEN)
        xs, gs = x.reshape(-1)[idx], got.reshape(-1)[idx]
        shortlist = sorted(grids.values(), key=lambda gr: cost(gr, xs, gs))[:3]
    else:
        shortlist = list(grids.values())
    return min(shortlist, key=lambda gr: cost(gr, x, got)), "best fit"


_SCREEN = 8192  # codes sampled per candidate grid before the full comparison


def screen_indices(n: int, k: int) -> Tensor:
    """``k`` evenly spread indices into ``n`` elements, first and last included. Integer arithmetic: a float32
    linspace rounds past the end above 2**24 elements (S3D's 25.7 M-element activations)."""
    return torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)


def _scoped(q: Any, grids: Mapping[str, _Grid]) -> Optional[_Grid]:
    """The quantizer a dynamo-exported node stands for: the deepest of its module scopes (the exporter's
    ``pkg.torch.onnx.name_scopes`` metadata, e.g. ['', 'features', 'features.0.input_quantizer', 'qdq']) that
    is a quantizer; None without that metadata."""
    import ast

    for p in q.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return next((grids[sc] for sc in reversed(scopes) if isinstance(sc, str) and sc in grids), None)
    return None


# ---- pre-quantized (blocked INT4) weights -----------------------------------------------------------

@dataclass
class WeightParity:
    """One weight DequantizeLinear on a pre-quantized initializer: ONNX Runtime's weight vs the fake-quant weight."""

    node: str
    quantizer: Optional[str]
    shape: Tuple[int, ...]
    block_size: int
    mismatched: int  # elements that differ (bit-exact comparison)
    max_abs_diff: float


def weight_parity(model: nn.Module, onnx_path: OnnxModel) -> List[WeightParity]:
    """Each blocked DequantizeLinear of ``onnx_path`` (INT4 weights), dequantized by ONNX Runtime and compared
    element by element with the PyTorch weight quantizer's output (transposed where the export stored the
    weight as ``[K, N]``). Identical weights and inputs make the layer identical: this is the per-layer
    parity of weight-only quantization, where no activation QuantizeLinear exists to teacher-force.
    """
    from onnx import helper

    from ..calibrate import quantizers
    from ..graph.index import GraphIndex

    proto = _load(onnx_path)
    g = GraphIndex(proto)
    dqs = [n for n in g.nodes if n.op_type == "DequantizeLinear" and g.attr(n, "block_size", 0)
           and n.input[0] in g.initializers]
    if not dqs:
        return []
    extra = {n.output[0]: helper.np_dtype_to_tensor_dtype(g.const(n.input[1]).dtype) for n in dqs}
    feeds = {i: np.zeros([d.dim_value or 1 for d in v.type.tensor_type.shape.dim],
                         helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
             for v in proto.graph.input if v.name in g.inputs for i in [v.name]}
    values = run_with_outputs(proto, extra, feeds)
    from ..quantizer import ExportMode

    half = any(g.const(n.input[1]).dtype == np.float16 for n in dqs)
    scale_dtype = torch.float16 if half else torch.float32
    refs: Dict[str, Tensor] = {}
    owners = dict(model.named_modules())
    with torch.no_grad():
        for name, q in quantizers(model).items():
            if q.quant_desc.block_size is None or not name.endswith("weight_quantizer") or q.amax is None:
                continue
            owner = owners.get(name.rsplit(".", 1)[0] if "." in name else "")
            w = getattr(owner, "weight", None)
            if isinstance(w, Tensor):  # the exported grid (an FP16 graph has FP16 scales)
                refs[name] = ExportMode.of(q, scale_dtype).apply(w.detach().to(scale_dtype)).float().cpu()
    out: List[WeightParity] = []
    for n in dqs:
        got = torch.from_numpy(np.asarray(values[n.output[0]], dtype=np.float32))
        best: Optional[Tuple[int, float, str]] = None
        for name, ref in refs.items():
            for cand in (ref, ref.t()):
                if cand.shape == got.shape:
                    diff = (cand - got).abs()
                    key = (int((diff > 0).sum()), float(diff.max()) if diff.numel() else 0.0, name)
                    best = key if best is None or key < best else best
        out.append(WeightParity(n.name or n.output[0], best[2] if best else None, tuple(got.shape),
                                int(g.attr(n, "block_size", 0)), best[0] if best else int(got.numel()),
                                best[1] if best else float("inf")))
    return out
