"""Small transformer blocks of every attention style placement handles, shared by the transformer tests."""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HFStyleLayer(nn.Module):
    """A post-norm BERT layer written the way Hugging Face's eager attention is: projected Q/K/V reshaped and
    transposed, ``torch.matmul(q, kᵀ) / sqrt(d)``, softmax, ``torch.matmul(p, v)``."""

    def __init__(self, d: int = 32, heads: int = 4, sdpa: bool = False) -> None:
        super().__init__()
        self.h, self.dh, self.sdpa = heads, d // heads, sdpa
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.dh).permute(0, 2, 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh)
            ctx = torch.matmul(scores.softmax(dim=-1), v)
        x = self.ln1(x + self.out(ctx.permute(0, 2, 1, 3).reshape(x.shape)))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


def small_models() -> Dict[str, Tuple[Callable[[], nn.Module], Callable[[], Tensor], int]]:
    """name -> (model factory, input factory, number of attention blocks)."""
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    def encoder() -> nn.Module:
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    return {
        "vit": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                          mlp_dim=64), lambda: torch.randn(2, 3, 32, 32), 2),
        "swin": (lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                         window_size=[4, 4]), lambda: torch.randn(2, 3, 32, 32), 4),
        "maxvit": (lambda: MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[32],
                                  block_layers=[1], head_dim=16, stochastic_depth_prob=0.0),
                   lambda: torch.randn(2, 3, 32, 32), 2),
        "encoder": (encoder, lambda: torch.randn(2, 8, 32), 2),
        "hf": (lambda: nn.Sequential(HFStyleLayer(), HFStyleLayer()), lambda: torch.randn(2, 8, 32), 2),
        "hf_sdpa": (lambda: nn.Sequential(HFStyleLayer(sdpa=True), HFStyleLayer(sdpa=True)),
                    lambda: torch.randn(2, 8, 32), 2),
    }
