"""A torch.fx graph as a :class:`trtquant.graph.dag.Dag`, so placement uses the checker's rules.

PyTorch modules, functions and methods map onto the canonical (ONNX) op names of
:mod:`trtquant.graph.ops`; parameters and buffers (``get_attr``) and Python constants are not data
inputs, and neither is a value computed from them alone (``self.gamma.reshape(1, -1, 1, 1)``) or from
shapes only (a drop-path mask ``x.new_empty(shape).bernoulli_(p)``); ``TensorQuantizer`` calls are looked
through (they become Q/DQ pairs in ONNX). ``x * f(x)`` with ``f`` built from gate functions of ``x``
(SiLU/HardSwish/Mish written out) is one ``SelfGated`` activation, as in the ONNX adapter.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Mapping
from typing import Any, Optional, TypeGuard

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph import ops
from ..quantizer import TensorQuantizer

#: Module types -> canonical op, most specific first (QuantConv2d is an nn.Conv2d).
MODULE_OPS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "ConvTranspose"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "Conv"),
    (nn.Linear, "Gemm"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "BatchNormalization"),
    (nn.ReLU, "Relu"),
    ((nn.ReLU6, nn.Hardtanh), "Clip"),
    (nn.LeakyReLU, "LeakyRelu"),
    (nn.PReLU, "PRelu"),
    ((nn.SiLU, nn.Mish), ops.SELF_GATED),
    (nn.Hardswish, "HardSwish"),
    (nn.Hardsigmoid, "HardSigmoid"),
    (nn.GELU, "Gelu"),
    (nn.Sigmoid, "Sigmoid"),
    (nn.Tanh, "Tanh"),
    (nn.ELU, "Elu"),
    (nn.SELU, "Selu"),
    (nn.Softplus, "Softplus"),
    (nn.Identity, "Identity"),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), "Dropout"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), "MaxPool"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
     "AveragePool"),
    (nn.Flatten, "Flatten"),
    (nn.Softmax, "Softmax"),
    (nn.LayerNorm, "LayerNormalization"),
)

#: Elementwise binary functions/methods: ``Add``/``Mul``/... with two data inputs, ``Affine`` with one.
BINARY_FUNCTIONS: Mapping[Any, str] = {
    operator.add: "Add", operator.iadd: "Add", torch.add: "Add",
    operator.sub: "Sub", operator.isub: "Sub", torch.sub: "Sub",
    operator.mul: "Mul", operator.imul: "Mul", torch.mul: "Mul",
    operator.truediv: "Div", operator.itruediv: "Div", torch.div: "Div",
    torch.Tensor.add: "Add", torch.Tensor.add_: "Add", torch.Tensor.sub: "Sub", torch.Tensor.mul: "Mul",
    torch.Tensor.mul_: "Mul", torch.Tensor.div: "Div",
}
BINARY_METHODS: Mapping[str, str] = {"add": "Add", "add_": "Add", "sub": "Sub", "sub_": "Sub", "mul": "Mul",
                                     "mul_": "Mul", "div": "Div", "div_": "Div"}
FUNCTION_OPS: Mapping[Any, str] = {
    torch.cat: "Concat", torch.concat: "Concat",
    F.relu: "Relu", torch.relu: "Relu", F.relu6: "Clip", F.hardtanh: "Clip", torch.clamp: "Clip",
    F.leaky_relu: "LeakyRelu", F.silu: ops.SELF_GATED, F.mish: ops.SELF_GATED, F.hardswish: "HardSwish",
    F.hardsigmoid: "HardSigmoid", F.gelu: "Gelu", torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid",
    torch.tanh: "Tanh", F.dropout: "Dropout", F.batch_norm: "BatchNormalization",
    F.avg_pool1d: "AveragePool", F.avg_pool2d: "AveragePool", F.avg_pool3d: "AveragePool",
    F.adaptive_avg_pool1d: "AveragePool", F.adaptive_avg_pool2d: "AveragePool", F.adaptive_avg_pool3d: "AveragePool",
    torch.flatten: "Flatten", F.softmax: "Softmax", torch.softmax: "Softmax", F.layer_norm: "LayerNormalization",
    torch.erf: "Erf", F.softplus: "Softplus", F.tanh: "Tanh", F.dropout1d: "Dropout", F.dropout2d: "Dropout",
    F.dropout3d: "Dropout", F.alpha_dropout: "Dropout", torch.clip: "Clip", torch.clamp_min: "Clip",
    torch.transpose: "Transpose", torch.permute: "Transpose", torch.reshape: "Reshape",
    # Functional weighted calls (a conv applied with F.conv2d in a block's forward is a conv branch too).
    F.conv1d: "Conv", F.conv2d: "Conv", F.conv3d: "Conv", F.conv_transpose1d: "ConvTranspose",
    F.conv_transpose2d: "ConvTranspose", F.conv_transpose3d: "ConvTranspose", F.linear: "Gemm",
}
METHOD_OPS: Mapping[str, str] = {
    "relu": "Relu", "relu_": "Relu", "sigmoid": "Sigmoid", "sigmoid_": "Sigmoid", "tanh": "Tanh", "erf": "Erf",
    "clamp": "Clip", "clamp_": "Clip", "clip": "Clip", "clamp_min": "Clip", "clamp_min_": "Clip",
    "flatten": "Flatten", "view": "Reshape", "reshape": "Reshape", "softmax": "Softmax",
    "permute": "Transpose", "transpose": "Transpose",
    # No-ops in the exported graph (memory layout only): the walk goes through them like ONNX, which has none.
    "contiguous": "Identity",
}

#: Results that depend on their input's shape, dtype or device only, never on its values: a drop-path mask
#: (``x.new_empty(shape).bernoulli_(p)``, ``torch.empty(size, device=x.device)``) scales a branch like a
#: constant, and is gone from an eval-mode export.
SHAPE_ONLY_FUNCTIONS = frozenset({torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
                                  torch.rand_like, torch.randn_like})
SHAPE_ONLY_METHODS = frozenset({"size", "dim", "new_empty", "new_zeros", "new_ones", "new_full"})
SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})
#: How far back :func:`is_constant` looks; constant sub-expressions (a reshaped parameter) are short.
CONSTANT_DEPTH = 12


#: Modules of other libraries, by class name (no import needed): drop-path variants are the identity
#: in an eval-mode export (torchvision's StochasticDepth, timm's DropPath).
MODULE_NAME_OPS: Mapping[str, str] = {"StochasticDepth": "Dropout", "DropPath": "Dropout"}
#: The same for functions that tracing records by name (torchvision wraps ``stochastic_depth`` for fx).
FUNCTION_NAME_OPS: Mapping[str, str] = {"stochastic_depth": "Dropout", "drop_path": "Dropout"}


def module_op(m: Optional[nn.Module]) -> str:
    for types, name in MODULE_OPS:
        if isinstance(m, types):
            return name
    if m is None:
        return ""
    return MODULE_NAME_OPS.get(type(m).__name__, type(m).__name__)


def is_constant(n: fx.Node, depth: int = CONSTANT_DEPTH) -> bool:
    """Whether ``n``'s value does not depend on the input data: parameters and buffers, what is computed
    from them alone (``self.gamma.reshape(1, -1, 1, 1)``), and shape-only values (see
    :data:`SHAPE_ONLY_FUNCTIONS`); ONNX folds the first kind into initializers too."""
    if n.op == "get_attr":
        return True
    if n.op not in ("call_function", "call_method") or depth <= 0:
        return False
    if n.op == "call_function" and (n.target in SHAPE_ONLY_FUNCTIONS or (
            n.target is builtins.getattr and len(n.args) > 1 and n.args[1] in SHAPE_ATTRIBUTES)):
        return True
    if n.op == "call_method" and n.target in SHAPE_ONLY_METHODS:
        return True
    return all(is_constant(a, depth - 1) for a in n.all_input_nodes)


def _is_data(a: Any) -> TypeGuard[fx.Node]:
    return isinstance(a, fx.Node) and not is_constant(a)


def _binary(n: fx.Node) -> Optional[str]:
    if n.op == "call_function":
        return BINARY_FUNCTIONS.get(n.target)
    if n.op == "call_method":
        return BINARY_METHODS.get(str(n.target))
    return None


def binary_op(n: fx.Node) -> Optional[str]:
    """``Add``/``Sub``/``Mul``/``Div`` of two data tensors, ``Affine`` with one constant, None otherwise."""
    kind = _binary(n)
    if kind is None:
        return None
    return kind if len(n.args) >= 2 and all(_is_data(a) for a in n.args[:2]) else ops.AFFINE


class FxDag:
    """Adapter of a traced graph (quantized layers and quantizers as leaves) to the structural rules."""

    def __init__(self, graph: fx.Graph, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self._order = {n: i for i, n in enumerate(graph.nodes)}
        self._gated: dict[fx.Node, Optional[fx.Node]] = {}

    def module(self, n: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(str(n.target)) if n.op == "call_module" else None

    def _data_args(self, n: fx.Node) -> list[fx.Node]:
        if _binary(n) is not None:
            gated = self._gated_input(n)
            if gated is not None:
                return [gated]
            return [a for a in n.args[:2] if _is_data(a)]
        if n.op == "call_function" and n.target in (torch.cat, torch.concat) and n.args:
            seq = n.args[0] if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
            return [a for a in seq if _is_data(a)]
        return [a for a in n.all_input_nodes if _is_data(a)]

    def _look_through(self, a: fx.Node) -> tuple[fx.Node, Optional[str]]:
        q = None
        while a.op == "call_module" and isinstance(self.modules.get(str(a.target)), TensorQuantizer) and a.args \
                and isinstance(a.args[0], fx.Node):
            q = q or str(a.target)
            a = a.args[0]
        return a, q

    # --- Dag protocol ----------------------------------------------------------------------
    def op(self, n: fx.Node) -> str:
        if n.op == "placeholder":
            return ""
        if n.op == "call_module":
            return module_op(self.module(n))
        binary = binary_op(n)
        if binary is not None:
            return ops.SELF_GATED if binary == "Mul" and self._gated_input(n) is not None else binary
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            return FUNCTION_OPS.get(n.target) or FUNCTION_NAME_OPS.get(name, name)
        if n.op == "call_method":
            return METHOD_OPS.get(str(n.target), str(n.target))
        return n.op

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        return [self._look_through(a)[0] for a in self._data_args(n)]

    def order(self, n: fx.Node) -> int:
        return self._order.get(n, -1)

    # --- self-gated activations written out: x * sigmoid(x), x * relu6(x + 3) / 6 ---------------
    def _gated_input(self, n: fx.Node) -> Optional[fx.Node]:
        """``x`` when ``n`` is ``x * f(x)`` with ``f`` built from gate functions and constants, else None."""
        if binary_op(n) != "Mul":
            return None
        if n not in self._gated:
            self._gated[n] = None
            for k in (0, 1):
                x, gate = n.args[k], n.args[1 - k]
                if isinstance(x, fx.Node) and isinstance(gate, fx.Node) and self._derives_elementwise(gate, x):
                    self._gated[n] = x
                    break
        return self._gated[n]

    def _derives_elementwise(self, n: fx.Node, x: fx.Node, depth: int = 0) -> bool:
        if depth > 8:
            return False
        n = self._look_through(n)[0]
        if binary_op(n) == ops.AFFINE:
            op = ops.AFFINE
        elif n.op == "call_module":
            op = module_op(self.module(n))
        elif n.op == "call_function":
            op = FUNCTION_OPS.get(n.target, "")
        elif n.op == "call_method":
            op = METHOD_OPS.get(str(n.target), "")
        else:
            return False
        if op not in ops.GATE_FUNCTIONS and op != ops.AFFINE:
            return False
        data = [a for a in n.all_input_nodes if not is_constant(a)]
        if len(data) != 1:
            return False
        return data[0] is x or self._derives_elementwise(data[0], x, depth + 1)

    def input_quantizers(self, n: fx.Node) -> list[Optional[str]]:
        """Per data input: the name of the TensorQuantizer it is read through, or None."""
        return [self._look_through(a)[1] for a in self._data_args(n)]


__all__ = ["FxDag", "binary_op", "is_constant", "module_op"]
