"""Automatic TensorRT placement with torch.fx, without editing model code.

The model is traced with quantized layers as leaves. Each residual Add gets a quantizer on its
identity (skip) input only, so Conv+Add(+ReLU) fuses in INT8; functional average pools get an input
quantizer; quantizers feeding one Concat share one amax; MaxPool quantizers are disabled. New
quantizers live on the module that owns the Add (e.g. ``layer1.0.residual_quantizer``), whose
forward is replaced by the rewritten traced graph - only those modules, not the whole model.

Quantizers that read one tensor (placement's ``same_tensor_groups``) get one shared
:class:`~trtquant.quantizer.SharedQuantResult` each group, so that tensor is fake-quantized once.

Blocks are rewritten from a trace of their own forward, called with the non-tensor arguments
(None, numbers, flags) the whole-model trace saw them called with, so ``if drop_connect_rate:`` on an
optional argument traces; a block called with different constants at different sites is skipped and
named in the report. A model that does not trace whole (detection models with Python control flow
over image lists) gets the graph rules on its largest submodules that do trace.

Deliberate per-model state: the :class:`PlacementState` is recorded on the model it describes
(``model._trtquant_placement``), so it follows the model through ``copy.deepcopy`` (export works on
a copy) and is gone with it; nothing is kept at module level.
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.fx as fx
from torch import nn

from ..nn.base import QuantInputMixin, QuantMixin
from ..nn.custom import CallQuantMixin, call_tensors
from ..nn.registry import QUANT_MODULE_MAP
from ..nn.pool import QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
from ..graph.dag import concat_quantizer_groups, residual_split
from ..quantizer import SharedQuantResult, TensorQuantizer
from . import attention, rules
from .fx_dag import FxDag, binary_op
from .ort_observers import add_output_observers_, add_untraced_output_observers_

logger = logging.getLogger(__name__)

_STATE_ATTR = "_trtquant_placement"


@dataclass
class PlacementState:
    traced: bool = False  # the whole model traced
    reason: Optional[str] = None  # why it did not
    rules: Dict[str, str] = field(default_factory=dict)  # quantizer fqn -> rule
    amax_groups: List[List[str]] = field(default_factory=list)
    # Quantizers reading one tensor; each group shares one SharedQuantResult (quantizes it once).
    shared_inputs: List[List[str]] = field(default_factory=list)
    # When the model does not trace whole: the submodules the graph rules were applied to instead.
    placed_subtrees: List[str] = field(default_factory=list)
    # Blocks whose graph rules were skipped (module fqn -> why), e.g. called with different constants.
    skipped: Dict[str, str] = field(default_factory=dict)


#: A call argument that is a traced tensor (or anything but a plain constant): not specialized.
_DYNAMIC = object()
CallRecord = Dict[str, Any]  # forward parameter -> constant it was called with, or _DYNAMIC


def _is_constant(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, tuple) and all(_is_constant(x) for x in v)


def _call_record(m: nn.Module, args: tuple, kwargs: dict) -> Optional[CallRecord]:
    """The arguments of one call of ``m`` by forward parameter, defaults filled in; None if unbindable."""
    try:
        sig = inspect.signature(m.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return {name: (bound.arguments[name] if _is_constant(bound.arguments.get(name)) else _DYNAMIC)
            for name, p in sig.parameters.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


class _QuantTracer(fx.Tracer):
    """Quantized layers and quantizers are leaves; records the arguments each other module is called
    with (``calls``: module path -> one :data:`CallRecord` per call), to trace it alone the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Dict[str, List[Optional[CallRecord]]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantInputMixin, TensorQuantizer)) or attention.is_functional_attention(m) \
            or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            path = None
        if path is not None and not self.is_leaf_module(m, path):
            self.calls.setdefault(path, []).append(_call_record(m, args, kwargs))
        return super().call_module(m, forward, args, kwargs)


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def agreed_constants(owner: str, calls: Optional[List[Optional[CallRecord]]]
                     ) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the constant arguments every call of ``owner`` agrees on, None) or (None, why they do not)."""
    if not calls:
        return {}, None
    if any(c is None for c in calls):
        return None, f"{owner or 'model'}: its forward signature does not bind the arguments it was called with"
    first = calls[0]
    for other in calls[1:]:
        diff = [k for k in first if not _same(first[k], other.get(k, _DYNAMIC))]
        if diff:
            shown = ", ".join(f"{k}={_shown(first[k])} vs {_shown(other.get(k, _DYNAMIC))}" for k in diff[:3])
            return None, (f"{owner or 'model'} is called with different arguments at different call sites ({shown}); "
                          "one rewritten forward cannot serve both")
    return {k: v for k, v in first.items() if v is not _DYNAMIC}, None


def _shown(v: Any) -> str:
    return "<tensor>" if v is _DYNAMIC else repr(v)


class _LocalTracer(fx.Tracer):
    """Traces one module's own forward: every child is a leaf, so only its direct ops appear."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _site_kind(n: fx.Node) -> Optional[str]:
    if _is_add(n):
        return "add"
    if n.op == "call_function" and n.target in rules.AVGPOOL_FUNCTIONS:
        return "pool"
    if n.op == "call_function" and n.target in rules.WEIGHTED_FUNCTIONS:
        return "call"
    if attention.matmul_operands(n) is not None:
        return "bmm"
    if attention.is_sdpa(n):
        return "sdpa"
    return None


