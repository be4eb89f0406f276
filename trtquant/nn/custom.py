"""Quantized twins of user layers that subclass Conv/ConvTranspose/Linear with their own ``forward``.

Real models write convolutions such as timm's ``Conv2dSame`` or efficientnet_pytorch's
``Conv2dStaticSamePadding`` (pad, then ``F.conv2d(x, self.weight, ...)``) and weight-standardized
convs (``F.conv2d(x, standardize(self.weight), ...)``). Swapping them for QuantConv2d would run
nn.Conv2d's forward and change the model, so the twin keeps the user's forward and every attribute,
and quantizes at the functional call instead: while the forward runs, a
:class:`torch.overrides.TorchFunctionMode` replaces the input and the weight of each
``conv*d``/``conv_transpose*d``/``linear`` call by their fake-quantized values. The weight is
quantized as the call sees it (after any transform in forward, which TensorRT constant-folds), and
the input after the forward's own padding: symmetric quantization maps 0 to 0, so quantizing a
zero-padded tensor equals padding the quantized one.

Calls per forward: every call whose weight has the layer's weight shape is quantized with the
layer's two quantizers (one input and one weight scale, like one QuantConv2d called at several
sites); a call with a weight of another shape runs in float, and a forward with no such call
quantizes nothing; both are logged once per layer with the fix.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..descriptor import QuantDescriptor
from .base import QuantMixin, _swap

logger = logging.getLogger(__name__)

#: Functional weighted calls the twin quantizes (``torch.conv2d is F.conv2d``), by ONNX op.
WEIGHTED_CALLS: Mapping[Callable[..., Tensor], str] = {
    F.conv1d: "Conv", F.conv2d: "Conv", F.conv3d: "Conv",
    F.conv_transpose1d: "ConvTranspose", F.conv_transpose2d: "ConvTranspose", F.conv_transpose3d: "ConvTranspose",
    F.linear: "Gemm",
}


def call_tensors(args: tuple, kwargs: dict) -> Tuple[Any, Any]:
    """(input, weight) of a conv/linear call, positional or keyword."""
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    return x, w


def _with_tensors(args: tuple, kwargs: dict, x: Tensor, w: Tensor) -> Tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    if args:
        args[0] = x
    else:
        kwargs["input"] = x
    if len(args) > 1:
        args[1] = w
    else:
        kwargs["weight"] = w
    return tuple(args), kwargs


class _QuantizeCalls(TorchFunctionMode):
    """Quantizes input and weight of the weighted calls made while the layer's forward runs.

    Torch runs ``__torch_function__`` with this mode popped, so the quantizers' own ops and the
    call itself are not intercepted again.
    """

    def __init__(self, layer: "CallQuantMixin") -> None:
        super().__init__()
        self.layer = layer
        self.quantized = 0
        self.float_shapes: list = []
        self.weight_transformed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in WEIGHTED_CALLS:
            return func(*args, **kwargs)
        layer = self.layer
        x, w = call_tensors(args, kwargs)
        if not isinstance(x, Tensor) or not isinstance(w, Tensor) or tuple(w.shape) != tuple(layer.weight.shape):
            self.float_shapes.append(tuple(w.shape) if isinstance(w, Tensor) else None)
            return func(*args, **kwargs)
        self.quantized += 1
        own = w is layer.weight
        self.weight_transformed |= not own
        wq = layer.quant_weight() if own else layer.weight_quantizer(w)
        args, kwargs = _with_tensors(args, kwargs, layer.input_quantizer(x), wq)
        return func(*args, **kwargs)


class CallQuantMixin(QuantMixin):
    """A quantized twin of a user's Conv/Linear subclass: the user's forward, quantized at its call.

    ``_float_type`` is the user's class; ``_torch_type`` the torch layer it derives from and
    ``_quant_type`` that layer's quantized class (which gives the default weight descriptor).
    :attr:`weight_transformed` is None until a forward ran, then whether the weight reaching the
    call was computed in forward (not the parameter itself): then the weight quantizer sees the
    transformed weight, and folding BatchNorm into ``self.weight`` would not fold it into that.
    """

    _torch_type: ClassVar[type]
    _quant_type: ClassVar[type]

    def init_quantizer(self, quant_desc_input: Optional[QuantDescriptor] = None,
                       quant_desc_weight: Optional[QuantDescriptor] = None) -> None:
        super().init_quantizer(quant_desc_input, quant_desc_weight)
        self.weight_transformed: Optional[bool] = None
        self._call_warned = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _QuantizeCalls(self) as mode:
            out = self._float_type.forward(self, *args, **kwargs)
        self.weight_transformed = mode.weight_transformed
        if (mode.float_shapes or not mode.quantized) and not self.__dict__.get("_call_warned", False):
            self._call_warned = True
            self._warn_calls(mode)
        return out

    def _warn_calls(self, mode: _QuantizeCalls) -> None:
        where = f"{type(self).__name__} ({self._float_type.__module__}.{self._float_type.__qualname__}.forward)"
        if not mode.quantized and not mode.float_shapes:
            logger.warning("%s makes no conv/linear call: nothing in it is quantized and its quantizers will see "
                           "no data; exclude it from trtquant.quantize or register a quantized version with "
                           "trtquant.nn.register", where)
        elif mode.float_shapes:
            logger.warning("%s makes %d conv/linear call(s) with a weight of shape %s, not the layer's weight %s: "
                           "they run in float (one weight quantizer cannot serve two weight shapes); register a "
                           "quantized version with trtquant.nn.register to quantize them", where,
                           len(mode.float_shapes), ", ".join(str(s) for s in mode.float_shapes),
                           tuple(self.weight.shape))

    def __reduce_ex__(self, protocol: int):
        # The twin class is made at run time: pickle (and deepcopy) rebuild it from the user's class.
        reduced = super().__reduce_ex__(protocol)
        return (_new_twin, (self._float_type, self._torch_type, self._quant_type)) + tuple(reduced[2:])

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: Optional[QuantDescriptor] = None,
                   quant_desc_weight: Optional[QuantDescriptor] = None) -> "CallQuantMixin":
        return _swap(cls, module, quant_desc_input=quant_desc_input, quant_desc_weight=quant_desc_weight)


_TWINS: Dict[type, type] = {}  # user class -> its twin class; a type table, like QUANT_MODULE_MAP


def twin_type(float_type: Type[nn.Module], torch_type: Type[nn.Module], quant_type: type) -> type:
    """The quantized twin class of ``float_type`` (a subclass of ``torch_type``), made once per class.

    ``quant_type`` (e.g. QuantConv2d) gives the default weight descriptor (per output channel;
    axis 1 for ConvTranspose).
    """
    twin = _TWINS.get(float_type)
    if twin is None:
        name = f"Quant{float_type.__name__}"
        twin = type(name, (CallQuantMixin, float_type), {
            "_float_type": float_type, "_torch_type": torch_type, "_quant_type": quant_type,
            "default_quant_desc_weight": quant_type.default_quant_desc_weight,
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"{float_type.__name__} with its forward kept and its {torch_type.__name__} call quantized.",
        })
        _TWINS[float_type] = twin
    return twin


def _new_twin(float_type: type, torch_type: type, quant_type: type) -> Any:
    """Unpickling/deepcopy constructor of a twin instance (its state is set afterwards)."""
    cls = twin_type(float_type, torch_type, quant_type)
    return cls.__new__(cls)


__all__ = ["CallQuantMixin", "WEIGHTED_CALLS", "call_tensors", "twin_type"]
