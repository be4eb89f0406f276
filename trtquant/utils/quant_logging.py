"""pytorch-quantization's ``utils.quant_logging``: reset the package logger's handlers.

The original swaps absl's handler; trtquant logs through the standard ``logging`` module under the
``trtquant`` logger, so resetting means removing the handlers attached to it.
"""

from __future__ import annotations

import logging

__all__ = ["reset_logger_handler"]


def reset_logger_handler() -> None:
    """Remove every handler attached to the ``trtquant`` logger (messages then go to the root logger)."""
    log = logging.getLogger("trtquant")
    for handler in list(log.handlers):
        log.removeHandler(handler)
