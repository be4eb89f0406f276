"""TensorRT Q/DQ graph -> the graph ONNX Runtime's CPU provider runs with INT8 kernels.

ONNX Runtime fuses DQ -> op -> Q groups into QLinearConv/QLinearAdd/QGemm/... only when every
input comes from a DequantizeLinear (int32 bias included) and the output goes into a
QuantizeLinear; a TensorRT-style graph (Q/DQ on inputs only, BatchNorm after Conv) runs entirely
in float there. Every rewrite below is exact on the symmetric grid, so the result computes what
the fake-quant model computes:

* activations: int8 zero point 0 -> uint8 zero point 128 (the same grid, the layout MLAS prefers);
  an unsigned activation quantizer (non-negative input, see ort_flavor.py) stays uint8 zero point 0,
  so ONNX Runtime's ReluQuantFusion/ClipQuantFusion delete the ReLU/Clip in front of it;
* BatchNormalization folded into the int8 weight codes (codes * sign(g), scale * |g| per channel) on
  the PyTorch side (ort_flavor.py), so the exported graph already has it folded;
* each activation Q/DQ is copied up through ReLU/MaxPool/Flatten/Reshape to the output of the op
  that produced the value (quantization commutes with these monotone ops), giving the output Q;
* Conv/Gemm biases become int32 with scale s_in * s_w (the only rounding this adds, <= 0.5 of that
  step, far below the output step).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops that commute with rounding onto one grid (monotone, 0 stays 0): Q(f(y)) == Q(f(Q(y))).
_COMMUTING = {"Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Identity"}


def fold_bn_scale(weight_scale: np.ndarray, gamma, beta, mean, var, eps: float, bias=None):
    """(folded per-channel weight scale, folded float32 bias, sign per channel) - shared with the torch side."""
    g = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    scale = (np.asarray(weight_scale, np.float64).reshape(-1) * np.abs(g)).astype(np.float32)
    b = np.zeros_like(g) if bias is None else np.asarray(bias, np.float64)
    folded_bias = ((b - np.asarray(mean, np.float64)) * g + np.asarray(beta, np.float64)).astype(np.float32)
    return scale, folded_bias, np.where(g < 0, -1, 1).astype(np.int8)


def int32_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Bias on the accumulator grid, as integer kernels add it: (int32 codes, float32 scale s_in * s_w)."""
    s_b = (np.float32(input_scale) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    s_b = np.where(s_b > 0, s_b, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(np.asarray(bias, np.float64) / s_b), -2**31, 2**31 - 1).astype(np.int32)
    return codes, s_b


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.inits: Dict[str, onnx.TensorProto] = {t.name: t for t in self.g.initializer}
        self._uid = 0
        self.refresh()

    def refresh(self) -> None:
        self.producer: Dict[str, onnx.NodeProto] = {o: n for n in self.g.node for o in n.output}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> Optional[np.ndarray]:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(next(a.t for a in p.attribute if a.name == "value"))
        if p is not None and p.op_type == "Identity":
            return self.const(p.input[0])
        return None

    def add_init(self, array: np.ndarray, hint: str) -> str:
        self._uid += 1
        name = f"{hint}__ort{self._uid}"
        self.g.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def fresh(self, hint: str) -> str:
        self._uid += 1
        return f"{hint}__ort{self._uid}"

    def is_graph_output(self, name: str) -> bool:
        return any(o.name == name for o in self.g.output)


def _axis(node: onnx.NodeProto) -> Optional[int]:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def to_onnxruntime_graph(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, Dict[str, int]]:
    """Rewrite a TensorRT Q/DQ model (fp32) in place for ONNX Runtime INT8; returns it and counts."""
    G = _Graph(model)
    stats = {"activation_qdq": 0, "output_qdq": 0, "int32_bias": 0}

    # 1. Weights: Q/DQ on a float initializer -> int8 codes + DQ (scale as fp32, axis 0).
    weights: Dict[str, Tuple[np.ndarray, np.ndarray, int]] = {}  # DQ output -> (codes, scale, axis)
    drop = set()
    for q in list(G.g.node):
        if q.op_type != "QuantizeLinear" or G.const(q.input[0]) is None:
            continue
        dqs = G.consumers.get(q.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        users = G.consumers.get(dqs[0].output[0], [])
        transpose = _linear_transpose(G, users)
        if transpose is None and (not users or any(
                u.op_type not in ("Conv", "Gemm", "ConvTranspose") or list(u.input).index(dqs[0].output[0]) != 1
                for u in users)):
            continue  # a weight read some other way: left as exported
        w = G.const(q.input[0]).astype(np.float32)
        scale = G.const(q.input[1]).astype(np.float32)
        axis = _axis(q) if scale.ndim == 1 else None
        s = scale.reshape([-1] + [1] * (w.ndim - 1)) if scale.ndim == 1 and axis in (0, None) else scale
        if scale.ndim == 1 and axis not in (0, None):
            shape = [1] * w.ndim
            shape[axis] = -1
            s = scale.reshape(shape)
        q_min, q_max = (-128, 127)
        codes = np.clip(np.rint(w / s), q_min, q_max).astype(np.int8)
        if transpose is not None:
            # A Linear on 3-D input: MatMul(x, W^T). The int8 codes go in transposed, per-channel along
            # the last axis (MatMul's B), and ONNX Runtime runs MatMulIntegerToFloat.
            if w.ndim != 2 or (scale.ndim == 1 and axis not in (0, None)):
                continue
            weights[transpose.output[0]] = (np.ascontiguousarray(codes.T), scale, 1)
            drop.update({id(q), id(dqs[0]), id(transpose)})
            continue
        weights[dqs[0].output[0]] = (codes, scale, axis if axis is not None else 0)
        drop.update({id(q), id(dqs[0])})

    # 2. Activation pairs: tensor -> scale (per tensor, non-constant input).
    pairs: Dict[str, List[Tuple[onnx.NodeProto, List[onnx.NodeProto], float, bool]]] = {}
    for q in G.g.node:
        if q.op_type != "QuantizeLinear" or id(q) in drop:
            continue
        scale = G.const(q.input[1])
        if scale is None or scale.size != 1:
            continue
        dqs = G.consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or G.is_graph_output(d.output[0]) for d in dqs) \
                or G.const(q.input[0]) is not None:
            continue  # a constant (e.g. a tied weight step 1 left alone) or an output: kept as exported
        zp = G.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        is_unsigned = zp is not None and zp.dtype == np.uint8
        if is_unsigned and int(zp.reshape(())) != 0:
            raise ValueError(f"{q.name}: uint8 activation Q with zero point {int(zp.reshape(()))}; "
                             "only symmetric (zero point 0) quantizers can be rewritten")
        pairs.setdefault(q.input[0], []).append((q, dqs, float(scale.reshape(())), is_unsigned))
    act_scale: Dict[str, float] = {}
    unsigned: set = set()  # tensors quantized to uint8 with zero point 0 (non-negative by construction)
    rename: Dict[str, str] = {}
    for tensor, group in pairs.items():
        if len({(value, is_u) for _, _, value, is_u in group}) > 1:
            # Quantizers reading one tensor with different scales (e.g. amax learned per quantizer in
            # QAT): each consumer keeps its own pair, on the uint8 grid; no output Q for the producer.
            for q, dqs, _, is_u in group:
                if not is_u:
                    zp = G.add_init(np.array(128, np.uint8), "act_zp")
                    for node in (q, *dqs):
                        while len(node.input) < 3:
                            node.input.append("")
                        node.input[2] = zp
            continue
        _, _, value, is_u = group[0]
        act_scale[tensor] = value
        if is_u:
            unsigned.add(tensor)
        for q, dqs, _, _ in group:
            for d in dqs:
                rename[d.output[0]] = _quantized_read(tensor)
                drop.add(id(d))
            drop.add(id(q))
    # Readers that went through the DQ read a placeholder (an Identity until step 5 makes it the new
    # DQ): readers of the raw tensor - a residual Add in a model quantized only at its Linear inputs,
    # say - keep the float value the fake-quant model gives them.
    placeholders = [helper.make_node("Identity", [t], [_quantized_read(t)], name=_quantized_read(t)) for t in act_scale]
    keep = [n for n in G.g.node if id(n) not in drop] + placeholders
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)

    # 3. Re-create weights as int8 initializer -> DQ. BatchNorm is not folded here: the exported model
    #    is the ORT flavour, where every BatchNorm PyTorch could fold already is (one left here was not
    #    folded there either, and folding it only here would break parity).
    del G.g.node[:]
    G.g.node.extend(keep)
    G.refresh()
    new_nodes: List[onnx.NodeProto] = []
    for n in list(G.g.node):
        if n.op_type not in ("Conv", "Gemm", "ConvTranspose", "MatMul") or len(n.input) < 2 or n.input[1] not in weights:
            continue
        codes, scale, axis = weights[n.input[1]]
        scale = scale.astype(np.float32).reshape(-1) if scale.ndim else scale.astype(np.float32)
        bias = G.const(n.input[2]).astype(np.float32) if len(n.input) > 2 and n.input[2] else None
        w_codes = G.add_init(codes, n.name or "w")
        w_scale = G.add_init(scale, (n.name or "w") + "_scale")
        w_zp = G.add_init(np.zeros(scale.shape, np.int8), (n.name or "w") + "_zp")
        dq_out = G.fresh((n.name or "w") + "_wdq")
        attrs = {"axis": int(axis)} if scale.ndim == 1 else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [w_codes, w_scale, w_zp], [dq_out],
                                          name=dq_out, **attrs))
        n.input[1] = dq_out
        if bias is not None:
            while len(n.input) < 3:
                n.input.append("")
            n.input[2] = G.add_init(bias, (n.name or "b") + "_bias")
    G.g.node.extend(new_nodes)
    _topo_sort(G.g)
    G.refresh()

    # 4. Output Q: copy each activation scale up through commuting ops to the producing op's output.
    scales = dict(act_scale)
    for tensor, s in list(act_scale.items()):
        if [c.op_type for c in G.consumers.get(tensor, [])] != ["Identity"]:
            continue  # a float reader too: quantizing the producer's output would change what it reads
        cur = tensor
        while True:
            p = G.producer.get(cur)
            if p is None or p.op_type not in _COMMUTING or not p.input or G.is_graph_output(cur):
                break  # (a graph output must keep its float value)
            src = p.input[0]
            if len(G.consumers.get(src, [])) != 1 or src in scales:
                break
            scales[src] = s
            if tensor in unsigned:  # Q_u(f(y)) == Q_u(f(Q_u(y))): f monotone, and f(y) < 0 iff it clamps to 0
                unsigned.add(src)
            cur = src

    # 5. Insert uint8 Q -> DQ (zero point 128, or 0 for unsigned) on every scaled tensor, for all consumers.
    inserted: List[onnx.NodeProto] = []
    for tensor, s in scales.items():
        if G.const(tensor) is not None:
            continue
        sc = G.add_init(np.array(s, np.float32), "act_scale")
        zp = G.add_init(np.array(0 if tensor in unsigned else 128, np.uint8), "act_zp")
        q_out = G.fresh(tensor + "_q")
        if tensor in act_scale:  # the DQ takes the placeholder's place: only quantized readers read it
            dq_out = _quantized_read(tensor)
            G.g.node.remove(G.producer[dq_out])
        else:  # a copied-up output Q: its tensor's only reader is the commuting op
            dq_out = G.fresh(tensor + "_dq")
            for c in G.consumers.get(tensor, []):
                for i, name in enumerate(c.input):
                    if name == tensor:
                        c.input[i] = dq_out
        inserted.append(helper.make_node("QuantizeLinear", [tensor, sc, zp], [q_out], name=q_out))
        inserted.append(helper.make_node("DequantizeLinear", [q_out, sc, zp], [dq_out], name=dq_out))
        stats["activation_qdq" if tensor in act_scale else "output_qdq"] += 1
    G.g.node.extend(inserted)
    _topo_sort(G.g)
    G.refresh()

    stats["activations_removed"] = _drop_noop_activations(G)

    # 6. int32 biases for Conv/Gemm whose activation input and weight are both dequantized (a MatMul's
    #    bias is a float Add after it, which the flavoured Linear already put on the same grid).
    for n in list(G.g.node):
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or not n.input[2]:
            continue
        x_dq, w_dq = G.producer.get(n.input[0]), G.producer.get(n.input[1])
        if not (x_dq and w_dq and x_dq.op_type == "DequantizeLinear" and w_dq.op_type == "DequantizeLinear"):
            continue
        bias = G.const(n.input[2])
        s_in = G.const(x_dq.input[1])
        s_w = G.const(w_dq.input[1])
        if bias is None or s_in is None or s_w is None or s_in.size != 1:
            continue
        qb, s_b = int32_bias(bias, float(s_in.reshape(())), s_w)
        b_codes = G.add_init(qb, (n.name or "b") + "_bq")
        b_scale = G.add_init(s_b.reshape(-1) if s_b.ndim else s_b, (n.name or "b") + "_bs")
        b_zp = G.add_init(np.zeros(s_b.reshape(-1).shape if s_b.ndim else (), np.int32), (n.name or "b") + "_bz")
        out = G.fresh((n.name or "b") + "_bdq")
        G.g.node.append(helper.make_node("DequantizeLinear", [b_codes, b_scale, b_zp], [out], name=out,
                                         **({"axis": 0} if s_b.ndim else {})))
        n.input[2] = out
        stats["int32_bias"] += 1
    _topo_sort(G.g)
    from .graph_passes import remove_unused_initializers

    remove_unused_initializers(model)
    return model, stats


