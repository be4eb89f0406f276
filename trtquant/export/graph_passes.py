"""ONNX rewrites after export: readable Q/DQ names, int8 weight initializers."""

from __future__ import annotations

import json
from typing import Dict, List

import numpy as np
import onnx
from onnx import numpy_helper


def _initializers(model: onnx.ModelProto) -> Dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _constant_value(model: onnx.ModelProto, name: str):
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def name_qdq_nodes(model: onnx.ModelProto) -> None:
    """Name unnamed Q/DQ nodes after the tensor they quantize, so validator findings are readable."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not n.name:
            base = f"{n.input[0]}/{n.op_type}"
            name, k = base, 1
            while name in used:
                name, k = f"{base}_{k}", k + 1
            n.name = name
            used.add(name)


def fold_weight_quantize(model: onnx.ModelProto) -> int:
    """QuantizeLinear on a constant weight -> an int8 initializer feeding DequantizeLinear directly."""
    inits = _initializers(model)
    graph = model.graph
    consumers: Dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    folded = 0
    keep = []
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits:
            w = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            scale = _constant_value(model, n.input[1])
            zp = _constant_value(model, n.input[2]) if len(n.input) > 2 else np.zeros((), np.int8)
            if scale is None or zp is None:
                keep.append(n)
                continue
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            s = scale.astype(np.float32)
            if s.ndim == 1:
                shape = [1] * w.ndim
                shape[axis] = -1
                s = s.reshape(shape)
            info = np.iinfo(zp.dtype)
            q = np.clip(np.rint(w / s), info.min, info.max).astype(zp.dtype)
            t = numpy_helper.from_array(q, name=n.output[0])
            graph.initializer.append(t)
            if consumers.get(n.input[0], 0) == 1:
                graph.initializer.remove(inits[n.input[0]])
            folded += 1
        else:
            keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    return folded


QDQ_ALIASES_KEY = "trtquant.qdq_aliases"


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
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
    graph = model.graph
    consumers: Dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in graph.output}
    seen: Dict[tuple, onnx.NodeProto] = {}
    aliases: Dict[str, List[str]] = {}
    rename: Dict[str, str] = {}
    drop = set()
    for n in graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        dqs = consumers.get(n.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or dqs[0].output[0] in graph_outputs:
            continue  # a DQ that is a graph output keeps its name (and so its own pair)
        scale = _constant_value(model, n.input[1])
        zp = _constant_value(model, n.input[2]) if len(n.input) > 2 else None
        if scale is None:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        key = (n.input[0], scale.dtype.str, scale.tobytes(), None if zp is None else (zp.dtype.str, zp.tobytes()), axis)
        if key in seen:
            rename[dqs[0].output[0]] = consumers[seen[key].output[0]][0].output[0]
            drop.update({id(n), id(dqs[0])})
            if n.name and seen[key].name:
                aliases.setdefault(seen[key].name, []).append(n.name)
        else:
            seen[key] = n
    if not rename:
        return 0
    if aliases:  # which quantizers a kept Q node stands for (import_trt_cache maps amax back through it)
        _set_metadata(model, QDQ_ALIASES_KEY, json.dumps(aliases, sort_keys=True))
    keep = [n for n in graph.node if id(n) not in drop]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(rename)


def reduce_mean_to_global_pool(model: onnx.ModelProto) -> int:
    """ReduceMean over the spatial axes of a 4-D tensor (keepdims=1) -> GlobalAveragePool.

    The dynamo exporter lowers adaptive_avg_pool2d(x, 1) to ReduceMean, which TensorRT does not
    treat as a pooling layer; GlobalAveragePool is the same math and runs in INT8 after a DQ.
    """
    changed = 0
    ranks = None
    for n in model.graph.node:
        if n.op_type != "ReduceMean":
            continue
        keep = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
        axes_attr = next((list(a.ints) for a in n.attribute if a.name == "axes"), None)
        axes = axes_attr
        if axes is None and len(n.input) > 1:
            v = _constant_value(model, n.input[1])
            axes = None if v is None else [int(a) for a in np.asarray(v).ravel()]
        if keep != 1 or axes is None:
            continue
        if ranks is None:
            ranks = _tensor_ranks(model)
        # GlobalAveragePool averages every dimension after the channel: only the 4-D case is this ReduceMean
        # (axes (-2, -1) of a 3-D tensor or (2, 3) of a 5-D one are not).
        if ranks.get(n.input[0]) != 4 or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        del n.input[1:]
        del n.attribute[:]
        n.op_type = "GlobalAveragePool"
        changed += 1
    if changed:
        remove_unused_initializers(model)
    return changed


def _tensor_ranks(model: onnx.ModelProto) -> Dict[str, int]:
    """Rank of every tensor whose rank ONNX shape inference knows (empty if inference fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an op shape inference does not know: rewrite nothing rather than guess
        return {}
    ranks: Dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    return ranks


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
