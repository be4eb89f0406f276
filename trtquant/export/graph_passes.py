"""ONNX rewrites after export: readable Q/DQ names, int8 weight initializers."""

from __future__ import annotations

import json
from typing import Dict, List

import numpy as np
import onnx

from ..graph.index import GraphIndex
from ..graph.ops import DQ, Q, QDQ


def name_qdq_nodes(model: onnx.ModelProto) -> None:
    """Name unnamed Q/DQ nodes after the tensor they quantize, so validator findings are readable."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if n.op_type in QDQ and not n.name:
            base = f"{n.input[0]}/{n.op_type}"
            name, k = base, 1
            while name in used:
                name, k = f"{base}_{k}", k + 1
            n.name = name
            used.add(name)


def fold_weight_quantize(model: onnx.ModelProto) -> int:
    """QuantizeLinear on a constant weight -> an int8 initializer feeding DequantizeLinear directly."""
    g = GraphIndex(model)
    folded = 0
    for i, n in enumerate(g.nodes):
        if n.op_type != Q or n.input[0] not in g.initializers:
            continue
        w = g.const(n.input[0]).astype(np.float32)
        scale = g.const(n.input[1])
        zp = g.const(n.input[2]) if len(n.input) > 2 else np.zeros((), np.int8)
        if scale is None or zp is None:
            continue
        axis = g.attr(n, "axis", 1)
        s = scale.astype(np.float32)
        if s.ndim == 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            s = s.reshape(shape)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / s), info.min, info.max).astype(zp.dtype)
        g.add_initializer(q, name=n.output[0])
        if len(g.consumers.get(n.input[0], ())) == 1:
            g.remove_initializer(n.input[0])
        g.remove_node(i)
        folded += 1
    g.commit()
    return folded


QDQ_ALIASES_KEY = "trtquant.qdq_aliases"


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set (or replace) one ``metadata_props`` entry of ``model``."""
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def qdq_aliases(model: onnx.ModelProto) -> Dict[str, List[str]]:
    """{kept QuantizeLinear name: names of the identical Q nodes dedupe_qdq merged into it}."""
    for p in model.metadata_props:
        if p.key == QDQ_ALIASES_KEY:
            return json.loads(p.value)
    return {}


def dedupe_qdq(model: onnx.ModelProto) -> int:
    """Merge Q->DQ pairs that quantize the same tensor with the same scale, zero point and axis.

    Two quantizers reading one tensor (a conv input and a residual identity, say) calibrate to the
    same amax; the TorchScript exporter still writes two pairs, which TensorRT treats as
    per-consumer scales. One shared pair is what it fuses.
    """
    g = GraphIndex(model)
    seen: Dict[tuple, str] = {}  # key -> output of the kept pair's DQ
    seen_name: Dict[tuple, str] = {}
    aliases: Dict[str, List[str]] = {}
    rename: Dict[str, str] = {}
    drop: List[int] = []
    for i, n in enumerate(g.nodes):
        if n.op_type != Q:
            continue
        dqs = list(g.consumer_nodes(n.output[0]))
        if len(dqs) != 1 or dqs[0][2].op_type != DQ or g.is_graph_output(dqs[0][2].output[0]):
            continue  # a DQ that is a graph output keeps its name (and so its own pair)
        dqi, dq = dqs[0][0], dqs[0][2]
        scale = g.const(n.input[1])
        zp = g.const(n.input[2]) if len(n.input) > 2 else None
        if scale is None:
            continue
        axis = g.attr(n, "axis")
        key = (n.input[0], scale.dtype.str, scale.tobytes(), None if zp is None else (zp.dtype.str, zp.tobytes()), axis)
        if key in seen:
            rename[dq.output[0]] = seen[key]
            drop += [i, dqi]
            if n.name and seen_name[key]:
                aliases.setdefault(seen_name[key], []).append(n.name)
        else:
            seen[key], seen_name[key] = dq.output[0], n.name
    if not rename:
        return 0
    if aliases:  # which quantizers a kept Q node stands for (import_trt_cache maps amax back through it)
        set_metadata(model, QDQ_ALIASES_KEY, json.dumps(aliases, sort_keys=True))
    for i in drop:
        g.remove_node(i)
    for old, new in rename.items():
        g.replace_uses(old, new)
    g.commit()
    return len(rename)


def reduce_mean_to_global_pool(model: onnx.ModelProto) -> int:
    """ReduceMean over the spatial axes of a 4-D tensor (keepdims=1) -> GlobalAveragePool.

    The dynamo exporter lowers adaptive_avg_pool2d(x, 1) to ReduceMean, which TensorRT does not
    treat as a pooling layer; GlobalAveragePool is the same math and runs in INT8 after a DQ.
    """
    changed = 0
    g = GraphIndex(model)
    inferred = None
    for n in g.nodes:
        if n.op_type != "ReduceMean":
            continue
        axes = g.attr(n, "axes")
        if axes is None and len(n.input) > 1:
            v = g.const(n.input[1])
            axes = None if v is None else [int(a) for a in np.asarray(v).ravel()]
        if g.attr(n, "keepdims", 1) != 1 or axes is None:
            continue
        if inferred is None:
            inferred = _inferred(model)
        # GlobalAveragePool averages every dimension after the channel: only the 4-D case is this ReduceMean
        # (axes (-2, -1) of a 3-D tensor or (2, 3) of a 5-D one are not).
        if inferred is None or inferred.rank(n.input[0]) != 4 or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        del n.input[1:]
        del n.attribute[:]
        n.op_type = "GlobalAveragePool"
        changed += 1
    if changed:
        remove_unused_initializers(model)
    return changed


def _inferred(model: onnx.ModelProto):
    """The index of ``model`` after ONNX shape inference (None if inference fails)."""
    try:
        return GraphIndex(onnx.shape_inference.infer_shapes(model))
    except Exception:  # an op shape inference does not know: rewrite nothing rather than guess
        return None


def _names_read(graph: onnx.GraphProto) -> set:
    """Every tensor name a node reads, including nodes of If/Loop/Scan bodies (they see outer names)."""
    names = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _names_read(g)
    return names


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers and Constant nodes nothing reads (rewrites leave the old scales behind)."""
    used = _names_read(model.graph) | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Constant" and not any(o in used for o in n.output)]
    for n in dead:
        model.graph.node.remove(n)
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
