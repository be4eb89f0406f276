"""``nn.functional``: pytorch-quantization's broadcasting clip with PACT gradients."""

from ..functional import ClipFunction, clip

__all__ = ["ClipFunction", "clip"]
