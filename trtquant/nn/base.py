"""QuantModule mixin: input/weight quantizers on a torch layer, sharing its parameter objects.

Weighted layers cache their fake-quantized weight while no gradient flows through it (inference,
calibration of activations): the weight only changes when its version counter or amax does, and
re-quantizing it on every forward is most of the fake-quant overhead.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Optional, Tuple

import torch
from torch import Tensor, nn

from ..descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor
from ..quantizer import TensorQuantizer


class DescriptorTypeError(TypeError, ValueError):
    """Not a QuantDescriptor: a TypeError (trtquant) that is also the ValueError pytorch-quantization raised."""


def _pick_desc(given: Optional[QuantDescriptor], default: QuantDescriptor, kind: str, owner: object = None) -> QuantDescriptor:
    desc = default if given is None else given
    if not isinstance(desc, QuantDescriptor):
        raise DescriptorTypeError(f"quant_desc_{kind} must be a QuantDescriptor, got {type(given).__name__}")
    if not desc.fake_quant:
        # A layer feeds its quantized input to a float op: integer codes would be wrong numbers there.
        raise ValueError(f"{getattr(owner, '__name__', type(owner).__name__)}: quant_desc_{kind} has fake_quant=False. "
                         "Only fake quantization is supported in layers (real quantization is for a standalone "
                         "TensorQuantizer)")
    return desc


def check_unused_kwargs(float_type: type, kwargs: dict) -> None:
    """pytorch-quantization's "Unused keys" TypeError for keywords the float layer does not take either."""
    import inspect

    try:
        params = inspect.signature(float_type.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unused = sorted(set(kwargs) - set(params))
    if unused:
        raise TypeError(f"Unused keys: {unused}; {float_type.__name__} takes {', '.join(p for p in params if p != 'self')} "
                        "plus quant_desc_input/quant_desc_weight")


class QuantInputMixin:
    """Adds ``input_quantizer`` (pooling layers)."""

    default_quant_desc_input: ClassVar[QuantDescriptor] = QUANT_DESC_8BIT_PER_TENSOR

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        """Class-wide default for quantizers created after this call (pytorch-quantization API)."""
        if not isinstance(value, QuantDescriptor):
            raise DescriptorTypeError(f"expected a QuantDescriptor, got {type(value).__name__}")
        cls.default_quant_desc_input = value

    def init_quantizer(self, quant_desc_input: Optional[QuantDescriptor] = None) -> None:
        self.input_quantizer = TensorQuantizer(_pick_desc(quant_desc_input, self.default_quant_desc_input, "input", self))

    @property
    def _input_quantizer(self) -> TensorQuantizer:  # pytorch-quantization's attribute name
        return self.input_quantizer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # pytorch-quantization checkpoints name the quantizers _input_quantizer/_weight_quantizer.
        for old in [k for k in state_dict if k.startswith(prefix + "_input_quantizer.") or k.startswith(prefix + "_weight_quantizer.")]:
            state_dict[prefix + old[len(prefix) + 1:]] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantMixin(QuantInputMixin):
    """Adds ``input_quantizer`` and ``weight_quantizer`` to a weighted layer."""

    default_quant_desc_weight: ClassVar[QuantDescriptor] = QUANT_DESC_8BIT_PER_TENSOR
    _float_type: ClassVar[type]

    @classmethod
    def set_default_quant_desc_weight(cls, value: QuantDescriptor) -> None:
        if not isinstance(value, QuantDescriptor):
            raise DescriptorTypeError(f"expected a QuantDescriptor, got {type(value).__name__}")
        cls.default_quant_desc_weight = value

    def init_quantizer(self, quant_desc_input: Optional[QuantDescriptor] = None,
                       quant_desc_weight: Optional[QuantDescriptor] = None) -> None:
        desc_in = _pick_desc(quant_desc_input, self.default_quant_desc_input, "input", self)
        desc_w = _pick_desc(quant_desc_weight, self.default_quant_desc_weight, "weight", self)
        self.input_quantizer = TensorQuantizer(desc_in)
        self.weight_quantizer = TensorQuantizer(desc_w)
        self._wq_cache: Optional[Tuple[Any, Tensor]] = None

    @property
    def _weight_quantizer(self) -> TensorQuantizer:
        return self.weight_quantizer

    def quant_weight(self) -> Tensor:
        """The weight as the layer uses it: fake-quantized, from the cache when nothing changed."""
        w = self.weight
        wq = self.weight_quantizer
        if wq._if_calib or wq._export is not None or (torch.is_grad_enabled() and (w.requires_grad or wq.learn_amax)) \
                or not wq.is_enabled or wq._enable_onnx_export or wq._pre_quant_scale is not None:
            self._wq_cache = None
            return wq(w)
        amax = wq.amax
        key = (w._version, w.data_ptr(), w.dtype, w.device, None if amax is None else (amax._version, amax.data_ptr()),
               wq._if_quant, wq.quant_desc, wq._if_clip,
               tuple(p._version for p in wq.clip.parameters()) if "clip" in wq._modules else None)
        cache = self.__dict__.get("_wq_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        out = wq(w)
        self._wq_cache = (key, out)
        return out

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: Optional[QuantDescriptor] = None,
                   quant_desc_weight: Optional[QuantDescriptor] = None) -> "QuantMixin":
        """A quantized twin of ``module`` that shares its parameter and buffer objects (same state-dict keys)."""
        return _swap(cls, module, quant_desc_input=quant_desc_input, quant_desc_weight=quant_desc_weight)


def _swap(cls: type, module: nn.Module, **desc: Optional[QuantDescriptor]) -> Any:
    if not isinstance(module, cls._float_type):
        raise TypeError(f"{cls.__name__}.from_float expects {cls._float_type.__name__}, got {type(module).__name__}")
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    # Own dicts, same tensor objects: adding quantizers must not touch the float module.
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                 "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                 "_load_state_dict_pre_hooks"):
        if name in new.__dict__:
            new.__dict__[name] = copy.copy(new.__dict__[name])
    new.init_quantizer(**desc)
    # trtquant's own path (trtquant.quantize): an uncalibrated quantizer raises, naming itself, instead of
    # quantizing each batch with its own dynamic amax as the pytorch-quantization constructors do.
    for q in new.children():
        if isinstance(q, TensorQuantizer):
            q.dynamic_amax = False
    return new


def quant_input_from_float(cls: type, module: nn.Module, quant_desc_input: Optional[QuantDescriptor] = None) -> Any:
    return _swap(cls, module, quant_desc_input=quant_desc_input)