def _is_constant_node(n: Any, depth: int = 0) -> bool:
    """A parameter/buffer (``get_attr``) or a value computed from them alone (``w.t()``, ``w * g``)."""
    if not isinstance(n, fx.Node):
        return not isinstance(n, (list, tuple, dict))
    if n.op == "get_attr":
        return True
    if n.op not in ("call_function", "call_method") or depth > 8:
        return False
    return all(_is_constant_node(a, depth + 1) for a in n.all_input_nodes)


def _call_site(n: fx.Node) -> Optional[int]:
    """0 when a functional conv/linear call multiplies a data input by a constant weight (quantize
    both, as for QuantConv2d), else None (a data-dependent weight is not a layer weight)."""
    x, w = call_tensors(n.args, n.kwargs)
    if isinstance(x, fx.Node) and not _is_constant_node(x) and _is_constant_node(w) and isinstance(w, fx.Node):
        return 0
    return None


def _is_add(n: fx.Node) -> bool:
    """An Add of two data tensors (a bias or scale add with a parameter is not a residual site)."""
    return binary_op(n) == "Add"


def _identity_index(add: fx.Node, dag: FxDag, quantized_calls: frozenset = frozenset()) -> Optional[int]:
    """Which Add input is the identity, when the other is a quantized weighted branch; else None.

    The structural choice is :func:`trtquant.graph.dag.residual_split`, the checker's rule too. A branch from
    a functional ``F.conv*d`` call counts when the functional rule quantizes that call (``quantized_calls``).
    """
    split = residual_split(dag, add)
    if split is None:
        return None
    if split.source in quantized_calls:
        return split.identity
    layer = dag.module(split.source)
    if not isinstance(layer, QuantMixin) or not layer.weight_quantizer.is_enabled:
        return None  # a float branch: TensorRT will not fuse an INT8 Add here
    return split.identity


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else list(stack.keys())[-1]


def trace_quantized(module: nn.Module) -> fx.Graph:
    """Trace with quantized layers and quantizers as leaves, honouring a rewritten instance forward.

    torch.fx traces ``type(root).forward``; placement replaces the forward of the module that owns an
    Add/pool on the instance, so a rewritten root is traced through a throw-away subclass.
    """
    return trace_recording(module)[0]


