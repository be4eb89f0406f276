"""GraphIndex as the one graph model: read-only queries, and the mutable mode graph rewrites use."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtquant.graph.index import GraphIndex


def _model(nodes, inits=(), outputs=("y",), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 4]) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _block() -> onnx.ModelProto:
    """x -> Identity(a) -> Relu(r) -> Add(a, r) -> Mul(., w) -> y."""
    return _model([
        helper.make_node("Identity", ["x"], ["a"], name="id"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Add", ["a", "r"], ["s"], name="add"),
        helper.make_node("Mul", ["s", "w"], ["y"], name="mul"),
    ], inits=[("w", np.full((1, 4), 2.0, np.float32))])


def _maps(g: GraphIndex):
    """Producers and consumers by node name (comparable across renumbering)."""
    prod = {t: g.nodes[i].name for t, i in g.producer.items()}
    cons = {t: sorted((g.nodes[i].name, s) for i, s in uses) for t, uses in g.consumers.items() if uses}
    return prod, cons


def _assert_maps_exact(g: GraphIndex) -> None:
    """The incrementally kept maps equal the maps of a fresh index over the committed model."""
    before = _maps(g)
    g.commit()
    assert _maps(g) == before
    assert _maps(GraphIndex(g.model)) == before


def test_read_only_structure() -> None:
    g = GraphIndex(_block())
    assert g.names == ["id", "relu", "add", "mul"]
    assert g.producer_of("r").name == "relu" and g.producer_of("x") is None
    assert sorted((g.names[i], s) for i, s, _ in g.consumer_nodes("a")) == [("add", 0), ("relu", 0)]
    assert g.op_of("s") == "Add" and g.inputs == ["x"] and g.outputs == ["y"]
    assert g.topo_order() == [0, 1, 2, 3]
    assert g.attr(helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), "perm") == [1, 0]


def test_constants_through_passthrough_ops() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = _model([
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([3, 2], np.int64))),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("Reshape", ["wt", "shape"], ["wr"]),
        helper.make_node("Cast", ["wr"], ["wc"], to=TensorProto.FLOAT16),
        helper.make_node("Unsqueeze", ["wc", "ax"], ["wu"]),
        helper.make_node("Identity", ["wu"], ["wi"]),
        helper.make_node("Add", ["x", "x"], ["y"]),
    ], inits=[("w", w), ("ax", np.array([0], np.int64))], opset=13)
    g = GraphIndex(model)
    got = g.const("wi")
    want = np.expand_dims(w.T.reshape(3, 2).astype(np.float16), 0)
    assert got.dtype == np.float16 and np.array_equal(got, want)
    assert g.is_const_rooted("wi") and g.is_foldable("wi")
    assert g.const("y") is None and not g.is_const_rooted("y")
    assert g.shape("wi") == (1, 3, 2)


def test_add_remove_replace_keep_producers_and_consumers() -> None:
    g = GraphIndex(_block())
    # Put a Q/DQ pair on "a" for the Add only: add nodes, rewire one use.
    sc = g.add_initializer(np.array(0.1, np.float32), "a_scale")
    q = g.add_node(helper.make_node("QuantizeLinear", ["a", sc], ["a_q"], name="q"))
    dq = g.add_node(helper.make_node("DequantizeLinear", ["a_q", sc], ["a_dq"], name="dq"))
    g.set_input(2, 0, "a_dq")
    assert g.producer["a_dq"] == dq and [(i, s) for i, s in g.consumers["a_q"]] == [(dq, 0)]
    assert sorted(g.names[i] for i, _ in g.consumers["a"]) == ["q", "relu"]
    assert g.const(sc) == np.float32(0.1)
    _assert_maps_exact(g)
    # Drop the Relu: the Add reads "a" through the pair on both inputs.
    relu = g.names.index("relu")
    g.remove_node(relu)
    assert "r" not in g.producer and relu in g.removed
    assert g.replace_uses("r", "a_dq") == 1
    assert "r" not in g.consumers
    assert list(g.nodes[g.names.index("add")].input) == ["a_dq", "a_dq"]
    _assert_maps_exact(g)
    assert [n.op_type for n in g.model.graph.node] == ["Identity", "Add", "Mul", "QuantizeLinear", "DequantizeLinear"]
    # Out of order until sorted; then a valid model again.
    g.toposort_()
    assert [n.op_type for n in g.model.graph.node] == ["Identity", "QuantizeLinear", "DequantizeLinear", "Add", "Mul"]
    onnx.checker.check_model(g.model)
    _assert_maps_exact(g)


def test_set_input_pads_and_replace_renames_graph_outputs() -> None:
    g = GraphIndex(_block())
    mul = g.names.index("mul")
    g.set_input(mul, 3, "w")  # slot 2 left empty
    assert list(g.nodes[mul].input) == ["s", "w", "", "w"] and sorted(g.consumers["w"]) == [(mul, 1), (mul, 3)]
    g.set_input(mul, 3, "")
    assert g.consumers["w"] == [(mul, 1)]
    g.add_node(helper.make_node("Neg", ["y"], ["y2"], name="neg"))
    g.remove_node(g.names.index("neg"))
    assert "y" not in g.consumers
    g.remove_node(mul)
    g.replace_uses("y", "s", graph_outputs=True)
    assert g.outputs == ["s"] and [o.name for o in g.model.graph.output] == ["s"] and g.is_graph_output("s")
    _assert_maps_exact(g)


def test_fresh_names_are_unique() -> None:
    model = _block()
    model.graph.node[0].output[0] = "a__tq1"  # a name the counter would produce first
    model.graph.node[1].input[0] = model.graph.node[2].input[0] = "a__tq1"
    g = GraphIndex(model)
    names = [g.fresh("a") for _ in range(50)]
    names += [g.add_initializer(np.zeros(1, np.float32), "a") for _ in range(50)]
    assert "a__tq1" not in names and len(set(names)) == 100
    existing = {t for n in model.graph.node for t in (*n.input, *n.output, n.name)} | {"x", "y", "w"}
    assert not set(names) & existing
    assert GraphIndex(model, name_tag="__ort").fresh("t") == "t__ort1"


def _reference_order(nodes, available) -> list:
    """The repeated-pass order ``ort_graph`` used to sort with (and TensorRT graphs were written in)."""
    available = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = [n for n in pending if not all(i in available for i in n.input) or ordered.append(n)
                or available.update(n.output)]
        assert len(rest) < len(pending)
        pending = rest
    return ordered


@pytest.mark.parametrize("seed", range(20))
def test_topo_order_matches_the_repeated_pass_order(seed: int) -> None:
    rng = random.Random(seed)
    nodes = []
    tensors = ["x", "w"]
    for k in range(30):
        ins = rng.sample(tensors, min(len(tensors), rng.randint(1, 3)))
        nodes.append(helper.make_node("Sum", ins, [f"t{k}"], name=f"n{k}"))
        tensors.append(f"t{k}")
    nodes.append(helper.make_node("Identity", [tensors[-1]], ["y"], name="out"))
    rng.shuffle(nodes)
    model = _model(nodes, inits=[("w", np.zeros((1, 4), np.float32))])
    g = GraphIndex(model)
    want = [n.name for n in _reference_order(model.graph.node, {"x", "w"})]
    assert [g.names[i] for i in g.topo_order()] == want
    g.toposort_()
    assert [n.name for n in g.model.graph.node] == want
    onnx.checker.check_model(g.model)


def test_topo_order_reports_cycles_and_missing_inputs() -> None:
    cyclic = _model([helper.make_node("Add", ["x", "b"], ["a"], name="first"),
                     helper.make_node("Relu", ["a"], ["b"], name="second"),
                     helper.make_node("Identity", ["b"], ["y"])])
    with pytest.raises(ValueError, match="cycle or a missing input near Add 'first'"):
        GraphIndex(cyclic).topo_order()
    missing = _model([helper.make_node("Add", ["x", "nowhere"], ["y"], name="add")])
    with pytest.raises(ValueError, match="near Add 'add'"):
        GraphIndex(missing).topo_order()
