"""``nn.modules._utils``: the quantized-layer mixins and ``pop_quant_desc_in_kwargs``."""

from __future__ import annotations

from typing import Any, Tuple, Union

from ...descriptor import QuantDescriptor
from ..base import QuantInputMixin, QuantMixin

__all__ = ["QuantMixin", "QuantInputMixin", "pop_quant_desc_in_kwargs"]


def pop_quant_desc_in_kwargs(quant_cls: type, input_only: bool = False,
                             **kwargs: Any) -> Union[QuantDescriptor, Tuple[QuantDescriptor, QuantDescriptor]]:
    """The input (and weight) descriptors in ``kwargs``, else ``quant_cls``'s defaults; other keys are an error."""
    desc_in = kwargs.pop("quant_desc_input", quant_cls.default_quant_desc_input)
    desc_w = None if input_only else kwargs.pop("quant_desc_weight", quant_cls.default_quant_desc_weight)
    if kwargs:
        raise TypeError(f"Unused keys: {sorted(kwargs)}; only quant_desc_input/quant_desc_weight are taken here")
    return desc_in if input_only else (desc_in, desc_w)
