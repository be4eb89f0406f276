"""Quantized attention: both attention matmuls get quantizers on both inputs, for TensorRT's INT8 MHA fusion.

TensorRT fuses ``MatMul(Q, Kᵀ) -> [scale/mask Add] -> Softmax -> MatMul(P, V)`` into one attention kernel
(TensorRT developer guide, "Fused Attention", method 2: primitive MatMul and Softmax layers; Q or K is
multiplied by the attention scale *before* the first MatMul). With explicit quantization the fused kernel runs
in INT8 only when both inputs of both matmuls come through Q/DQ: Q and Kᵀ of the first (``q_bmm_quantizer``,
``k_bmm_quantizer``), the softmax output and V of the second (``softmax_quantizer``, ``v_bmm_quantizer``; the
names ModelOpt uses). The softmax output lies in [0, 1], so its quantizer calibrates with ``max`` (a
percentile or entropy amax below 1 would clip the largest attention weights).

:func:`quant_attention` is the one quantized attention core: :class:`QuantMultiheadAttention` (the twin of
``nn.MultiheadAttention``) calls it, and placement routes ``F.scaled_dot_product_attention`` calls to it
(:mod:`trtquant.placement.attention`), so both export the same fusable graph.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..descriptor import QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW, QuantDescriptor
from ..quantizer import TensorQuantizer
from .base import QuantMixin, _pick_desc

#: Names of the four attention-matmul quantizers, in the order :func:`bmm_quantizers` creates them.
BMM_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "softmax_quantizer", "v_bmm_quantizer")


def bmm_quantizers(desc: QuantDescriptor) -> Tuple[TensorQuantizer, TensorQuantizer, TensorQuantizer, TensorQuantizer]:
    """The quantizers of one attention: Q, Kᵀ, softmax output (max calibration, see module doc), V."""
    probs = replace(desc, calib_method="max") if desc.calib_method != "max" else desc
    return TensorQuantizer(desc), TensorQuantizer(desc), TensorQuantizer(probs), TensorQuantizer(desc)


def quant_attention(q: Tensor, k: Tensor, v: Tensor, q_quantizer: nn.Module, k_quantizer: nn.Module,
                    softmax_quantizer: nn.Module, v_quantizer: nn.Module, attn_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                    enable_gqa: bool = False) -> Tuple[Tensor, Tensor]:
    """``F.scaled_dot_product_attention`` written out with quantized matmul inputs; returns (output, probs).

    Same arguments and mask semantics as ``scaled_dot_product_attention`` (a boolean mask is True where
    attention is allowed; a float mask is added to the scores). Q is scaled before the first matmul, as
    TensorRT's fusion requires.
    """
    scale_factor = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    scores = torch.matmul(q_quantizer(q * scale_factor), k_quantizer(k.transpose(-2, -1)))
    if is_causal:
        L, S = q.size(-2), k.size(-2)
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(softmax_quantizer(probs), v_quantizer(v)), probs


class QuantMultiheadAttention(QuantMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with quantized projections and attention matmuls (same parameters, same keys).

    - The Q/K/V input projection is one GEMM on ``in_proj_weight`` (``weight_quantizer``: per output row) with
      ``input_quantizer`` on its input; for cross-attention the key and value inputs go through the same input
      quantizer (one scale covering query, key and value: TensorRT needs a Q/DQ on each, the calibrator sees
      all three).
    - ``out_proj`` stays a child Linear: ``quantize()`` swaps it for a QuantLinear like any other Linear.
    - Both attention matmuls: :func:`quant_attention`.

    PyTorch's fused fast paths (``nn.MultiheadAttention``'s own and ``nn.TransformerEncoderLayer``'s, taken in
    eval under ``no_grad``) read the float weights and would skip every quantizer; this module never takes
    them, and reports ``_qkv_same_embed_dim = False`` so the encoder layer's fast-path check sends it here
    (the flag only gates that path: the projection weights are ``in_proj_weight`` either way).
    """

    _float_type = nn.MultiheadAttention
    default_quant_desc_weight = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW
    #: Placement-report rule of each quantizer this layer owns (by attribute name).
    quantizer_rules = {
        "input_quantizer": "attention Q/K/V projection input (one GEMM on in_proj_weight)",
        "weight_quantizer": "attention Q/K/V projection weight (per output row)",
        "q_bmm_quantizer": "attention Q·Kᵀ MatMul input Q (scaled; TensorRT MHA fusion)",
        "k_bmm_quantizer": "attention Q·Kᵀ MatMul input Kᵀ (TensorRT MHA fusion)",
        "softmax_quantizer": "attention softmax output into P·V MatMul (max calibration; TensorRT MHA fusion)",
        "v_bmm_quantizer": "attention P·V MatMul input V (TensorRT MHA fusion)",
    }

    def __init__(self, embed_dim: int, num_heads: int, *args, quant_desc_input: Optional[QuantDescriptor] = None,
                 quant_desc_weight: Optional[QuantDescriptor] = None, **kwargs) -> None:
        nn.MultiheadAttention.__init__(self, embed_dim, num_heads, *args, **kwargs)
        _check_supported(self)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def init_quantizer(self, quant_desc_input: Optional[QuantDescriptor] = None,
                       quant_desc_weight: Optional[QuantDescriptor] = None) -> None:
        super().init_quantizer(quant_desc_input, quant_desc_weight)
        desc = _pick_desc(quant_desc_input, self.default_quant_desc_input, "input")
        for name, q in zip(BMM_QUANTIZERS, bmm_quantizers(desc)):
            self.add_module(name, q)
        self.__dict__["_qkv_same_embed_dim"] = False  # see the class docstring

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: Optional[QuantDescriptor] = None,
                   quant_desc_weight: Optional[QuantDescriptor] = None) -> "QuantMultiheadAttention":
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"QuantMultiheadAttention.from_float expects nn.MultiheadAttention, got {type(module).__name__}")
        _check_supported(module)
        return super().from_float(module, quant_desc_input, quant_desc_weight)  # type: ignore[return-value]

    @property
    def weight(self) -> Tensor:  # what QuantMixin.quant_weight quantizes
        return self.in_proj_weight

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        self_attention = key is query and value is query
        if not batched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, E // self.num_heads
        w = self.quant_weight()
        b = self.in_proj_bias
        if self_attention:
            q, k, v = F.linear(self.input_quantizer(query), w, b).chunk(3, dim=-1)
        else:
            wq, wk, wv = w.chunk(3)
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            q = F.linear(self.input_quantizer(query), wq, bq)
            k = F.linear(self.input_quantizer(key), wk, bk)
            v = F.linear(self.input_quantizer(value), wv, bv)
        q = q.reshape(N, L, H, D).transpose(1, 2)
        k = k.reshape(N, S, H, D).transpose(1, 2)
        v = v.reshape(N, S, H, D).transpose(1, 2)
        mask = self._merged_mask(attn_mask, key_padding_mask, N, L, S, q.dtype)
        out, probs = quant_attention(q, k, v, self.q_bmm_quantizer, self.k_bmm_quantizer, self.softmax_quantizer,
                                     self.v_bmm_quantizer, attn_mask=mask,
                                     dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
        if not need_weights:
            return out, None
        weights = probs.mean(dim=1) if average_attn_weights else probs
        return out, (weights if batched else weights.squeeze(0))

    def _merged_mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], N: int, L: int, S: int,
                     dtype: torch.dtype) -> Optional[Tensor]:
        """nn.MultiheadAttention's masks (boolean True = not allowed, or additive) as one additive mask."""
        mask: Optional[Tensor] = None
        for m, shape in ((attn_mask, None), (key_padding_mask, (N, 1, 1, S))):
            if m is None:
                continue
            m = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)
            if shape is not None:
                m = m.reshape(shape)
            elif m.dim() == 3:  # (N * H, L, S)
                m = m.reshape(N, self.num_heads, L, S)
            mask = m if mask is None else mask + m
        return mask


def _check_supported(module: nn.MultiheadAttention) -> None:
    if module.in_proj_weight is None or module.bias_k is not None:
        why = "kdim/vdim differ from embed_dim" if module.in_proj_weight is None else "add_bias_kv=True"
        raise ValueError(f"nn.MultiheadAttention with {why} is not supported by QuantMultiheadAttention; "
                         "exclude this layer from quantize() (exclude=[name]) to keep it float")
