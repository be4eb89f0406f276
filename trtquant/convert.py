"""quantize(): swap supported layers of an existing model for quantized twins, in place.

No global patching; the new layers share the float layers' parameter objects, so optimizers,
state-dict keys and float checkpoints keep working.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

from .config import QuantConfig
from .nn.base import QuantInputMixin, QuantMixin
from .nn.custom import CallQuantMixin, twin_type
from .nn.pool import _QuantPool
from .nn.registry import QUANT_MODULE_MAP
from .quantizer import TensorQuantizer

logger = logging.getLogger(__name__)

Selector = Union[str, type]


def _as_list(sel: Union[None, Selector, Sequence[Selector]]) -> Optional[List[Selector]]:
    if sel is None:
        return None
    if isinstance(sel, (str, type)):
        return [sel]
    out = list(sel)
    for s in out:
        if not isinstance(s, (str, type)):
            raise TypeError(f"include/exclude entries must be module-name globs or module types, got {s!r}")
    return out


def _matches(name: str, module: nn.Module, selectors: Iterable[Selector]) -> bool:
    for s in selectors:
        if isinstance(s, type):
            if isinstance(module, s):
                return True
        elif fnmatch.fnmatchcase(name, s):
            return True
    return False


def _named(name: str, module: nn.Module, selectors: Iterable[Selector]) -> bool:
    """Selected by an exact name (no glob characters) or by type."""
    return any((isinstance(s, type) and isinstance(module, s)) or (isinstance(s, str) and s == name
               and not any(c in s for c in "*?[")) for s in selectors)


def name_quantizers(model: nn.Module) -> None:
    """Give every TensorQuantizer its fully qualified name, used in every error and report."""
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            m.name = name or "quantizer"


def _float_type(module: nn.Module) -> Optional[type]:
    for float_t in type(module).__mro__:
        if float_t in QUANT_MODULE_MAP:
            return float_t
    return None


#: Torch layers whose user subclasses with their own forward get a call-quantized twin.
_WEIGHTED_TORCH_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                           nn.ConvTranspose3d, nn.Linear)


def _own_forward(cls: type, float_t: type) -> bool:
    """Whether ``cls`` computes differently from ``float_t``: its own forward (or conv helper)."""
    return any(getattr(cls, attr, None) is not getattr(float_t, attr, None) for attr in ("forward", "_conv_forward"))


def _twin_class(name: str, module: nn.Module, float_t: type) -> Optional[type]:
    """The call-quantized twin class for a layer subclass with its own forward, or None (left float, logged)."""
    torch_t = next((t for t in type(module).__mro__ if t in _WEIGHTED_TORCH_TYPES), None)
    quant_t = QUANT_MODULE_MAP.get(torch_t) if torch_t is not None else None
    if quant_t is None or not issubclass(quant_t, QuantMixin):
        logger.warning("%s (%s) overrides %s.forward; left in float (only Conv/ConvTranspose/Linear subclasses are "
                       "quantized at their functional call; register a quantized version with trtquant.nn.register)",
                       name, type(module).__name__, float_t.__name__)
        return None
    nested = [n for n, m in module.named_modules() if n and isinstance(m, _WEIGHTED_TORCH_TYPES)]
    if nested:
        # Their calls would run inside this forward's quantizing mode and be quantized twice.
        logger.warning("%s (%s) overrides %s.forward and contains weighted layers (%s); left in float (register a "
                       "quantized version with trtquant.nn.register)", name, type(module).__name__,
                       float_t.__name__, ", ".join(nested[:5]))
        return None
    logger.info("%s (%s) has its own forward; quantizing its %s call (input and weight as the call sees them)",
                name, type(module).__name__, torch_t.__name__)
    return twin_type(type(module), torch_t, quant_t)


def quantize(
    model: nn.Module,
    config: Union[QuantConfig, dict, None] = None,
    include: Union[None, Selector, Sequence[Selector]] = None,
    exclude: Union[None, Selector, Sequence[Selector]] = None,
    placement: Optional[str] = "trt",
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    Args:
        model: any nn.Module (torchvision or your own); its code is not edited. Conv/ConvTranspose/
            Linear subclasses with their own forward (TF 'same' padding, weight standardization) keep it
            and are quantized at their ``F.conv*d``/``F.linear`` call (:mod:`trtquant.nn.custom`).
        config: QuantConfig (or dict) with input/weight descriptors and per-name overrides.
        include: module-name globs (``"layer1.*"``, ``"conv1"``) and/or module types; only these
            are quantized. None = every supported layer.
        exclude: globs/types to leave in float, applied after ``include``.
        placement: ``"trt"`` adds the quantizers TensorRT needs to fuse INT8 end to end (residual
            Add identity inputs, shared Concat amax, AvgPool inputs; traced with torch.fx) and
            disables those it would not fuse; ``F.conv*d``/``F.linear`` calls on parameters in the
            forward of selected modules get input and weight quantizers; None swaps layers only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    cfg = QuantConfig.coerce(config)
    inc, exc = _as_list(include), _as_list(exclude)
    if placement not in (None, "trt"):
        raise ValueError(f"placement must be 'trt' or None, got {placement!r}")

    targets: List[Tuple[str, nn.Module, type]] = []
    unsupported: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, (QuantInputMixin, TensorQuantizer)):
            continue
        selected = inc is None or _matches(name, module, inc)
        if not selected or (exc is not None and _matches(name, module, exc)):
            continue
        float_t = _float_type(module)
        quant_cls = None if float_t is None else QUANT_MODULE_MAP[float_t]
        if float_t is not None and _own_forward(type(module), float_t):
            # A subclass with its own forward ('same' padding, weight standardization): QuantConv2d would
            # run nn.Conv2d's forward instead, so a twin keeps the forward and quantizes at its conv call.
            quant_cls = _twin_class(name, module, float_t)
        if quant_cls is None:
            # Only layers named exactly or selected by type are errors; a glob ("layer1.*") also
            # matches the BatchNorms and activations around the convs, which stay float.
            if inc is not None and name and not list(module.children()) and _named(name, module, inc):
                unsupported.append(f"{name} ({type(module).__name__})")
            continue
        if issubclass(quant_cls, _QuantPool) and _fp8(cfg.for_module(name).input):
            continue  # placement rule fp8_skips: TensorRT runs no FP8 pooling, the pool stays float
        if type(module) is not float_t and not issubclass(quant_cls, CallQuantMixin):
            logger.info("%s is a subclass %s of %s; quantizing it as %s", name, type(module).__name__,
                        float_t.__name__, float_t.__name__)
        targets.append((name, module, quant_cls))

    if unsupported:
        supported = ", ".join(sorted(t.__name__ for t in QUANT_MODULE_MAP))
        raise ValueError(
            f"include selects layers trtquant cannot quantize: {', '.join(unsupported)}. Supported: {supported}; "
            "register others with trtquant.nn.register(FloatType, QuantType)"
        )
    if inc is not None and not targets:
        layers = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and _float_type(m) is not None]
        shown = ", ".join(layers[:20]) + (f", ... {len(layers) - 20} more" if len(layers) > 20 else "")
        raise ValueError(
            f"include={inc!r} matched no quantizable layer; the model's quantizable layers are: {shown or 'none'}. "
            "Use fnmatch globs on names from model.named_modules(), or module types"
        )

    for name, module, quant_cls in targets:
        descs = _descriptors_for(name, cfg, quant_cls)
        weight_only = "quant_desc_input" not in descs
        new = quant_cls.from_float(module, **descs)
        if weight_only and isinstance(getattr(new, "input_quantizer", None), TensorQuantizer):
            new.input_quantizer.disable()  # input=None: weight-only (INT4 blocks with FP16 activations)
        if isinstance(module, nn.Module) and module.training != new.training:
            new.train(module.training)
        _set_submodule(model, name, new)
    if placement == "trt" and targets:
        from .placement import apply_trt_placement

        apply_trt_placement(model, cfg, select=lambda n, m: (inc is None or _matches(n, m, inc))
                            and not (exc is not None and _matches(n, m, exc)))
    name_quantizers(model)
    for q in model.modules():  # trtquant's guard: an uncalibrated quantizer raises, naming itself (no per-batch amax)
        if isinstance(q, TensorQuantizer):
            q.dynamic_amax = False
    return model


def _fp8(desc) -> bool:
    return desc is not None and desc.is_fp8


def _descriptors_for(name: str, cfg: QuantConfig, quant_cls: type) -> dict:
    own = cfg.for_module(name)
    descs = {} if own.input is None else {"quant_desc_input": own.input}
    if issubclass(quant_cls, QuantMixin):
        descs["quant_desc_weight"] = own.weight  # None -> the class's per-channel default
    return descs


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself is a single layer; wrap it in nn.Sequential to quantize it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