def trace_recording(module: nn.Module, tracer: Optional["_QuantTracer"] = None
                    ) -> Tuple[fx.Graph, Dict[str, List[Optional[CallRecord]]]]:
    """:func:`trace_quantized` plus the arguments each non-leaf submodule was called with.

    ``tracer``: a :class:`_QuantTracer` subclass instance with more leaves (the PTQ steps keep float layers whole).
    """
    tracer = tracer if tracer is not None else _QuantTracer()
    forward = module.__dict__.get("forward")
    if forward is None or not hasattr(forward, "__func__"):
        return tracer.trace(module), tracer.calls
    cls = type(module)
    module.__class__ = type(cls.__name__, (cls,), {"forward": forward.__func__})
    try:
        return tracer.trace(module), tracer.calls
    finally:
        module.__class__ = cls


_trace = trace_quantized


def quantizer_inputs(model: nn.Module,
                     graph: Optional[fx.Graph] = None) -> Optional[Dict[str, List[Optional[fx.Node]]]]:
    """{activation quantizer name: the fx node it reads, per call site}; None when the model does not trace.

    Module quantizers of quantized layers read the layer's input; placement's own quantizers (residual,
    pool) read their argument. Quantizers that read one node see one tensor. A call site whose input
    is not one node (a keyword argument, a constant) records None. A quantizer instance registered under
    several names is reported under its first name with the call sites of all of them.
    """
    if graph is None:
        try:
            graph = trace_quantized(model)
        except Exception:
            return None
    modules = dict(model.named_modules(remove_duplicate=False))
    canonical = {id(m): name for name, m in model.named_modules()}  # first name per instance
    sites: Dict[str, List[Optional[fx.Node]]] = {}
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        m = modules.get(str(n.target))
        if isinstance(m, TensorQuantizer):
            q = m
        elif isinstance(m, QuantInputMixin):
            q = m.input_quantizer
        else:
            continue
        arg = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        if isinstance(m, CallQuantMixin):
            arg = None  # a twin quantizes the tensor its forward passes to the conv call (e.g. padded)
        sites.setdefault(canonical.get(id(q), str(n.target)), []).append(arg if isinstance(arg, fx.Node) and n.args
                                                                       else None)
    return sites


def same_tensor_groups(model: nn.Module, graph: Optional[fx.Graph] = None) -> List[List[str]]:
    """Groups (size >= 2) of activation quantizers that read the same tensor at their only call site
    (``graph``: the model's :func:`trace_quantized` graph when the caller has it already)."""
    sites = quantizer_inputs(model, graph) or {}
    by_node: Dict[fx.Node, List[str]] = {}
    for name, nodes in sites.items():
        if len(nodes) == 1 and nodes[0] is not None:
            by_node.setdefault(nodes[0], []).append(name)
    return [g for g in by_node.values() if len(g) > 1]


Select = Callable[[str, nn.Module], bool]


def apply_trt_placement(model: nn.Module, cfg, select: Optional[Select] = None) -> PlacementState:
    """Add/disable quantizers for TensorRT fusion; records a PlacementState on the model.

    ``select(name, module)``: whether functional conv/linear calls in that module's forward are
    quantized (``trtquant.quantize`` passes its include/exclude); None = all of them.
    """
    state = PlacementState()
    for name, m in model.named_modules():
        if isinstance(m, (QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d)):
            m.input_quantizer.disable()
            state.rules[f"{name}.input_quantizer"] = rules.RULE_MAXPOOL
    try:
        graph, calls = trace_recording(model)
    except Exception as e:  # untraceable: the graph rules go to the largest submodules that trace
        state.reason = f"torch.fx could not trace {type(model).__name__}: {_clip(e)}"
        roots = traceable_subtrees(model)
        state.placed_subtrees = [name for name, *_ in roots]
        if roots:
            logger.warning("placement: %s; residual/concat/functional-pool rules applied to %d traceable "
                           "submodule(s) instead: %s", state.reason, len(roots),
                           ", ".join(state.placed_subtrees[:8]) + (" ..." if len(roots) > 8 else ""))
        else:
            logger.warning("placement: %s; residual/concat/functional-pool rules skipped", state.reason)
    else:
        state.traced = True
        roots = [("", model, graph, calls)]
    for prefix, root, graph, calls in roots:
        if graph is None:  # an attention module that does not trace
            _runtime_attention(prefix, root, cfg, state, select)
            continue
        _place(model, prefix, root, graph, calls, cfg, state, select)
    if not state.traced:  # convs called from untraced code: their ONNX Runtime output scale, decided at run time
        for name in add_untraced_output_observers_(model, [name for name, *_ in roots]):
            state.rules[name] = rules.RULE_ORT_OUTPUT
    setattr(model, _STATE_ATTR, state)
    return state


