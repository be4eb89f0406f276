"""Automatic TensorRT placement with torch.fx, without editing model code.

The model is traced with quantized layers as leaves. Each residual Add gets a quantizer on its
identity (skip) input only, so Conv+Add(+ReLU) fuses in INT8; functional average pools get an input
quantizer; quantizers feeding one Concat share one amax; MaxPool quantizers are disabled. New
quantizers live on the module that owns the Add (e.g. ``layer1.0.residual_quantizer``), whose
forward is replaced by the rewritten traced graph - only those modules, not the whole model.

Quantizers that read one tensor (placement's ``same_tensor_groups``) get one shared
:class:`~trtquant.quantizer.SharedQuantResult` each group, so that tensor is fake-quantized once.

Deliberate per-model state: the :class:`PlacementState` is recorded on the model it describes
(``model._trtquant_placement``), so it follows the model through ``copy.deepcopy`` (export works on
a copy) and is gone with it; nothing is kept at module level.
"""

from __future__ import annotations

import logging
import types
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch.fx as fx
from torch import nn

from ..nn.base import QuantInputMixin, QuantMixin
from ..nn.pool import QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
from ..graph.dag import concat_quantizer_groups, residual_split
from ..quantizer import SharedQuantResult, TensorQuantizer
from . import rules
from .fx_dag import FxDag, binary_op

logger = logging.getLogger(__name__)

_STATE_ATTR = "_trtquant_placement"


@dataclass
class PlacementState:
    traced: bool = False
    reason: Optional[str] = None
    rules: Dict[str, str] = field(default_factory=dict)  # quantizer fqn -> rule
    amax_groups: List[List[str]] = field(default_factory=list)
    # Quantizers reading one tensor; each group shares one SharedQuantResult (quantizes it once).
    shared_inputs: List[List[str]] = field(default_factory=list)


class _QuantTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantInputMixin, TensorQuantizer)) or super().is_leaf_module(m, qualname)


