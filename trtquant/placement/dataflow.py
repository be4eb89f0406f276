"""Run-time dataflow: which ops and quantizers read each tensor, recorded while the model runs once.

torch.fx cannot trace code that loops in Python over a list of tensors (torchvision's detection heads
run their convs once per FPN level), so the graph rules see those convs' readers nowhere. Running the
model under a ``TorchFunctionMode`` sees every torch function and tensor method actually called, each
quantizer's call (forward hooks) and the model's outputs: enough to ask, for any tensor, the same
question :func:`~trtquant.placement.ort_observers.covering_quantizers` asks of an fx node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Set

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from ..quantizer import TensorQuantizer
from .ort_observers import gives_q

# Function / method names the ONNX Runtime graph copies an output Q up through: the run-time spelling of
# ort_observers' _COPY_* sets (ReLU, ReLU6, MaxPool, reshapes, Concat, zero Pad, Dropout in eval).
_COPY_NAMES = {"relu", "relu_", "relu6", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
               "max_pool2d_with_indices", "max_pool3d_with_indices", "flatten", "reshape", "view", "squeeze",
               "unsqueeze", "transpose", "permute", "contiguous", "cat", "concat"}


@dataclasses.dataclass
class _Op:
    name: str
    copies: bool  # the ONNX Runtime graph moves an output Q up through it
    outputs: List[int]


@dataclasses.dataclass
class Dataflow:
    """Readers of every tensor one forward pass made (by :meth:`tensor_id`)."""

    readers: Dict[int, List[Any]]  # tensor id -> _Op / TensorQuantizer reading it
    model_outputs: Set[int]
    seen_by: Dict[str, List[int]]  # quantizer name -> ids of the tensors it read, call by call
    quantizer_reads: Dict[int, List[str]] = dataclasses.field(default_factory=dict)  # tensor id -> quantizers
    _serials: Any = dataclasses.field(default_factory=WeakIdKeyDictionary, repr=False)
    _counter: Any = dataclasses.field(default_factory=itertools.count, repr=False)

    def tensor_id(self, t: torch.Tensor) -> int:
        """A number for ``t`` unique over the recording (``id`` is reused once a tensor is freed, and keeping
        every activation alive would cost a whole forward's memory)."""
        serial = self._serials.get(t)
        if serial is None:
            serial = self._serials[t] = next(self._counter)
        return serial

    def covering(self, tensor: int, key: Callable[[TensorQuantizer], Optional[Hashable]],
                 depth: int = 0) -> Optional[Set[Hashable]]:
        """``key`` of each quantizer every path from ``tensor`` reaches through ops that copy a Q; None when
        a path reaches a float reader or a model output (as ``covering_quantizers`` on an fx graph).
        ``key`` returning None marks a quantizer that gives no Q (that path is float)."""
        readers = self.readers.get(tensor, [])
        if depth > 64 or not readers or tensor in self.model_outputs:
            return None
        found: Set[Hashable] = set()
        for r in readers:
            if isinstance(r, TensorQuantizer):
                k = key(r) if gives_q(r) else None
                if k is None:
                    return None
                found.add(k)
                continue
            if not r.copies or not r.outputs:
                return None
            below = self.covering(r.outputs[0], key, depth + 1)
            if below is None:
                return None
            found |= below
        return found


def _tensors(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _copies(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _COPY_NAMES:
        return True
    if name == "pad":  # F.pad: a zero constant pad commutes with quantization
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
        return mode == "constant" and value in (None, 0, 0.0)
    if name == "dropout":
        return not kwargs.get("training", args[2] if len(args) > 2 else True)
    if name == "hardtanh":  # ReLU6 spelled as Hardtanh(0, 6)
        low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        return float(low) >= 0
    return False


class _Recorder(TorchFunctionMode):
    def __init__(self, flow: Dataflow):
        super().__init__()
        self.flow, self.inside = flow, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:  # a quantizer's own arithmetic: the hooks record the quantizer as one reader
            return out
        produced = _tensors(out)
        if not produced:  # .shape, .size(), .dim(): no tensor flows on
            return out
        name = getattr(func, "__name__", str(func))
        consumed = _tensors(args) + _tensors(kwargs)
        ids = {self.flow.tensor_id(t) for t in consumed}
        copies = _copies(name, args, kwargs)
        outputs = [i for i in (self.flow.tensor_id(t) for t in produced) if i not in ids]
        if not outputs and copies:  # in place (relu_): the same tensor goes on
            return out
        op = _Op(name, copies, outputs)
        for i in ids:
            self.flow.readers.setdefault(i, []).append(op)
        return out


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[Dataflow]:
    """Record the dataflow of whatever runs ``model`` inside the block. A quantizer that returns its input unchanged (disabled, observe-only, calibrating) is
    not a reader there - the tensor passes through it - but every quantizer's reads of non-parameter
    tensors are listed in :attr:`Dataflow.quantizer_reads`."""
    flow = Dataflow({}, set(), {})
    recorder = _Recorder(flow)
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def pre(q: TensorQuantizer, args: tuple) -> None:
        recorder.inside += 1

    def post(q: TensorQuantizer, args: tuple, out: Any) -> None:
        recorder.inside -= 1
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        name, tid = names.get(id(q), ""), flow.tensor_id(x)
        flow.seen_by.setdefault(name, []).append(tid)
        if not isinstance(x, nn.Parameter):
            flow.quantizer_reads.setdefault(tid, []).append(name)
        if out is not x:  # it quantizes (or computes): a reader; one returning x lets the tensor pass
            flow.readers.setdefault(tid, []).append(q)

    for m in model.modules():
        if isinstance(m, TensorQuantizer):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        with recorder:
            yield flow
    finally:
        for h in handles:
            h.remove()


def record_dataflow(model: nn.Module, example_inputs: Any) -> Dataflow:
    """Run ``model`` once on ``example_inputs`` (a tensor or a tuple of positional arguments) under
    :func:`recording`; the flow knows the model's outputs."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad(), recording(model) as flow:
        out = model(*args)
    flow.model_outputs = {flow.tensor_id(t) for t in _tensors(out)}
    return flow


def shared_reader_groups(flow: Dataflow, names: Set[str]) -> List[List[str]]:
    """Groups (size >= 2) of the quantizers in ``names`` that read one tensor, joined transitively: a head's
    quantizer called once per FPN level links every quantizer reading any of those levels."""
    parent: Dict[str, str] = {}

    def root(n: str) -> str:
        while parent.setdefault(n, n) != n:
            n = parent[n]
        return n

    for readers in flow.quantizer_reads.values():
        members = sorted({r for r in readers if r in names})
        for other in members[1:]:
            parent[root(other)] = root(members[0])
    groups: Dict[str, List[str]] = {}
    for n in parent:
        groups.setdefault(root(n), []).append(n)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)
