"""ONNX rewrites after export: readable Q/DQ names, int8 weight initializers."""

from __future__ import annotations

from typing import Dict

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
