"""pytorch-quantization's automatic layer substitution: torch.nn layers become Quant* layers.

``initialize()`` patches ``torch.nn`` process-wide (as the tutorials expect); prefer the
``enabled()`` context manager, which restores torch.nn on exit, also on exceptions, or
``trtquant.quantize(model)``, which patches nothing.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .nn.registry import QUANT_MODULE_MAP

_originals: Dict[str, type] = {}


def _targets() -> List[Tuple[str, type]]:
    from .nn.rnn import QuantLSTM, QuantLSTMCell

    pairs = list(QUANT_MODULE_MAP.items()) + [(torch.nn.LSTM, QuantLSTM), (torch.nn.LSTMCell, QuantLSTMCell)]
    return [(f.__name__, q) for f, q in pairs if getattr(torch.nn, f.__name__, None) is f or f.__name__ in _originals]


def initialize(float_module_list: Optional[List[str]] = None, custom_quant_modules=None) -> None:
    """Replace torch.nn.Conv2d, Linear, pooling ... by their quantized versions for new models.

    Args:
        float_module_list: names (e.g. ``["Linear"]``) to leave as float.
        custom_quant_modules: extra ``(module, name, quant_class)`` triples to patch.
    """
    skip = set(float_module_list or ())
    for name, quant_cls in _targets():
        if name in skip:
            continue
        if name not in _originals:
            _originals[name] = getattr(torch.nn, name)
        setattr(torch.nn, name, quant_cls)
    for owner, name, quant_cls in custom_quant_modules or ():
        key = f"{owner.__name__}.{name}"
        if key not in _originals:
            _originals[key] = getattr(owner, name)
            _custom_owners[key] = owner
        setattr(owner, name, quant_cls)


_custom_owners: Dict[str, object] = {}


def deactivate() -> None:
    """Restore the float torch.nn layers (models created before stay quantized)."""
    for key, original in list(_originals.items()):
        owner = _custom_owners.pop(key, torch.nn)
        setattr(owner, key.rsplit(".", 1)[-1], original)
        del _originals[key]


@contextlib.contextmanager
def enabled(float_module_list: Optional[List[str]] = None) -> Iterator[None]:
    """``with quant_modules.enabled(): model = resnet50()`` - quantized layers inside, float after."""
    already = bool(_originals)
    initialize(float_module_list)
    try:
        yield
    finally:
        if not already:
            deactivate()


# -- pytorch-quantization's helper object and ONNX-export switch ------------------------------------

def _compat_targets() -> List[Tuple[object, str, type]]:
    """(owner, name, quantized class) that pytorch-quantization's initialize() patches: the registry's
    torch.nn layers plus LSTM/LSTMCell (monkey-patching only; trtquant.quantize does not swap RNNs)."""
    from .nn.rnn import QuantLSTM, QuantLSTMCell

    entries = [(torch.nn, f.__name__, q) for f, q in QUANT_MODULE_MAP.items() if hasattr(torch.nn, f.__name__)]
    entries += [(torch.nn, "LSTM", QuantLSTM), (torch.nn, "LSTMCell", QuantLSTMCell)]
    return entries


class QuantModuleReplacementHelper:
    """Patches ``owner.name`` attributes to quantized classes and restores them (pytorch-quantization API).

    ``prepare_state(float_module_list, custom_map)`` records what to patch (all supported torch.nn layers
    except the names in ``float_module_list``, plus ``(owner, name, quant_class)`` entries of
    ``custom_map``) and the originals; ``apply_quant_modules()`` patches, ``restore_float_modules()``
    puts the originals back. State lives on this object, never in module globals.
    """

    def __init__(self) -> None:
        self.quant_map: Dict[Tuple[int, str], Tuple[object, str, type]] = {}
        self.original_map: Dict[Tuple[int, str], Tuple[object, str, object]] = {}

    # pytorch-quantization's (misspelt) attribute name.
    @property
    def orginal_func_map(self):
        return set((o, n, v) for o, n, v in self.original_map.values())

    def prepare_state(self, float_module_list: Optional[List[str]] = None, custom_map=None) -> None:
        skip = set(float_module_list or ())
        entries = [e for e in _compat_targets() if e[1] not in skip] + [tuple(e) for e in custom_map or ()]
        for owner, name, quant_cls in entries:
            key = (id(owner), name)
            self.quant_map[key] = (owner, name, quant_cls)
            if key not in self.original_map:
                current = getattr(owner, name)
                # An owner already patched (by initialize) keeps its true original.
                self.original_map[key] = (owner, name, _originals.get(name, current) if owner is torch.nn else current)

    def apply_quant_modules(self) -> None:
        for owner, name, quant_cls in self.quant_map.values():
            setattr(owner, name, quant_cls)

    def restore_float_modules(self) -> None:
        for owner, name, original in self.original_map.values():
            setattr(owner, name, original)


@contextlib.contextmanager
def enable_onnx_export() -> Iterator[None]:
    """While active, quantizers refuse to run without an amax or in a format TensorRT cannot take.

    pytorch-quantization's switch for ``torch.onnx.export``; here it is reset on exit also after an
    error. trtquant's own exporter (``trtquant.export``) needs no switch.
    """
    from .quantizer import TensorQuantizer

    previous = TensorQuantizer._enable_onnx_export
    TensorQuantizer._enable_onnx_export = True
    try:
        yield
    finally:
        TensorQuantizer._enable_onnx_export = previous
