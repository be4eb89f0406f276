"""Parameter selection for quantization-aware training optimizers (pytorch-quantization's ``optim.helper``).

Patterns are regular expressions searched in ``model.named_parameters()`` names.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["match_parameters", "group_parameters", "freeze_parameters", "quant_weight_inplace"]


def match_parameters(model: nn.Module, patterns: Sequence[str]) -> Iterator[nn.Parameter]:
    """Yield every parameter whose name matches any of ``patterns`` (once per matching pattern)."""
    for name, param in model.named_parameters():
        for pattern in patterns:
            if re.search(pattern, name):
                yield param


def group_parameters(model: nn.Module, patterns_list: Sequence[List[str]], lrs: Optional[Sequence[float]] = None,
                     momentums: Optional[Sequence[float]] = None,
                     weight_decays: Optional[Sequence[float]] = None) -> List[Dict]:
    """Optimizer parameter groups, one per pattern list, with optional per-group lr/momentum/weight_decay.

    The pattern lists should be exclusive: a parameter matching two groups is given to both.
    """
    groups: List[Dict] = []
    for patterns in patterns_list:
        if not isinstance(patterns, list):
            raise TypeError(f"patterns_list must be list of list of patterns, got an element {patterns!r}")
        groups.append({"params": match_parameters(model, patterns)})
    for key, values in (("lr", lrs), ("momentum", momentums), ("weight_decay", weight_decays)):
        if values is None:
            continue
        if len(values) != len(patterns_list):
            raise TypeError(f"len({key}s)={len(values)} must match len(patterns_list)={len(patterns_list)}")
        for group, value in zip(groups, values):
            group[key] = value
    return groups


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> None:
    """Set ``requires_grad=False`` on parameters whose name matches any pattern."""
    for name, param in model.named_parameters():
        if any(re.search(p, name) for p in patterns):
            logger.warning("Freeze %s.", name)
            param.requires_grad = False


def quant_weight_inplace(model: nn.Module) -> None:
    """Overwrite each quantized layer's weight with its quantized value (relax-and-round style training)."""
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not wq.fake_quant:
            logger.warning("%s: in-place real quantization writes integer codes into the weight; inference only", name)
        logger.warning("In-place quantize weight of %s", name)
        with torch.no_grad():
            module.weight.copy_(wq(module.weight))
