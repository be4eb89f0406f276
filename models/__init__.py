"""Reference model recipes: name -> constructor, input shape, preprocessing, quantization config.

Used by the CLI, benchmarks and tests (``trtquant.models.get("resnet50")``). Weights come from a
local file (``weights=path``) or torchvision's cache when present; otherwise the model is randomly
initialised and a warning says so loudly - random weights are fine for structure and speed, never
for accuracy claims.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from trtquant.config import QuantConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[], nn.Module]
    input_shape: Tuple[int, int, int]  # C, H, W
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    config: QuantConfig = field(default_factory=QuantConfig)
    torchvision_weights: Optional[str] = None
    notes: str = ""

    def example_input(self, batch: int = 1, size: Optional[int] = None) -> torch.Tensor:
        c, h, w = self.input_shape
        if size is not None:
            h = w = size
        return torch.randn(batch, c, h, w)

    def create(self, weights: Optional[str] = None, pretrained: bool = True) -> Tuple[nn.Module, bool]:
        """(model in eval mode, whether real weights were loaded)."""
        model = self.build()
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            model.load_state_dict(state)
            return model.eval(), True
        if pretrained and self.torchvision_weights and _torchvision_weights_cached(self.torchvision_weights):
            import torchvision

            w = torchvision.models.get_weight(self.torchvision_weights)
            model.load_state_dict(w.get_state_dict(progress=False, check_hash=False))
            return model.eval(), True
        logger.warning("%s: RANDOM INITIALISATION (no weights file given and no cached torchvision weights) - "
                       "fine for structure and speed, meaningless for accuracy", self.name)
        return model.eval(), False


def _torchvision_weights_cached(weight_name: str) -> bool:
    try:
        import torchvision

        w = torchvision.models.get_weight(weight_name)
        hub = torch.hub.get_dir()
        return os.path.exists(os.path.join(hub, "checkpoints", os.path.basename(w.url)))
    except Exception:
        return False


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


RECIPES: Dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("resnet18", _tv("resnet18"), (3, 224, 224), torchvision_weights="ResNet18_Weights.IMAGENET1K_V1"),
        Recipe("resnet50", _tv("resnet50"), (3, 224, 224), torchvision_weights="ResNet50_Weights.IMAGENET1K_V2"),
        Recipe("mobilenet_v2", _tv("mobilenet_v2"), (3, 224, 224),
               torchvision_weights="MobileNet_V2_Weights.IMAGENET1K_V2"),
        Recipe("inception_v3", _tv("inception_v3", aux_logits=False, init_weights=False), (3, 299, 299),
               (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), torchvision_weights="Inception_V3_Weights.IMAGENET1K_V1",
               notes="aux_logits=False: the auxiliary head is training-only"),
    ]
}


def list_models() -> List[str]:
    return sorted(RECIPES)


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown model recipe '{name}'{hint}; known: {', '.join(list_models())}; "
                         "or pass an importable 'module:function'") from None


def register(recipe: Recipe) -> None:
    RECIPES[recipe.name] = recipe
