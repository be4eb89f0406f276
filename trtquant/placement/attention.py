"""Attention rules for placement: both inputs of both attention matmuls quantized (TensorRT INT8 MHA fusion).

Three ways attention reaches placement, one result (the quantizers and roles of
:mod:`trtquant.nn.attention`):

- **Matmuls in traced code** (Hugging Face eager attention ``torch.matmul(q, k.transpose(-1, -2))``, ``q @ k``,
  ``Tensor.matmul``, ``torch.bmm``, a batched-matmul ``torch.einsum`` as in MaxViT): a matmul of two data
  tensors whose result reaches a Softmax (through scale, mask and bias adds and reshapes) is the Q·Kᵀ
  matmul; one whose first input comes from a Softmax (through dropout and reshapes) is the P·V matmul.
  Roles come from the graph, not from the order of calls. A batched-matmul einsum is rewritten as a MatMul
  (TensorRT fuses MatMul, not Einsum, into its attention kernel).
- **``F.scaled_dot_product_attention``** (Hugging Face's default "sdpa" attention, user code): routed to
  :func:`trtquant.nn.attention.quant_attention`, the same written-out attention with the four quantizers.
- **Attention inside a function torch.fx cannot see into** (torchvision's Swin wraps
  ``shifted_window_attention`` with ``torch.fx.wrap`` and passes the ``qkv``/``proj`` Linear weights into it):
  :func:`make_functional_attention` runs the owner's forward under a ``TorchFunctionMode`` that sends each
  ``F.linear`` on a quantized child's weight through that child's quantizers and quantizes the two attention
  matmuls, their roles told apart by data flow (the P·V matmul reads the softmax output).
"""

from __future__ import annotations

import operator
import re
import types
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..nn.attention import BMM_QUANTIZERS, bmm_quantizers, quant_attention
from ..nn.base import QuantMixin
from .fx_dag import FxDag, binary_op, is_constant

QK, PV = "qk", "pv"

RULE_QK = "attention Q·Kᵀ MatMul inputs (TensorRT MHA fusion)"
RULE_PV = "attention P·V MatMul inputs: softmax output (max calibration) and V (TensorRT MHA fusion)"
RULE_SDPA = "scaled_dot_product_attention written out with quantized Q, Kᵀ, softmax output and V (TensorRT MHA fusion)"
RULE_FUNCTIONAL = "attention inside a function fx cannot trace: matmul inputs quantized at run time (TensorRT MHA fusion)"
RULE_ROUTED = "F.linear on this layer's weight outside its forward: quantized with this layer's quantizers"

MATMUL_FUNCTIONS = frozenset({torch.matmul, operator.matmul, torch.bmm})
MATMUL_METHODS = frozenset({"matmul", "bmm", "__matmul__"})
SOFTMAX_FUNCTIONS = frozenset({torch.softmax, F.softmax, torch.Tensor.softmax})
#: Ops between the Q·Kᵀ matmul and its Softmax (scale, bias/mask add, masking, reshapes) and between the
#: Softmax and the P·V matmul (dropout, casts, reshapes), as canonical ops or method names.
_BETWEEN_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Affine", "Reshape", "Transpose", "Identity", "Dropout", "Cast"})
_BETWEEN_METHODS = frozenset({"masked_fill", "masked_fill_", "to", "float", "half", "type_as", "contiguous", "view",
                              "reshape", "add", "add_", "mul", "div", "unsqueeze", "squeeze"})
_WALK = 12


