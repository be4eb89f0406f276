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
    return [(f.__name__, q) for f, q in QUANT_MODULE_MAP.items() if getattr(torch.nn, f.__name__, None) is f or f.__name__ in _originals]


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