def _clip(e: BaseException) -> str:
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:200]}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def traceable_subtrees(module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module, Optional[fx.Graph], Dict]]:
    """(name, submodule, graph, calls) of the largest submodules of ``module`` that trace.

    Top-down: a child that traces is taken whole; one that does not is searched the same way.
    Quantized layers, and children without any, have nothing for the graph rules and are skipped.
    """
    out: List[Tuple[str, nn.Module, fx.Graph, Dict]] = []
    for name, child in module.named_children():
        full = _join(prefix, name)
        if isinstance(child, (QuantInputMixin, TensorQuantizer)) or \
                not any(isinstance(m, QuantInputMixin) for m in child.modules()):
            continue
        try:
            graph, calls = trace_recording(child)
        except Exception as e:
            if attention.is_attention_module(child):
                out.append((full, child, None, {}))  # attention quantized at run time (see _place)
                continue
            logger.debug("placement: %s does not trace (%s); trying its children", full, _clip(e))
            out.extend(traceable_subtrees(child, full))
            continue
        out.append((full, child, graph, calls))
    return out


def _place(model: nn.Module, prefix: str, root: nn.Module, graph: fx.Graph, calls: Dict, cfg,
           state: PlacementState, select: Optional[Select]) -> None:
    """The graph rules on one traced (sub)module ``root`` named ``prefix`` in ``model``."""
    modules = dict(root.named_modules())
    dag = FxDag(graph, modules)
    hidden = _hidden_attention(prefix, root, graph, modules, cfg, state, select)

    # Sites (Adds, functional pools and conv/linear calls) per owning module, in execution order; which
    # input to quantize is decided here, on the whole graph, where both branches are visible.
    sites: Dict[str, List[Tuple[str, Optional[int]]]] = {}
    quantized_calls: set = set()  # functional conv/linear calls the functional rule quantizes
    for n in graph.nodes:
        kind = _site_kind(n)
        if kind is None:
            continue
        owner = _owner(n)
        if any(owner == h or owner.startswith(h + ".") for h in hidden):
            continue  # a leaf now: its attention is quantized at run time
        if kind == "add":
            idx = _identity_index(n, dag, frozenset(quantized_calls))
        elif kind == "pool":
            idx = 0
        elif kind in ("bmm", "sdpa"):
            idx = attention.role(n, dag) if kind == "bmm" else kind
            if idx is not None and select is not None and not select(_join(prefix, owner), modules.get(owner, root)):
                idx = None
        else:
            idx = _call_site(n)
            owner_module = modules.get(owner, root)
            if idx is not None and select is not None and not select(_join(prefix, owner), owner_module):
                idx = None
            if idx is not None:
                quantized_calls.add(n)
        sites.setdefault(owner, []).append((kind, idx))
    for owner in sorted(sites, key=lambda s: (-s.count("."), s)):
        if any(idx is not None for _, idx in sites[owner]):
            _rewrite_owner(root, owner, sites[owner], cfg, state, prefix, calls.get(owner))

    # Concat: quantizers reading the inputs of one Concat share amax (TensorRT needs one scale).
    graph = _trace(root)
    modules = dict(root.named_modules())
    for _, quantizers in concat_quantizer_groups(FxDag(graph, modules), graph.nodes):
        group = [_join(prefix, q) for q in quantizers if q is not None]
        if len(group) > 1:
            state.amax_groups.append(group)
            for g in group:
                state.rules[g] = rules.RULE_CONCAT
    groups = [[_join(prefix, q) for q in g] for g in same_tensor_groups(root, graph)]
    state.shared_inputs.extend(share_results(model, groups))
    # Conv outputs the ONNX Runtime graph needs a scale for (ort_only: TensorRT never sees them).
    for name in add_output_observers_(root, graph):
        state.rules[_join(prefix, name)] = rules.RULE_ORT_OUTPUT