def _quantized_read(tensor: str) -> str:
    return tensor + "__trtquant_dq"


def _linear_transpose(G: _Graph, users: List[onnx.NodeProto]) -> Optional[onnx.NodeProto]:
    """The Transpose of DQ(W) -> Transpose(perm 1,0) -> MatMul(x, .), the export of a Linear on 3-D input."""
    if len(users) != 1 or users[0].op_type != "Transpose" or list(_attr(users[0], "perm", [1, 0])) != [1, 0]:
        return None
    mm = G.consumers.get(users[0].output[0], [])
    if len(mm) != 1 or mm[0].op_type != "MatMul" or list(mm[0].input).index(users[0].output[0]) != 1:
        return None
    return users[0]


def _qparams(G: _Graph, node: onnx.NodeProto) -> Optional[Tuple[float, int, int]]:
    """(scale, zero point, dtype) of a per-tensor Q/DQ with constant parameters, else None."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    s, z = G.const(node.input[1]), G.const(node.input[2])
    if s is None or z is None or s.size != 1 or z.size != 1:
        return None
    return float(s.reshape(())), int(z.reshape(())), int(helper.np_dtype_to_tensor_dtype(z.dtype))


def _drop_noop_activations(G: _Graph) -> int:
    """DQ(s, zp 0, uint8) -> Relu|Clip -> Q(same) -> DQ: the activation cannot change a code, remove it.

    The output Q copied up in step 4 already clamps at 0 (and at code 255, which a ReLU6 max of 6
    also maps to when amax <= 6 + s/2), so the Relu/Clip and the Q -> DQ after it are identities. ONNX Runtime deletes such a Relu itself
    (ReluQuantFusion) but keeps the DQ -> Q pair left behind when the activation has several consumers
    (a ResNet block output feeds conv1 and the next identity), which costs a float round trip.
    """
    removed = 0
    for act in [n for n in G.g.node if n.op_type in ("Relu", "Clip")]:
        dq = G.producer.get(act.input[0])
        qs = G.consumers.get(act.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(qs) != 1 or qs[0].op_type != "QuantizeLinear" \
                or G.is_graph_output(act.output[0]):
            continue
        q = qs[0]
        p_in, p_out = _qparams(G, dq), _qparams(G, q)
        if p_in is None or p_in != p_out or p_in[1] != 0 or p_in[2] != onnx.TensorProto.UINT8:
            continue
        if act.op_type == "Clip":
            bounds = [act.input[i] if len(act.input) > i and act.input[i] else None for i in (1, 2)]
            if any(b is not None and G.const(b) is None for b in bounds):
                continue  # a computed bound: nothing is known about what it clips
            lo, hi = (None if b is None else G.const(b) for b in bounds)
            # A no-op on codes when lo quantizes to 0 and hi to 255 (QuantizeLinear: float32 x / s,
            # half to even): every value the Clip changes lands on the code it would have had anyway.
            s32 = np.float32(p_in[0])
            if (lo is not None and np.rint(np.float32(lo) / s32) > 0) or \
                    (hi is not None and np.rint(np.float32(hi) / s32) < 255):
                continue
        dqs = G.consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or _qparams(G, d) != p_in for d in dqs):
            continue
        for d in dqs:
            for c in G.consumers.get(d.output[0], []):
                for i, name in enumerate(c.input):
                    if name == d.output[0]:
                        c.input[i] = dq.output[0]
            for o in G.g.output:
                if o.name == d.output[0]:
                    o.name = dq.output[0]
            G.g.node.remove(d)
        G.g.node.remove(q)
        G.g.node.remove(act)
        G.refresh()
        removed += 1
    return removed


def _topo_sort(g: onnx.GraphProto) -> None:
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    ordered: List[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise ValueError(f"graph has a cycle or a missing input near {rest[0].op_type} '{rest[0].name}'")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def int8_conv_fraction(optimized: onnx.ModelProto) -> Tuple[int, int]:
    """(Conv layers running as INT8 kernels, all Conv layers) in ONNX Runtime's optimized model."""
    int8 = sum(1 for n in optimized.graph.node if n.op_type in ("QLinearConv",) or
               (n.domain == "com.microsoft" and n.op_type in ("QLinearConv", "NhwcQLinearConv")))
    fp = sum(1 for n in optimized.graph.node if n.op_type in ("Conv", "FusedConv", "NchwcConv"))
    return int8, int8 + fp
