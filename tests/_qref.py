"""An independent reference for INT8 quantize/dequantize, written in numpy from the definition.

Tests compare trtquant against this instead of against trtquant itself, so that a wrong scale
(``amax / 128``) or a fake quant that does nothing makes them fail:

    scale = float32(amax) / float32(bound)        bound = 127 signed, 255 unsigned
    code  = clip(rint(x / scale), qmin, qmax)     rint rounds half to even; qmin = -128 (-127 narrow)
    y     = code * scale (+0.0: code 0 is +0.0)

Nothing here imports trtquant.
"""

from __future__ import annotations

import numpy as np
import torch

#: A scale that is a power of two (amax = 127/16 -> scale 1/16 exactly): x = (k + 0.5) / 16 are exact ties.
AMAX_SIXTEENTH = 7.9375
SCALE_SIXTEENTH = 0.0625

#: Hand-chosen inputs at scale 1/16 and the codes they must get (signed, wide range [-128, 127]):
#: ties round half to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 126.5 -> 126, 127.5 -> 128 -> saturates to 127),
#: negative ties likewise, saturation at 127 and -128, and a plain value (0.64 -> 1).
HAND_X = [0.03125, 0.09375, 0.15625, -0.03125, -0.09375, -0.15625, 1.0, 0.04, 7.90625, 7.96875, 100.0,
          -7.96875, -8.03125, -100.0, 0.0, -0.0]
HAND_CODES = [0, 2, 2, 0, -2, -2, 16, 1, 126, 127, 127, -128, -128, -128, 0, 0]
HAND_CODES_NARROW = [0, 2, 2, 0, -2, -2, 16, 1, 126, 127, 127, -127, -127, -127, 0, 0]


def scale_of(amax, bound: int = 127) -> np.ndarray:
    """float32 amax / float32 bound, elementwise (amax 0 -> 1.0, as exporters write a dead channel)."""
    a = _np(amax)
    s = (a / np.float32(bound)).astype(np.float32)
    return np.where(a > 0, s, np.float32(1.0)).astype(np.float32)


def codes(x, amax, unsigned: bool = False, narrow_range: bool = False) -> np.ndarray:
    """Integer codes (float32 array) of ``x`` for ``amax`` (scalar or broadcastable), from the definition."""
    bound = 255 if unsigned else 127
    qmin, qmax = (0, 255) if unsigned else ((-127 if narrow_range else -128), 127)
    xn = _np(x)
    s = scale_of(amax, bound)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return np.clip(np.rint(xn / s), qmin, qmax).astype(np.float32)


def fake_quant(x, amax, unsigned: bool = False, narrow_range: bool = False) -> torch.Tensor:
    """Dequantized float32 values (a torch tensor on the CPU) from the definition."""
    s = scale_of(amax, 255 if unsigned else 127)
    q = codes(x, amax, unsigned, narrow_range)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (q * s + np.float32(0)).astype(np.float32)  # + 0 turns -0.0 into +0.0
    return torch.from_numpy(y)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)