def _config_for(cfg, name: str):
    """``cfg`` with the overrides matching module ``name`` applied (a QuantConfig; other configs as given)."""
    return cfg.for_module(name) if hasattr(cfg, "for_module") else cfg


def _runtime_attention(name: str, module: nn.Module, cfg, state: PlacementState, select: Optional[Select]) -> bool:
    """Quantize the attention of ``module`` (a ``name``d owner) at run time: its matmuls, scaled dot-product
    attention and any F.linear on its quantized layers' weights (:mod:`.attention`)."""
    if select is not None and not select(name, module):
        return False
    own = _config_for(cfg, name)
    if getattr(own, "input", True) is None:  # weight-only layers: no activation quantizers to place
        return False
    for qname, rule in attention.make_functional_attention(module, own):
        state.rules[_join(name, qname)] = rule
    return True


def _hidden_attention(prefix: str, root: nn.Module, graph: fx.Graph, modules: Dict[str, nn.Module], cfg,
                      state: PlacementState, select: Optional[Select]) -> List[str]:
    """Owners whose attention runs inside an fx-wrapped function (Swin): quantized at run time instead."""
    done = []
    for owner in attention.hidden_attention_owner(graph, modules):
        module = modules.get(owner, root)
        full = _join(prefix, owner)
        if not _runtime_attention(full, module, cfg, state, select):
            continue
        for layer in attention.routed_layers(module):
            for q in ("input_quantizer", "weight_quantizer"):
                state.rules[_join(_join(full, layer), q)] = attention.RULE_ROUTED
        done.append(owner)
    return done


def share_results(model: nn.Module, groups: List[List[str]]) -> List[List[str]]:
    """Give the quantizers of each group (they read one tensor) one :class:`SharedQuantResult`."""
    qs = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    done = []
    for group in groups:
        members = [qs[n] for n in group if n in qs]
        if len(members) < 2:
            continue
        slot = SharedQuantResult(len(members))
        for q in members:
            q.shared_result = slot
        done.append([n for n in group if n in qs])
    return done


def _trace_alone(module: nn.Module, constants: Dict[str, Any]) -> fx.Graph:
    """Trace ``module``'s own forward (children as leaves) with ``constants`` as concrete arguments.

    fx renames a concrete argument's placeholder (``rate`` -> ``rate_1``) and asserts its value in the
    graph; the original names are restored so callers passing it by keyword keep working.
    """
    graph = _LocalTracer().trace(module, concrete_args=constants or None)
    for n in graph.nodes:
        if n.op == "placeholder" and n.target not in constants:
            base = str(n.target).rsplit("_", 1)[0]
            if base in constants and str(n.target) != base:
                n.target = base
    return graph


def _skip(state: PlacementState, name: str, reason: str) -> None:
    state.skipped[name] = reason
    logger.warning("placement: %s: graph rules skipped for this block (%s)", name, reason)


