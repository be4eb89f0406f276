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
from onnx import helper

from ..graph import ops
from ..graph.index import GraphIndex
from .graph_passes import set_metadata


def fold_bn_scale(weight_scale: np.ndarray, gamma, beta, mean, var, eps: float, bias=None):
    """(folded per-channel weight scale, folded float32 bias, sign per channel) - shared with the torch side."""
    g = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    scale = (np.asarray(weight_scale, np.float64).reshape(-1) * np.abs(g)).astype(np.float32)
    b = np.zeros_like(g) if bias is None else np.asarray(bias, np.float64)
    folded_bias = ((b - np.asarray(mean, np.float64)) * g + np.asarray(beta, np.float64)).astype(np.float32)
    return scale, folded_bias, np.where(g < 0, -1, 1).astype(np.int8)


#: The largest |(x - zp_x) * (w - zp_w)| of one product in ONNX Runtime's integer kernels: uint8
#: activations with zero point 0 (0..255) times weights -128..127 (zero point 0 or 128).
_MAX_PRODUCT = 255 * 128


def int32_bias_limit(fan_in: int) -> int:
    """The largest |bias code| that cannot overflow the int32 accumulator it is added to.

    QLinearConv/QGemm add the bias codes to a sum of ``fan_in`` products in int32; a code at the int32
    limit wraps around there (a random-init GoogLeNet whose activations shrink to 1e-13 gave its
    classifier bias code 2**31 - 1 and cosine 0.02 after ONNX Runtime fused the layer).
    """
    return max(0, 2**31 - 1 - int(fan_in) * _MAX_PRODUCT)


