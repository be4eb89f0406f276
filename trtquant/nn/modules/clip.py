"""``nn.modules.clip``: :class:`trtquant.functional.Clip` under its old path."""

from ...functional import Clip

__all__ = ["Clip"]
