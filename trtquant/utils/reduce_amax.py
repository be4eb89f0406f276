"""reduce_amax: max |x| over the axes to *reduce* (numpy's convention, as pytorch-quantization's).

Note the contrast with :func:`trtquant.calib.max.reduce_amax`, whose ``axis`` names the axes to
*keep* (the quantization axis, as descriptors give it).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor


def reduce_amax(input: Tensor, axis: Optional[Union[int, Sequence[int]]] = None, keepdims: bool = True) -> Tensor:
    """max |input| over ``axis`` (None: every axis, giving a 0-d tensor).

    With an int, ``keepdims`` decides whether the reduced axis stays with size 1. With a sequence, the
    reduced axes stay (size 1) when ``keepdims`` is True and the result has more than one element;
    otherwise size-1 axes are squeezed. No gradient is recorded.

    Raises:
        ValueError: more axes than ``input`` has dimensions.
    """
    with torch.no_grad():
        if axis is None:
            return input.abs().amax()
        if isinstance(axis, int):
            return input.abs().amax(dim=axis, keepdim=keepdims)
        axes = list(axis)
        if len(axes) > input.dim():
            raise ValueError(f"Cannot reduce more axes than tensor's dim: axis={tuple(axes)} for a {input.dim()}-d tensor")
        if not axes:
            return input.abs()
        out = input.abs().amax(dim=axes, keepdim=True)
        if not keepdims or out.numel() == 1:
            out = out.squeeze()
        return out