def int32_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray,
               fan_in: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Bias on the accumulator grid, as integer kernels add it: (int32 codes, float32 scale s_in * s_w).

    ``fan_in`` (products per output: in_channels / groups * kernel size) keeps the codes within
    :func:`int32_bias_limit`, so the fused kernel's int32 sum cannot overflow.
    """
    s_b = (np.float32(input_scale) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    s_b = np.where(s_b > 0, s_b, np.float32(1.0)).astype(np.float32)
    limit = int32_bias_limit(fan_in)
    codes = np.clip(np.rint(np.asarray(bias, np.float64) / s_b), -limit, limit).astype(np.int32)
    return codes, s_b


#: Weighted layers that read their weight's DQ directly at input 1 (a MatMul reads it through a Transpose).
_WEIGHT_AT_SLOT_1 = ops.WEIGHTED - {"MatMul"}


def _users(g: GraphIndex, tensor: str) -> List[onnx.NodeProto]:
    """The nodes reading ``tensor``, once per input slot that reads it (node order)."""
    return [node for _, _, node in g.consumer_nodes(tensor)]


#: ONNX metadata key recording the weight code type of an ONNX Runtime graph ('int8' or 'uint8').
WEIGHTS_KEY = "trtquant.ort_weights"


#: ONNX metadata key: the op types that read a dequantized activation and run in float in ONNX Runtime
#: (comma-separated; empty when every quantized value stays in INT8 kernels).
FLOAT_OPS_KEY = "trtquant.ort_float_ops"


def float_op_types(g: GraphIndex) -> List[str]:
    """Op types reading a dequantized activation that ONNX Runtime has no INT8 kernel for (sorted).

    They run in float between the DQ and the next Q (HardSigmoid/HardSwish, the Sigmoid and Mul of
    SiLU, LayerNormalization, ...); the convs around them still run INT8. Shape/Size read only the
    shape (a detection head's reshape of its conv output), no values.
    """
    found = set()
    for _, n in g.live_nodes():
        if n.op_type != "DequantizeLinear" or g.const(n.input[0]) is not None:
            continue
        found.update(c.op_type for c in _users(g, n.output[0])
                     if c.op_type not in ops.ORT_INT8_OPS and c.op_type not in ("Shape", "Size"))
    return sorted(found)


def host_weight_dtype(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'uint8' on an x86-64 CPU without VNNI, else 'int8': the weight codes ONNX Runtime runs exactly here.

    Without VNNI, MLAS multiplies uint8 activations by int8 weights with VPMADDUBSW, which saturates
    the int16 sum of two products (ONNX Runtime's quantization guide: "Data type selection" - use
    U8U8 or reduce_range against it), so results drift from the fake-quant model wherever large codes
    meet. uint8 weights with zero point 128 are the same grid and take the exact U8U8 kernels; with
    VNNI (VPDPBUSD accumulates in int32) and on Arm, int8 weights are exact and faster.
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "int8"
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return "uint8"  # unknown x86 CPU: the exact choice
    return "int8" if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags.split()) else "uint8"


def to_onnxruntime_graph(model: onnx.ModelProto, weight_dtype: str = "int8") -> Tuple[onnx.ModelProto, Dict[str, int]]:
    """Rewrite a TensorRT Q/DQ model (fp32) in place for ONNX Runtime INT8; returns it and counts.

    ``weight_dtype`` 'uint8' writes every weight as uint8 codes + 128 with zero point 128 (the same
    values; see :func:`host_weight_dtype`).
    """
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"weight_dtype must be 'int8' or 'uint8', got {weight_dtype!r}")
    g = GraphIndex(model, name_tag="__ort")
    stats = {"activation_qdq": 0, "output_qdq": 0, "int32_bias": 0}

    # 1. Weights: Q/DQ on a float initializer -> int8 codes + DQ (scale as fp32, axis 0).
    weights: Dict[str, Tuple[np.ndarray, np.ndarray, int]] = {}  # DQ output -> (codes, scale, axis)
    drop = set()  # node indices
    for qi, q in enumerate(g.nodes):
        if q.op_type != "QuantizeLinear" or g.const(q.input[0]) is None:
            continue
        dqs = list(g.consumer_nodes(q.output[0]))
        if len(dqs) != 1 or dqs[0][2].op_type != "DequantizeLinear":
            continue
        dqi, dq = dqs[0][0], dqs[0][2]
        users = _users(g, dq.output[0])
        transpose = _linear_transpose(g, users)
        if transpose is None and (not users or any(
                u.op_type not in _WEIGHT_AT_SLOT_1 or list(u.input).index(dq.output[0]) != 1
                for u in users)):
            continue  # a weight read some other way: left as exported
        w = g.const(q.input[0]).astype(np.float32)
        scale = g.const(q.input[1]).astype(np.float32)
        axis = g.attr(q, "axis") if scale.ndim == 1 else None
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
            drop.update({qi, dqi, g.producer[transpose.output[0]]})
            continue
        weights[dq.output[0]] = (codes, scale, axis if axis is not None else 0)
        drop.update({qi, dqi})

    # 2. Activation pairs: tensor -> scale (per tensor, non-constant input).
    pairs: Dict[str, List[Tuple[int, List[int], float, bool]]] = {}
    for qi, q in enumerate(g.nodes):
        if q.op_type != "QuantizeLinear" or qi in drop:
            continue
        scale = g.const(q.input[1])
        if scale is None or scale.size != 1:
            continue
        dq_ids = [i for i, _, _ in g.consumer_nodes(q.output[0])]
        if not dq_ids or any(g.nodes[d].op_type != "DequantizeLinear" for d in dq_ids) \
                or g.const(q.input[0]) is not None:
            continue  # a constant (e.g. a tied weight step 1 left alone): kept as exported
        zp = g.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        is_unsigned = zp is not None and zp.dtype == np.uint8
        if is_unsigned and int(zp.reshape(())) != 0:
            raise ValueError(f"{q.name}: uint8 activation Q with zero point {int(zp.reshape(()))}; "
                             "only symmetric (zero point 0) quantizers can be rewritten")
        pairs.setdefault(q.input[0], []).append((qi, dq_ids, float(scale.reshape(())), is_unsigned))
    act_scale: Dict[str, float] = {}
    unsigned: set = set()  # tensors quantized to uint8 with zero point 0 (non-negative by construction)
    rename: Dict[str, str] = {}
    output_reads: List[Tuple[str, str]] = []  # (graph output, the quantized read it becomes an Identity of)
    for tensor, group in pairs.items():
        if len({(value, is_u) for _, _, value, is_u in group}) > 1:
            # Quantizers reading one tensor with different scales (e.g. amax learned per quantizer in
            # QAT): each consumer keeps its own pair, on the uint8 grid; no output Q for the producer.
            for qi, dq_ids, _, is_u in group:
                if not is_u:
                    zp_name = g.add_initializer(np.array(128, np.uint8), "act_zp")
                    for i in (qi, *dq_ids):
                        g.set_input(i, 2, zp_name)
            continue
        _, _, value, is_u = group[0]
        act_scale[tensor] = value
        if is_u:
            unsigned.add(tensor)
        for qi, dq_ids, _, _ in group:
            for d in dq_ids:
                out = g.nodes[d].output[0]
                if g.is_graph_output(out):  # a quantized model output (Faster R-CNN's FPN features)
                    output_reads.append((out, _quantized_read(tensor)))
                else:
                    rename[out] = _quantized_read(tensor)
                drop.add(d)
            drop.add(qi)
    # Readers that went through the DQ read a placeholder (an Identity until step 5 makes it the new
    # DQ): readers of the raw tensor - a residual Add in a model quantized only at its Linear inputs,
    # say - keep the float value the fake-quant model gives them.
    for i in sorted(drop):
        g.remove_node(i)
    for t in act_scale:
        g.add_node(helper.make_node("Identity", [t], [_quantized_read(t)], name=_quantized_read(t)))
    for old, new in rename.items():
        g.replace_uses(old, new)
    for out, read in output_reads:
        g.add_node(helper.make_node("Identity", [read], [out], name=out + "_out"))
    g.commit()

    # 3. Re-create weights as int8 initializer -> DQ. BatchNorm is not folded here: the exported model
    #    is the ORT flavour, where every BatchNorm PyTorch could fold already is (one left here was not
    #    folded there either, and folding it only here would break parity).
    for i, n in list(g.live_nodes()):
        if n.op_type not in ops.WEIGHTED or len(n.input) < 2 or n.input[1] not in weights:
            continue
        codes, scale, axis = weights[n.input[1]]
        scale = scale.astype(np.float32).reshape(-1) if scale.ndim else scale.astype(np.float32)
        bias = g.const(n.input[2]).astype(np.float32) if len(n.input) > 2 and n.input[2] else None
        if weight_dtype == "uint8":
            codes, zp = (codes.astype(np.int16) + 128).astype(np.uint8), np.full(scale.shape, 128, np.uint8)
        else:
            zp = np.zeros(scale.shape, np.int8)
        w_codes = g.add_initializer(codes, n.name or "w")
        w_scale = g.add_initializer(scale, (n.name or "w") + "_scale")
        w_zp = g.add_initializer(zp, (n.name or "w") + "_zp")
        dq_out = g.fresh((n.name or "w") + "_wdq")
        attrs = {"axis": int(axis)} if scale.ndim == 1 else {}
        g.add_node(helper.make_node("DequantizeLinear", [w_codes, w_scale, w_zp], [dq_out], name=dq_out, **attrs))
        g.set_input(i, 1, dq_out)
        if bias is not None:
            g.set_input(i, 2, g.add_initializer(bias, (n.name or "b") + "_bias"))
    g.toposort_()

    # 4. Output Q: copy each activation scale up through commuting ops to the producing op's output.
    scales, unsigned = _copy_scales_up(g, act_scale, unsigned)

    # 5. Insert uint8 Q -> DQ (zero point 128, or 0 for unsigned) on every scaled tensor, for all consumers.
    for tensor, s in scales.items():
        if g.const(tensor) is not None:
            continue
        sc = g.add_initializer(np.array(s, np.float32), "act_scale")
        zp_name = g.add_initializer(np.array(0 if tensor in unsigned else 128, np.uint8), "act_zp")
        q_out = g.fresh(tensor + "_q")
        if tensor in act_scale:  # the DQ takes the placeholder's place: only quantized readers read it
            dq_out = _quantized_read(tensor)
            g.remove_node(g.producer[dq_out])
        else:  # a copied-up output Q: its tensor's only reader is the commuting op
            dq_out = g.fresh(tensor + "_dq")
            g.replace_uses(tensor, dq_out)
        # A tensor that was itself a DQ output (a quantizer right after another one: Q1 -> DQ1 -> Q2) is
        # read where that DQ's readers now read it.
        g.add_node(helper.make_node("QuantizeLinear", [rename.get(tensor, tensor), sc, zp_name], [q_out], name=q_out))
        g.add_node(helper.make_node("DequantizeLinear", [q_out, sc, zp_name], [dq_out], name=dq_out))
        stats["activation_qdq" if tensor in act_scale else "output_qdq"] += 1
    g.toposort_()

    stats["activations_removed"] = _drop_noop_activations(g)

    # 6. int32 biases for Conv/Gemm whose activation input and weight are both dequantized (a MatMul's
    #    bias is a float Add after it, which the flavoured Linear already put on the same grid).
    for i, n in list(g.live_nodes()):
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or not n.input[2]:
            continue
        x_dq, w_dq = g.producer_of(n.input[0]), g.producer_of(n.input[1])
        if not (x_dq and w_dq and x_dq.op_type == "DequantizeLinear" and w_dq.op_type == "DequantizeLinear"):
            continue
        bias = g.const(n.input[2])
        s_in = g.const(x_dq.input[1])
        s_w = g.const(w_dq.input[1])
        if bias is None or s_in is None or s_w is None or s_in.size != 1:
            continue
        w_codes = g.const(w_dq.input[0])
        fan_in = int(w_codes.size // max(1, bias.size)) if w_codes is not None else 2**31 // _MAX_PRODUCT
        qb, s_b = int32_bias(bias, float(s_in.reshape(())), s_w, fan_in)
        b_codes = g.add_initializer(qb, (n.name or "b") + "_bq")
        b_scale = g.add_initializer(s_b.reshape(-1) if s_b.ndim else s_b, (n.name or "b") + "_bs")
        b_zp = g.add_initializer(np.zeros(s_b.reshape(-1).shape if s_b.ndim else (), np.int32), (n.name or "b") + "_bz")
        out = g.fresh((n.name or "b") + "_bdq")
        g.add_node(helper.make_node("DequantizeLinear", [b_codes, b_scale, b_zp], [out], name=out,
                                    **({"axis": 0} if s_b.ndim else {})))
        g.set_input(i, 2, out)
        stats["int32_bias"] += 1
    g.toposort_()
    float_ops = float_op_types(g)
    stats["float_op_types"] = len(float_ops)
    set_metadata(model, FLOAT_OPS_KEY, ",".join(float_ops))
    from .graph_passes import remove_unused_initializers

    remove_unused_initializers(model)
    return model, stats


def _data_inputs(node: onnx.NodeProto) -> List[str]:
    """The inputs of a copy op that carry the quantized values (every Concat input; slot 0 otherwise)."""
    return [t for t in node.input if t] if node.op_type == "Concat" else list(node.input[:1])


def _copies_scale(g: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether ``Q(node(y)) == node(Q(y))`` exactly, so an output Q may move to the op's data inputs."""
    if node.op_type in ops.ORT_OUTPUT_COPY:
        return bool(node.input)
    if node.op_type not in ops.ORT_OUTPUT_COPY_MOVES or len(node.output) != 1:
        return False
    if node.op_type == "Pad":
        if g.attr(node, "mode", b"constant") not in (b"constant", "constant"):
            return False
        value = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
        return value is not None and value.size == 1 and float(value.reshape(())) == 0.0
    return True


def _copy_scales_up(g: GraphIndex, act_scale: Dict[str, float], unsigned: set) -> Tuple[Dict[str, float], set]:
    """Scales for producer outputs: a tensor gets the scale of what it feeds when every reader of it is a
    copy op (:func:`_copies_scale`) whose output has that one scale (and signedness).

    Concat hands its output scale to every input (an inception branch's conv gets its output Q), Pad,
    Transpose, Reshape and Slice hand it through (a zero-padded depthwise input, a channel shuffle);
    a tensor with any other reader keeps its float value. The walk goes back from every quantized
    tensor whose only reader is its quantizer.
    """
    scales = dict(act_scale)
    unsigned = set(unsigned)
    frontier = [t for t in act_scale if [c.op_type for c in _users(g, t)] == ["Identity"]]
    while frontier:  # until no tensor gains a scale (a Concat input waits for all its readers)
        gained = []
        for cur in frontier:
            p = g.producer_of(cur)
            if p is None or g.is_graph_output(cur) or not _copies_scale(g, p):
                continue
            for src in _data_inputs(p):
                agreed = None if src in scales or g.const(src) is not None or g.is_graph_output(src) \
                    or _is_dequantized(g, src) else _agreed_scale(g, src, scales, unsigned)
                if agreed is not None:
                    scales[src] = agreed[0]
                    if agreed[1]:  # Q_u(f(y)) == Q_u(f(Q_u(y))): f moves data or is monotone, f(y) < 0 iff clamped to 0
                        unsigned.add(src)
                    gained.append(src)
        frontier = gained + [t for t in frontier if t not in gained and _waiting(g, t, scales)] if gained else []
    return scales, unsigned


def _is_dequantized(g: GraphIndex, tensor: str) -> bool:
    """A DQ output (or the placeholder that becomes one): a second Q there makes Q1 -> DQ1 -> Q2 -> DQ2,
    which ONNX Runtime's DoubleQDQPairsRemover collapses into one pair with a recomputed scale (not
    what the two roundings compute: a GoogLeNet lost cosine 0.999 -> 0.92 that way)."""
    p = g.producer_of(tensor)
    return p is not None and (p.op_type == "DequantizeLinear" or tensor.endswith(_quantized_read("")))


def _waiting(g: GraphIndex, tensor: str, scales: Dict[str, float]) -> bool:
    """Whether an input of ``tensor``'s copy-op producer is still without a scale (worth another look)."""
    p = g.producer_of(tensor)
    return p is not None and _copies_scale(g, p) and any(t not in scales for t in _data_inputs(p))


def _agreed_scale(g: GraphIndex, src: str, scales: Dict[str, float], unsigned: set) -> Optional[Tuple[float, bool]]:
    """(scale, unsigned) when every reader of ``src`` is a copy op reading it as data whose output has
    that one scale; else None."""
    outs = set()
    for _, slot, r in g.consumer_nodes(src):
        if not _copies_scale(g, r) or (r.op_type != "Concat" and slot != 0) or r.output[0] not in scales:
            return None
        outs.add((scales[r.output[0]], r.output[0] in unsigned))
    return next(iter(outs)) if len(outs) == 1 else None


def _quantized_read(tensor: str) -> str:
    return tensor + "__trtquant_dq"


def _linear_transpose(g: GraphIndex, users: List[onnx.NodeProto]) -> Optional[onnx.NodeProto]:
    """The Transpose of DQ(W) -> Transpose(perm 1,0) -> MatMul(x, .), the export of a Linear on 3-D input."""
    if len(users) != 1 or users[0].op_type != "Transpose" or list(g.attr(users[0], "perm", [1, 0])) != [1, 0]:
        return None
    mm = _users(g, users[0].output[0])
    if len(mm) != 1 or mm[0].op_type != "MatMul" or list(mm[0].input).index(users[0].output[0]) != 1:
        return None
    return users[0]


def _qparams(g: GraphIndex, node: onnx.NodeProto) -> Optional[Tuple[float, int, int]]:
    """(scale, zero point, dtype) of a per-tensor Q/DQ with constant parameters, else None."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    s, z = g.const(node.input[1]), g.const(node.input[2])
    if s is None or z is None or s.size != 1 or z.size != 1:
        return None
    return float(s.reshape(())), int(z.reshape(())), int(helper.np_dtype_to_tensor_dtype(z.dtype))


def _drop_noop_activations(g: GraphIndex) -> int:
    """DQ(s, zp 0, uint8) -> Relu|Clip -> Q(same) -> DQ: the activation cannot change a code, remove it.

    The output Q copied up in step 4 already clamps at 0 (and at code 255, which a ReLU6 max of 6
    also maps to when amax <= 6 + s/2), so the Relu/Clip and the Q -> DQ after it are identities. ONNX Runtime deletes such a Relu itself
    (ReluQuantFusion) but keeps the DQ -> Q pair left behind when the activation has several consumers
    (a ResNet block output feeds conv1 and the next identity), which costs a float round trip.
    """
    removed = 0
    for ai, act in [(i, n) for i, n in g.live_nodes() if n.op_type in ("Relu", "Clip")]:
        if ai in g.removed:
            continue
        dq = g.producer_of(act.input[0])
        qs = list(g.consumer_nodes(act.output[0]))
        if dq is None or dq.op_type != "DequantizeLinear" or len(qs) != 1 or qs[0][2].op_type != "QuantizeLinear" \
                or g.is_graph_output(act.output[0]):
            continue
        qi, q = qs[0][0], qs[0][2]
        p_in, p_out = _qparams(g, dq), _qparams(g, q)
        if p_in is None or p_in != p_out or p_in[1] != 0 or p_in[2] != onnx.TensorProto.UINT8:
            continue
        if act.op_type == "Clip":
            bounds = [act.input[i] if len(act.input) > i and act.input[i] else None for i in (1, 2)]
            if any(b is not None and g.const(b) is None for b in bounds):
                continue  # a computed bound: nothing is known about what it clips
            lo, hi = (None if b is None else g.const(b) for b in bounds)
            # A no-op on codes when lo quantizes to 0 and hi to 255 (QuantizeLinear: float32 x / s,
            # half to even): every value the Clip changes lands on the code it would have had anyway.
            s32 = np.float32(p_in[0])
            if (lo is not None and np.rint(np.float32(lo) / s32) > 0) or \
                    (hi is not None and np.rint(np.float32(hi) / s32) < 255):
                continue
        dqs = list(g.consumer_nodes(q.output[0]))
        if not dqs or any(d.op_type != "DequantizeLinear" or _qparams(g, d) != p_in for _, _, d in dqs):
            continue
        for di, _, d in dqs:
            g.replace_uses(d.output[0], dq.output[0], graph_outputs=True)
            g.remove_node(di)
        g.remove_node(qi)
        g.remove_node(ai)
        removed += 1
    g.commit()
    return removed


def int8_conv_fraction(optimized: onnx.ModelProto) -> Tuple[int, int]:
    """(Conv layers running as INT8 kernels, all Conv layers) in ONNX Runtime's optimized model."""
    int8 = sum(1 for n in optimized.graph.node if n.op_type in ("QLinearConv",) or
               (n.domain == "com.microsoft" and n.op_type in ("QLinearConv", "NhwcQLinearConv")))
    fp = sum(1 for n in optimized.graph.node if n.op_type in ("Conv", "FusedConv", "NchwcConv"))
    return int8, int8 + fp