def _rewrite_owner(root: nn.Module, owner: str, sites: List[Tuple[str, Optional[int]]], cfg,
                   state: PlacementState, prefix: str = "", calls: Optional[List[Optional[CallRecord]]] = None) -> None:
    """Replace the forward of ``owner`` (a module of ``root``) by its trace with the new quantizers."""
    module = root.get_submodule(owner) if owner else root
    full_owner = _join(prefix, owner) or "model"
    cfg = _config_for(cfg, _join(prefix, owner))
    if getattr(cfg, "input", True) is None:
        _skip(state, full_owner, "its config says input=None (weight-only): no activation quantizers placed")
        return
    constants, why = agreed_constants(full_owner, calls if owner else None)
    if constants is None:
        _skip(state, full_owner, str(why))
        return
    try:
        graph = _trace_alone(module, constants)
    except Exception as e:
        _skip(state, full_owner, f"it does not trace alone with the arguments it was called with: {_clip(e)}")
        return
    local = [n for n in graph.nodes if _site_kind(n) is not None]
    if [_site_kind(n) for n in local] != [k for k, _ in sites]:
        _skip(state, full_owner, "it traces differently alone than inside the model")
        return
    changed = False
    for n, (kind, idx) in zip(local, sites):
        if idx is None:
            continue
        if kind == "call":
            _quantize_call(module, graph, n, cfg, state, _join(prefix, owner))
            changed = True
            continue
        if kind in ("bmm", "sdpa"):
            made = attention.quantize_sdpa(module, graph, n, cfg, _free_name) if kind == "sdpa" else \
                attention.quantize_matmul(module, graph, n, str(idx), cfg, _free_name)
            for qname, rule in made:
                state.rules[_join(_join(prefix, owner), qname)] = rule
            changed = True
            continue
        if rules.fp8_skips(kind, cfg.input):
            continue  # FP8 runs only in GEMM/conv/attention kernels: no residual or pooling Q/DQ
        base = "residual_quantizer" if kind == "add" else "pool_quantizer"
        qname = _free_name(module, base)
        module.add_module(qname, TensorQuantizer(cfg.input))
        with graph.inserting_before(n):
            qnode = graph.call_module(qname, (n.args[idx],))
        args = list(n.args)
        args[idx] = qnode
        full = _join(_join(prefix, owner), qname)
        state.rules[full] = rules.RULE_RESIDUAL if kind == "add" else rules.RULE_FUNCTIONAL_POOL
        if kind == "add":
            # The conv branch is not quantized for TensorRT (Conv+Add fuse), but ONNX Runtime's INT8
            # Add needs its scale: an observe-only quantizer calibrates it and stays off.
            bname = _free_name(module, "residual_branch_quantizer")
            # Max statistics: this scale only sizes ONNX Runtime's Add input (no clipping wanted), and a
            # histogram of every conv-branch output would add a third to the calibration cost.
            observer = TensorQuantizer(replace(cfg.input, calib_method="max"))
            observer.disable_quant()
            observer.ort_only = True
            module.add_module(bname, observer)
            with graph.inserting_before(n):
                bnode = graph.call_module(bname, (n.args[1 - idx],))
            args[1 - idx] = bnode
            state.rules[_join(_join(prefix, owner), bname)] = rules.RULE_ORT_BRANCH
        n.args = tuple(args)
        if kind == "add":
            _make_inplace_add(n, 1 - idx, dict(module.named_modules()))
        changed = True
    if changed:
        graph.lint()
        gm = fx.GraphModule(module, graph)
        # Only this module's own forward is replaced; its children keep their code.
        module.forward = types.MethodType(type(gm).forward, module)


def _quantize_call(module: nn.Module, graph: fx.Graph, n: fx.Node, cfg, state: PlacementState, owner: str) -> None:
    """Quantize input and weight of a functional conv/linear call on a parameter, as QuantConv2d does."""
    fname = getattr(n.target, "__name__", "call")
    quant_t = QUANT_MODULE_MAP.get(rules.WEIGHTED_FUNCTIONS[n.target])
    weight_desc = cfg.weight if cfg.weight is not None else getattr(quant_t, "default_quant_desc_weight", None)
    x, w = call_tensors(n.args, n.kwargs)
    new = {}
    for role, value, desc, rule in (("input", x, cfg.input, rules.RULE_FUNCTIONAL_INPUT),
                                    ("weight", w, weight_desc, rules.RULE_FUNCTIONAL_WEIGHT)):
        qname = _free_name(module, f"{fname}_{role}_quantizer")
        module.add_module(qname, TensorQuantizer(desc) if desc is not None else TensorQuantizer())
        with graph.inserting_before(n):
            new[role] = graph.call_module(qname, (value,))
        state.rules[_join(owner, qname)] = rule
    args, kwargs = list(n.args), dict(n.kwargs)
    if args:
        args[0] = new["input"]
    else:
        kwargs["input"] = new["input"]
    if len(args) > 1:
        args[1] = new["weight"]
    else:
        kwargs["weight"] = new["weight"]
    n.args, n.kwargs = tuple(args), kwargs