def _einsum_operands(n: fx.Node) -> Optional[List[Any]]:
    if n.op != "call_function" or n.target is not torch.einsum or not n.args:
        return None
    rest = list(n.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return rest


def einsum_as_matmul(equation: str) -> Optional[bool]:
    """For a batched-matmul einsum ``"...id,...jd->...ij"`` (True: the second operand is transposed) or
    ``"...ij,...jd->...id"`` (False), whether to transpose; None for any other equation."""
    eq = equation.replace(" ", "")
    m = re.fullmatch(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)", eq)
    if not m:
        return None
    a, b, out = m.groups()
    if len({len(a), len(b), len(out)}) != 1 or len(a) < 2 or a[:-2] != b[:-2] or a[:-2] != out[:-2]:
        return None
    if len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    i, ka = a[-2], a[-1]
    if out[-2] != i or i in b or ka == i:
        return None
    if b[-1] == ka and out[-1] == b[-2] and b[-2] not in a:  # (i,k) x (j,k) -> (i,j)
        return True
    if b[-2] == ka and out[-1] == b[-1] and b[-1] not in a:  # (i,k) x (k,j) -> (i,j)
        return False
    return None


def matmul_operands(n: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(a, b) of a matmul/bmm/batched-matmul einsum of two data tensors, else None."""
    if n.op == "call_function" and n.target in MATMUL_FUNCTIONS:
        pair = n.args[:2]
    elif n.op == "call_method" and n.target in MATMUL_METHODS:
        pair = n.args[:2]
    else:
        ops = _einsum_operands(n)
        if ops is None or len(ops) != 2 or not isinstance(n.args[0], str) or einsum_as_matmul(n.args[0]) is None:
            return None
        pair = tuple(ops)
    if len(pair) != 2 or not all(isinstance(a, fx.Node) and not is_constant(a) for a in pair):
        return None
    return pair[0], pair[1]  # type: ignore[return-value]


def is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is F.scaled_dot_product_attention


def _is_softmax(n: fx.Node, dag: FxDag) -> bool:
    if n.op == "call_function" and n.target in SOFTMAX_FUNCTIONS:
        return True
    if n.op == "call_method" and n.target == "softmax":
        return True
    return dag.op(n) == "Softmax"


def _between(n: fx.Node, dag: FxDag) -> bool:
    if n.op == "call_method" and n.target in _BETWEEN_METHODS:
        return True
    if binary_op(n) is not None:
        return True
    return dag.op(n) in _BETWEEN_OPS


def role(n: fx.Node, dag: FxDag) -> Optional[str]:
    """``"qk"`` for a matmul whose result reaches a Softmax, ``"pv"`` for one reading a Softmax output."""
    a, _ = matmul_operands(n) or (None, None)
    if a is None:
        return None
    x: fx.Node = a
    for _ in range(_WALK):  # back from the first operand: a softmax output (P)?
        if _is_softmax(x, dag):
            return PV
        if not _between(x, dag):
            break
        data = [i for i in x.all_input_nodes if not is_constant(i)]
        if len(data) != 1:
            break
        x = data[0]
    frontier = [n]
    for _ in range(_WALK):  # forward: does the result reach a Softmax?
        nxt = []
        for y in frontier:
            for u in y.users:
                if _is_softmax(u, dag):
                    return QK
                if _between(u, dag):
                    nxt.append(u)
        if not nxt:
            break
        frontier = nxt
    return None


def quantize_matmul(module: nn.Module, graph: fx.Graph, n: fx.Node, which: str, cfg, free_name) -> List[Tuple[str, str]]:
    """Insert the two quantizers of an attention matmul before ``n`` (an einsum becomes a MatMul); returns
    (quantizer name, rule) pairs."""
    a, b = matmul_operands(n)  # type: ignore[misc]
    if which == QK:
        a = _scale_before(graph, n, a)
    names = BMM_QUANTIZERS[:2] if which == QK else BMM_QUANTIZERS[2:]
    qs = bmm_quantizers(cfg.input)
    made = []
    with graph.inserting_before(n):
        if _einsum_operands(n) is not None:
            if einsum_as_matmul(n.args[0]):
                b = graph.call_method("transpose", (b, -2, -1))
        new = []
        for value, base, q in zip((a, b), names, qs[:2] if which == QK else qs[2:]):
            qname = free_name(module, base)
            module.add_module(qname, q)
            new.append(graph.call_module(qname, (value,)))
            made.append((qname, RULE_QK if which == QK else RULE_PV))
    n.op, n.target, n.args, n.kwargs = "call_function", torch.matmul, tuple(new), {}
    return made


_SCALE_FUNCTIONS = {operator.truediv: "div", torch.div: "div", operator.mul: "mul", torch.mul: "mul"}


def _scale_before(graph: fx.Graph, n: fx.Node, q: fx.Node) -> fx.Node:
    """Move ``(q @ kᵀ) / c`` (or ``* c``) to ``(q / c) @ kᵀ``: TensorRT's fused attention needs Q scaled before
    the first MatMul (Hugging Face's eager attention scales after it). Same product up to float rounding;
    returns the node to quantize as Q."""
    users = list(n.users)
    if len(users) != 1:
        return q
    u = users[0]
    kind = _SCALE_FUNCTIONS.get(u.target) if u.op == "call_function" else (
        {"div": "div", "mul": "mul"}.get(str(u.target)) if u.op == "call_method" else None)
    if kind is None or len(u.args) != 2 or u.args[0] is not n or u.kwargs or not isinstance(u.args[1], (int, float)):
        return q
    with graph.inserting_before(n):
        scaled = graph.call_function(operator.truediv if kind == "div" else operator.mul, (q, u.args[1]))
    u.replace_all_uses_with(n)
    graph.erase_node(u)
    return scaled


def _sdpa_quantized(q: Tensor, k: Tensor, v: Tensor, q_quantizer: nn.Module, k_quantizer: nn.Module,
                    softmax_quantizer: nn.Module, v_quantizer: nn.Module, attn_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                    enable_gqa: bool = False) -> Tensor:
    return quant_attention(q, k, v, q_quantizer, k_quantizer, softmax_quantizer, v_quantizer, attn_mask=attn_mask,
                           dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)[0]


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def quantize_sdpa(module: nn.Module, graph: fx.Graph, n: fx.Node, cfg, free_name) -> List[Tuple[str, str]]:
    """Route a ``scaled_dot_product_attention`` call to the quantized attention core."""
    bound = dict(zip(_SDPA_ARGS, n.args))
    bound.update(n.kwargs)
    made, getters = [], []
    with graph.inserting_before(n):
        for base, q in zip(BMM_QUANTIZERS, bmm_quantizers(cfg.input)):
            qname = free_name(module, base)
            module.add_module(qname, q)
            getters.append(graph.get_attr(qname))
            made.append((qname, RULE_SDPA))
    n.target = _sdpa_quantized
    n.args = (bound.pop("query"), bound.pop("key"), bound.pop("value"), *getters)
    n.kwargs = bound
    return made


# -- attention inside functions fx cannot trace ------------------------------------------------------------

def weight_owners(module: nn.Module) -> Dict[int, QuantMixin]:
    """id(weight parameter) -> the quantized layer (a descendant of ``module``) that owns it."""
    return {id(m.weight): m for m in module.modules() if isinstance(m, QuantMixin) and m is not module
            and isinstance(getattr(m, "weight", None), Tensor)}


def hidden_attention_owner(graph: fx.Graph, modules: Dict[str, nn.Module]) -> List[str]:
    """Owners (module paths) of calls to fx-wrapped functions that receive a quantized layer's weight: the
    weight is applied where placement cannot see it, so the layer's own quantizers would never run."""
    owners = []
    weights = {}
    for name, m in modules.items():
        if isinstance(m, QuantMixin) and isinstance(getattr(m, "weight", None), Tensor):
            weights[f"{name}.weight" if name else "weight"] = name
    for n in graph.nodes:
        if n.op != "call_function" or n.target in MATMUL_FUNCTIONS or not callable(n.target):
            continue
        if (getattr(n.target, "__module__", None) or "").split(".")[0] in ("torch", "_operator", "operator", "builtins",
                                                                            "math"):
            continue  # torch's own functions are visible to placement (F.linear: the functional rule)
        hit = [a for a in n.all_input_nodes if a.op == "get_attr" and str(a.target) in weights]
        if hit:
            stack = n.meta.get("nn_module_stack") or {}
            last = list(stack.values())[-1] if stack else ("", None)
            owners.append(last[0] if isinstance(last, tuple) else "")
    return list(dict.fromkeys(owners))


class _AttentionCalls(TorchFunctionMode):
    """While an owner's forward runs: F.linear on a quantized child's weight uses that child's quantizers;
    the attention matmuls get the owner's four quantizers, P·V told from Q·Kᵀ by reading a softmax output."""

    def __init__(self, owner: nn.Module, layers: Dict[int, QuantMixin]) -> None:
        super().__init__()
        self.owner = owner
        self.layers = layers
        self._probs: Dict[int, "weakref.ref[Tensor]"] = {}  # id -> ref (Tensor equality is elementwise)
        self.matmuls = 0

    def _mark(self, t: Any) -> None:
        if isinstance(t, Tensor):
            self._probs[id(t)] = weakref.ref(t)

    def _is_probs(self, t: Tensor) -> bool:
        ref = self._probs.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.layers.get(id(w))
            if layer is not None:
                x = args[0] if args else kwargs.pop("input")
                rest = dict(kwargs)
                rest.pop("weight", None)
                b = args[2] if len(args) > 2 else rest.pop("bias", None)
                return F.linear(layer.input_quantizer(x), layer.quant_weight(), b)
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            o = self.owner
            bound = dict(zip(_SDPA_ARGS, args))
            bound.update(kwargs)
            self.matmuls += 2
            return _sdpa_quantized(bound.pop("query"), bound.pop("key"), bound.pop("value"), o.q_bmm_quantizer,
                                   o.k_bmm_quantizer, o.softmax_quantizer, o.v_bmm_quantizer, **bound)
        if func in SOFTMAX_FUNCTIONS or func is F.softmax:
            out = func(*args, **kwargs)
            self._mark(out)
            return out
        if func in (F.dropout, torch.Tensor.to, torch.Tensor.contiguous) and args and isinstance(args[0], Tensor) \
                and self._is_probs(args[0]):
            out = func(*args, **kwargs)
            self._mark(out)
            return out
        if func in (torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.__matmul__) and len(args) == 2 \
                and all(isinstance(a, Tensor) and not isinstance(a, nn.Parameter) for a in args):
            a, b = args
            o = self.owner
            self.matmuls += 1
            if self._is_probs(a):
                return torch.matmul(o.softmax_quantizer(a), o.v_bmm_quantizer(b))
            return torch.matmul(o.q_bmm_quantizer(a), o.k_bmm_quantizer(b))
        return func(*args, **kwargs)


def make_functional_attention(owner: nn.Module, cfg) -> List[Tuple[str, str]]:
    """Give ``owner`` the four attention quantizers and a forward that applies them (see the module docstring)."""
    made = []
    for base, q in zip(BMM_QUANTIZERS, bmm_quantizers(cfg.input)):
        owner.add_module(base, q)
        made.append((base, RULE_FUNCTIONAL))
    owner.__dict__["_trtquant_functional_attention"] = True
    owner.forward = types.MethodType(functional_attention_forward, owner)
    return made


def functional_attention_forward(owner: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a :func:`make_functional_attention` owner (installed as a class-level hook)."""
    with _AttentionCalls(owner, weight_owners(owner)):
        return type(owner).forward(owner, *args, **kwargs)


def is_attention_module(m: nn.Module) -> bool:
    """Named rule for attention modules torch.fx cannot trace (Hugging Face's ``BertSelfAttention`` unpacks
    ``hidden_states.shape``): a module whose class name says attention and whose quantized Linear children
    project Q/K/V. Its matmuls and ``scaled_dot_product_attention`` calls are quantized at run time."""
    return "attention" in type(m).__name__.lower() and any(isinstance(c, QuantMixin) for c in m.children())


def is_functional_attention(m: nn.Module) -> bool:
    return bool(m.__dict__.get("_trtquant_functional_attention"))


def routed_layers(owner: nn.Module) -> List[str]:
    """Names (relative to ``owner``) of the quantized layers whose weights the owner may apply functionally."""
    return [n for n, m in owner.named_modules() if isinstance(m, QuantMixin) and m is not owner]


__all__ = ["QK", "PV", "role", "matmul_operands", "is_sdpa", "quantize_matmul", "quantize_sdpa", "einsum_as_matmul",
           "hidden_attention_owner", "make_functional_attention", "is_functional_attention", "is_attention_module"]
