"""C. Placement rules that decide INT8 fusion (C17-C22): partial quantization, Conv epilogues,
residual Adds, Concat scales, redundant or useless Q/DQ.

C20 and C21 call the structural rules of :mod:`trtquant.graph.dag` (residual identity, concat
sharing) through the ONNX adapter, the same rules placement applies through torch.fx.
"""

from __future__ import annotations

from collections.abc import Iterator

from trtquant.graph import ops
from trtquant.graph.dag import concat_quantizer_groups, residual_split
from trtquant.graph.index import is_default_domain, names_of

from .context import FP8, INT4, Ctx, consumers_of, fmt, rule, same, walk_back
from .report import Finding

#: The linear part of a conv epilogue (BN, Identity, bias add/scale): a Q/DQ after it still sits on
#: the conv output, before the activation (C19).
_EPILOGUE = ops.CONV_EPILOGUE & {"BatchNormalization", "Identity", ops.AFFINE}
#: From a Q back to the weighted layer whose output it quantizes (C18).
_OUTPUT_PATH = _EPILOGUE | (ops.ACTIVATIONS & {"Relu", "LeakyRelu", "Clip"})
#: Ops a Q/DQ pair on both sides of is redundant (C22); Identity is no layer, so not reported.
_REDUNDANT = ops.COMMUTING - {"Identity"}


def _feeds_quantizable(ctx: Ctx, tensor: str, depth: int = 0) -> bool:
    for _, _, node in ctx.g.consumer_nodes(tensor):
        if node.op_type in ops.QUANTIZABLE:
            return True
        if node.op_type in ops.COMMUTING and depth < 16 and any(
                _feeds_quantizable(ctx, t, depth + 1) for t in node.output):
            return True
    return False


@rule("C17-partial-quant")
def _c17_partial(ctx: Ctx) -> Iterator[Finding]:
    for i, node in ctx.weighted():
        if len(node.input) < 2:
            continue
        act, wt = ctx.behind_dq(node.input[0]), ctx.behind_dq(node.input[1])
        w_dq = ctx.dq_of(node.input[1]) if wt else None
        if wt and not act and w_dq is not None and w_dq.qdtype in INT4:
            continue  # INT4 is weight-only in TensorRT: float (FP16) activations are the design
        if act != wt:
            have, miss = ("weight", "activation") if wt else ("activation", "weight")
            missing = node.input[0] if wt else node.input[1]
            yield Finding("warning", "C17-partial-quant", (ctx.g.names[i],),
                          f"only the {have} input of {node.op_type} {ctx.g.names[i]!r} is behind DequantizeLinear; "
                          f"the {miss} {missing!r} is float, so TensorRT runs it in float",
                          f"add a Q/DQ pair on the {miss} input {missing!r} (or remove the other one)")


