"""Model outputs of any structure as named tensor leaves, in the order torch.onnx writes graph outputs.

Segmentation models return ``OrderedDict(out=..., aux=...)``, detectors lists of dicts, others
namedtuples or nested tuples. Export, ONNX Runtime parity, sensitivity and the benchmarks all need
the same flat view: :func:`flatten_outputs` walks the structure depth first - sequences and
namedtuples in order, mappings in insertion order - which is the order both torch.onnx exporters
('dynamo' through torch.utils._pytree, 'legacy' through the TorchScript flattener) emit graph
outputs, so ONNX output ``i`` is leaf ``i``. ``None`` and plain Python scalars produce no graph
output and no leaf.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, List, Tuple

from torch import Tensor

__all__ = ["flatten_outputs", "output_tensors", "onnx_output_names"]

#: The name of the leaf when the whole output is one tensor (and of that ONNX output).
SINGLE = "output"

_SKIPPED = (type(None), bool, int, float, str)


def flatten_outputs(obj: Any) -> List[Tuple[str, Tensor]]:
    """``[(leaf name, tensor)]`` of a model output, in torch.onnx's output order.

    Leaf names join keys, namedtuple fields and sequence positions with dots: ``out``/``aux`` for a
    dict, ``0``/``1`` for a tuple, ``logits.0`` or ``1.boxes`` when nested; a bare tensor is
    ``output``.

    Raises:
        TypeError: for an object that is none of tensor, sequence, mapping or namedtuple (naming
            where in the output it sits), since torch.onnx could not export it either.
    """
    if isinstance(obj, Tensor):
        return [(SINGLE, obj)]
    leaves: List[Tuple[str, Tensor]] = []
    _walk(obj, "", leaves)
    return leaves


def _walk(obj: Any, prefix: str, leaves: List[Tuple[str, Tensor]]) -> None:
    if isinstance(obj, Tensor):
        leaves.append((prefix or SINGLE, obj))
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _walk(value, _join(prefix, str(key)), leaves)
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple: fields in declaration order
        for key, value in zip(obj._fields, obj):
            _walk(value, _join(prefix, key), leaves)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _walk(value, _join(prefix, str(i)), leaves)
    elif not isinstance(obj, _SKIPPED):
        where = f"at '{prefix}'" if prefix else "at the top level"
        raise TypeError(f"model output {where} is a {type(obj).__name__}: outputs must be tensors, or tuples, lists, "
                        "dicts and namedtuples of tensors; return a tensor structure from forward()")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def output_tensors(obj: Any) -> List[Tensor]:
    """The tensors of :func:`flatten_outputs`, without names."""
    return [t for _, t in flatten_outputs(obj)]


def onnx_output_names(obj: Any) -> List[str]:
    """ONNX graph output names for a model output: the leaf names, where a leaf that starts with a
    digit (a position in a top-level tuple) becomes ``output_<leaf>`` - ``output_0``, ``output_1.boxes``
    - so every name reads as a name; a bare tensor (or a 1-tuple) is ``output``, a dict ``out``/``aux``."""
    names = [name for name, _ in flatten_outputs(obj)]
    if len(names) == 1 and names[0][:1].isdigit():
        return [SINGLE]
    return [f"{SINGLE}_{name}" if name[:1].isdigit() else name for name in names]