_NO_SAVED_OUTPUT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _make_inplace_add(add: fx.Node, branch: int, modules: Dict[str, nn.Module]) -> None:
    """Accumulate into the conv-branch value, as ``out += identity`` did before tracing.

    fx records ``+=`` as an out-of-place add (its Proxy has no __iadd__); the extra allocation per
    block costs real time on CPU. Only done when the branch value comes (through our observer)
    straight from a BatchNorm/Conv, whose backward does not need its output.
    """
    src = add.args[branch]
    if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(str(src.target)), TensorQuantizer):
        src = src.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_module"
            and isinstance(modules.get(str(src.target)), _NO_SAVED_OUTPUT) and len(src.users) == 1):
        return
    import operator

    add.op, add.target = "call_function", operator.iadd
    add.args = (add.args[branch], add.args[1 - branch])
    add.kwargs = {}


def _free_name(module: nn.Module, base: str) -> str:
    name, k = base, 1
    while hasattr(module, name):
        name, k = f"{base}_{k}", k + 1
    return name


def placement_state(model: nn.Module) -> Optional[PlacementState]:
    return getattr(model, _STATE_ATTR, None)


@dataclass
class ReportEntry:
    quantizer: str
    enabled: bool
    rule: str
    amax: Optional[str]


def placement_report(model: nn.Module) -> Dict[str, object]:
    """Each quantizer, whether it is on, and the rule that put it there (plus why graph rules were skipped)."""
    state = placement_state(model) or PlacementState(reason="placement='trt' was not applied")
    entries = []
    for name, m in model.named_modules():
        if not isinstance(m, TensorQuantizer):
            continue
        rule = state.rules.get(name)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if rule is None:
            rule = getattr(parent, "quantizer_rules", {}).get(name.rsplit(".", 1)[-1])
        if rule is None and isinstance(parent, CallQuantMixin):
            rule = rules.RULE_CALL_WEIGHT if name.endswith("weight_quantizer") else rules.RULE_CALL_INPUT
        if rule is None:
            rule = rules.RULE_WEIGHT if name.endswith("weight_quantizer") else (
                rules.RULE_POOL_INPUT if "Pool" in type(parent).__name__
                else rules.RULE_WEIGHTED_INPUT)
        if not m.is_enabled and rule != rules.RULE_MAXPOOL:
            rule = f"{rule}; {rules.RULE_USER_DISABLED}"
        amax = None if m.amax is None else m.extra_repr().split("amax=")[-1].split(" calib")[0]
        entries.append(asdict(ReportEntry(name, m.is_enabled, rule, amax)))
    return {"traced": state.traced, "reason": state.reason, "quantizers": entries,
            "amax_groups": state.amax_groups,
            # getattr: a PlacementState pickled by an older trtquant lacks these fields
            "placed_subtrees": list(getattr(state, "placed_subtrees", [])),
            "skipped": dict(getattr(state, "skipped", {}))}


def format_placement_report(report: Dict[str, object]) -> str:
    subtrees = report.get("placed_subtrees") or []
    if report["traced"]:
        head = "graph rules: applied"
    elif subtrees:
        names = ", ".join(subtrees)  # type: ignore[arg-type]
        head = f"graph rules: applied to {len(subtrees)} traceable submodule(s) ({names}); " \
               f"whole model skipped - {report['reason']}"
    else:
        head = f"graph rules: skipped - {report['reason']}"
    lines = [head]
    for block, why in (report.get("skipped") or {}).items():  # type: ignore[union-attr]
        lines.append(f"block skipped: {block}: {why}")
    lines.append(f"{'quantizer':58} {'on':3} rule")
    for e in report["quantizers"]:  # type: ignore[union-attr]
        lines.append(f"{e['quantizer']:58} {'yes' if e['enabled'] else 'no':3} {e['rule']}")
    return "\n".join(lines)