@rule("C18-output-qdq")
def _c18_output_qdq(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        if not q.is_q:
            continue
        src = walk_back(ctx, q.x, _OUTPUT_PATH, ops.WEIGHTED)
        dqs = consumers_of(ctx, q.y, frozenset({ops.DQ}))
        if src is None or not dqs:
            continue
        if walk_back(ctx, q.x, _EPILOGUE, ops.WEIGHTED) is not None and any(
                consumers_of(ctx, g.nodes[d].output[0], ops.ACTIVATIONS) for d in dqs):
            continue  # C19
        if any(_feeds_quantizable(ctx, g.nodes[d].output[0]) for d in dqs):
            continue
        yield Finding("warning", "C18-output-qdq", (g.names[src], *ctx.names(q.idx)),
                      f"{ctx.desc(q.idx)} quantizes the output of {g.nodes[src].op_type} {g.names[src]!r}, but no "
                      "quantizable op (Conv/Gemm/MatMul/Pool/Add) consumes it: TensorRT gains nothing and adds a "
                      "reformat", f"remove the Q/DQ after {g.names[src]!r}; quantize inputs of weighted ops only")


@rule("C19-conv-act-qdq")
def _c19_conv_activation(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for q in ctx.qdq.values():
        if not q.is_q:
            continue
        src = walk_back(ctx, q.x, _EPILOGUE, ops.WEIGHTED)
        if src is None:
            continue
        for d in consumers_of(ctx, q.y, frozenset({ops.DQ})):
            acts = consumers_of(ctx, g.nodes[d].output[0], ops.ACTIVATIONS)
            if acts:
                act = g.nodes[acts[0]].op_type
                yield Finding("warning", "C19-conv-act-qdq", names_of(g, [src, q.idx, d, *acts]),
                              f"Q/DQ {g.names[q.idx]!r} -> {g.names[d]!r} sits between {g.nodes[src].op_type} "
                              f"{g.names[src]!r} and {act} {g.names[acts[0]]!r}: TensorRT cannot fuse "
                              f"{g.nodes[src].op_type}+{act} (Conv+BN+ReLU) across it",
                              f"move the Q/DQ after {g.names[acts[0]]!r} (onto the next weighted op's input)")


def _fp8_weighted(ctx: Ctx, idx: int) -> bool:
    dq = ctx.dq_of(ctx.g.nodes[idx].input[1])
    return dq is not None and dq.qdtype in FP8


@rule("C20-residual-add")
def _c20_residual_add(ctx: Ctx) -> Iterator[Finding]:
    g, dag = ctx.g, ctx.dag
    for i, node in enumerate(g.nodes):
        if node.op_type != "Add" or not is_default_domain(node):
            continue
        split = residual_split(dag, i)  # the rule placement uses too
        if split is None:
            continue
        c, s, conv = split.branch, split.identity, split.source
        assert isinstance(conv, int)
        cq, sq = ctx.behind_dq(node.input[c]), ctx.behind_dq(node.input[s])
        add, cv, op = g.names[i], g.names[conv], dag.op(conv)
        where = (f"residual Add {add!r} ({op} branch: input {c} {node.input[c]!r} from {op} {cv!r}; identity: "
                 f"input {s} {node.input[s]!r})")
        if sq and not cq:
            continue
        dq_nodes = [dq.idx for k in (c, s) if (dq := ctx.dq_of(node.input[k])) is not None]
        nodes = names_of(g, [i, conv, *dq_nodes])
        if cq and sq:
            yield Finding("warning", "C20-residual-add", nodes,
                          f"both Add inputs quantized in {where}: TensorRT cannot fuse the Add into the {op} "
                          "epilogue (suboptimal)",
                          f"remove the Q/DQ on the branch input {node.input[c]!r}; keep the one on the identity")
        elif cq:
            yield Finding("warning", "C20-residual-add", nodes,
                          f"branch quantized but identity float in {where}: the {op}+Add fusion cannot run in "
                          "INT8 ('the precision of the first input to the element-wise addition determines the "
                          "precision of the output of the fusion')",
                          f"move the quantizer from {node.input[c]!r} to the identity input {node.input[s]!r}")
        elif ctx.quantized_weighted(conv) and not _fp8_weighted(ctx, conv):  # FP8: no residual Q/DQ (C28)
            yield Finding("warning", "C20-residual-add", nodes,
                          f"no quantized input in {where} while {op} {cv!r} is quantized: the identity input is "
                          f"float, so TensorRT cannot fuse {op}+Add in INT8",
                          f"add a quantizer on the identity input {node.input[s]!r} so {op}+Add fuses in INT8")


@rule("C21-concat")
def _c21_concat(ctx: Ctx) -> Iterator[Finding]:
    g, dag = ctx.g, ctx.dag
    for i, dq_idx in concat_quantizer_groups(dag, range(len(g.nodes))):  # the rule placement uses too
        assert isinstance(i, int)
        ins = dag.data_tensors(i)
        dqs = [ctx.qdq.get(d) if d is not None else None for d in dq_idx]
        if not all(dqs):
            floats = [t for t, d in zip(ins, dqs) if d is None]
            yield Finding("warning", "C21-concat", (g.names[i],),
                          f"Concat {g.names[i]!r} mixes quantized and float inputs (float: {', '.join(floats)}): "
                          "TensorRT cannot produce one INT8 output tensor and inserts reformats",
                          "quantize every Concat input with the same scale, or none")
            continue
        scales = [d.scale for d in dqs if d is not None]
        if any(s is None for s in scales) or all(same(scales[0], s) for s in scales[1:]):
            continue
        yield Finding("warning", "C21-concat", (g.names[i], *names_of(g, [d.idx for d in dqs if d])),
                      f"Concat {g.names[i]!r} inputs have different scales ({'; '.join(fmt(s) for s in scales)}): "
                      "TensorRT needs one scale for a concatenated INT8 tensor and requantizes the inputs",
                      "share one quantizer (one amax) between all Concat inputs")


@rule("C22-redundant-qdq", "C22-fusible", "C22-float-island")
def _c22_infos(ctx: Ctx) -> Iterator[Finding]:
    g = ctx.g
    for i, node in enumerate(g.nodes):
        if not is_default_domain(node) or node.op_type not in _REDUNDANT | ops.INT8_FUSIBLE or not node.input:
            continue
        outs = [c for t in node.output[:1] for c in g.consumer_nodes(t)]
        src = ctx.dq_of(node.input[0])
        if src is None or not outs or any(n.op_type != ops.Q for _, _, n in outs):
            continue
        dq, qs = src.idx, [c[0] for c in outs]
        if node.op_type in _REDUNDANT:
            yield Finding("info", "C22-redundant-qdq", names_of(g, [dq, i, *qs]),
                          f"{node.op_type} {g.names[i]!r} is wrapped in Q/DQ: TensorRT moves Q/DQ across "
                          f"{node.op_type}, so one of the two pairs is redundant",
                          f"keep one pair: drop the Q/DQ before {g.names[i]!r} unless another consumer needs it")
        else:
            yield Finding("info", "C22-fusible", names_of(g, [dq, i, *qs]),
                          f"{node.op_type} {g.names[i]!r} has a quantized input and a quantized output: TensorRT "
                          "can run it in INT8", "no change needed")
    for q in ctx.qdq.values():
        cons = [c for d in consumers_of(ctx, q.y, frozenset({ops.DQ})) for c in consumers_of(ctx, g.nodes[d].output[0])]
        if q.is_q and cons and all(g.nodes[c].op_type in ops.FLOAT_ISLAND for c in cons):
            yield Finding("info", "C22-float-island", (*ctx.names(q.idx), *names_of(g, cons)),
                          f"{ctx.desc(q.idx)} feeds only {', '.join(sorted({g.nodes[c].op_type for c in cons}))}, "
                          "which TensorRT runs in float: the Q/DQ only adds a quantize/dequantize",
                          "remove this Q/DQ unless it is there for accuracy parity")