class _LocalTracer(fx.Tracer):
    """Traces one module's own forward: every child is a leaf, so only its direct ops appear."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _site_kind(n: fx.Node) -> Optional[str]:
    if _is_add(n):
        return "add"
    if n.op == "call_function" and n.target in rules.AVGPOOL_FUNCTIONS:
        return "pool"
    return None


def _is_add(n: fx.Node) -> bool:
    """An Add of two data tensors (a bias or scale add with a parameter is not a residual site)."""
    return binary_op(n) == "Add"


def _identity_index(add: fx.Node, dag: FxDag) -> Optional[int]:
    """Which Add input is the identity, when the other is a quantized weighted branch; else None.

    The structural choice is :func:`trtquant.graph.dag.residual_split`, the checker's rule too.
    """
    split = residual_split(dag, add)
    if split is None:
        return None
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
    forward = module.__dict__.get("forward")
    if forward is None or not hasattr(forward, "__func__"):
        return _QuantTracer().trace(module)
    cls = type(module)
    module.__class__ = type(cls.__name__, (cls,), {"forward": forward.__func__})
    try:
        return _QuantTracer().trace(module)
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


def apply_trt_placement(model: nn.Module, cfg) -> PlacementState:
    """Add/disable quantizers for TensorRT fusion; records a PlacementState on the model."""
    state = PlacementState()
    for name, m in model.named_modules():
        if isinstance(m, (QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d)):
            m.input_quantizer.disable()
            state.rules[f"{name}.input_quantizer"] = rules.RULE_MAXPOOL
    try:
        graph = _trace(model)
    except Exception as e:  # untraceable: module-level quantizers stay, graph rules are skipped
        state.reason = f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        logger.warning("placement: %s; residual/concat/functional-pool rules skipped", state.reason)
        setattr(model, _STATE_ATTR, state)
        return state
    state.traced = True
    modules = dict(model.named_modules())
    dag = FxDag(graph, modules)

    # Sites (Adds, functional pools) per owning module, in execution order; which input to quantize
    # is decided here, on the whole-model graph, where both branches are visible.
    sites: Dict[str, List[Tuple[str, Optional[int]]]] = {}
    for n in graph.nodes:
        kind = _site_kind(n)
        if kind is None:
            continue
        idx = _identity_index(n, dag) if kind == "add" else 0
        sites.setdefault(_owner(n), []).append((kind, idx))
    for owner in sorted(sites, key=lambda s: (-s.count("."), s)):
        if any(idx is not None for _, idx in sites[owner]):
            _rewrite_owner(model, owner, sites[owner], cfg, state)

    # Concat: quantizers reading the inputs of one Concat share amax (TensorRT needs one scale).
    graph = _trace(model)
    modules = dict(model.named_modules())
    for _, quantizers in concat_quantizer_groups(FxDag(graph, modules), graph.nodes):
        group = [q for q in quantizers if q is not None]
        if len(group) > 1:
            state.amax_groups.append(group)
            for g in group:
                state.rules[g] = rules.RULE_CONCAT
    state.shared_inputs = share_results(model, same_tensor_groups(model, graph))
    setattr(model, _STATE_ATTR, state)
    return state


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


def _rewrite_owner(model: nn.Module, owner: str, sites: List[Tuple[str, Optional[int]]], cfg,
                   state: PlacementState) -> None:
    module = model.get_submodule(owner) if owner else model
    try:
        graph = _LocalTracer().trace(module)
    except Exception as e:
        logger.warning("placement: cannot trace %s alone (%s); its graph rules are skipped", owner or "model", e)
        return
    local = [n for n in graph.nodes if _site_kind(n) is not None]
    if [_site_kind(n) for n in local] != [k for k, _ in sites]:
        logger.warning("placement: %s traces differently alone than inside the model; skipped", owner or "model")
        return
    changed = False
    for n, (kind, idx) in zip(local, sites):
        if idx is None:
            continue
        base = "residual_quantizer" if kind == "add" else "pool_quantizer"
        qname = _free_name(module, base)
        module.add_module(qname, TensorQuantizer(cfg.input))
        with graph.inserting_before(n):
            qnode = graph.call_module(qname, (n.args[idx],))
        args = list(n.args)
        args[idx] = qnode
        full = f"{owner}.{qname}" if owner else qname
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
            state.rules[f"{owner}.{bname}" if owner else bname] = rules.RULE_ORT_BRANCH
        n.args = tuple(args)
        if kind == "add":
            _make_inplace_add(n, 1 - idx, dict(module.named_modules()))
        changed = True
    if changed:
        graph.lint()
        gm = fx.GraphModule(module, graph)
        # Only this module's own forward is replaced; its children keep their code.
        module.forward = types.MethodType(type(gm).forward, module)


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
        if rule is None:
            rule = rules.RULE_WEIGHT if name.endswith("weight_quantizer") else (
                rules.RULE_POOL_INPUT if "Pool" in type(model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model).__name__
                else rules.RULE_WEIGHTED_INPUT)
        if not m.is_enabled and rule != rules.RULE_MAXPOOL:
            rule = f"{rule}; {rules.RULE_USER_DISABLED}"
        amax = None if m.amax is None else m.extra_repr().split("amax=")[-1].split(" calib")[0]
        entries.append(asdict(ReportEntry(name, m.is_enabled, rule, amax)))
    return {"traced": state.traced, "reason": state.reason, "quantizers": entries,
            "amax_groups": state.amax_groups}


def format_placement_report(report: Dict[str, object]) -> str:
    lines = [f"graph rules: {'applied' if report['traced'] else 'skipped - ' + str(report['reason'])}",
             f"{'quantizer':58} {'on':3} rule"]
    for e in report["quantizers"]:  # type: ignore[union-attr]
        lines.append(f"{e['quantizer']:58} {'yes' if e['enabled'] else 'no':3} {e['rule']}")
    return "\n".join(lines)
