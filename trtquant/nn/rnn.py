"""Quantized LSTM and LSTMCell (pytorch-quantization's ``QuantLSTM``/``QuantLSTMCell``).

Each cell step quantizes the concatenation [x_t, h_{t-1}] with one input quantizer and the
concatenated weight [W_ih, W_hh] with one weight quantizer, so input and hidden state share one
amax, as do the two weights: the fused form in which one GEMM computes all four gates. A layer and
direction of :class:`QuantLSTM` has its own pair (``_input_quantizers[i]``, ``_weight_quantizers[i]``,
i = layer * num_directions + direction). The recurrence runs in Python (no cuDNN), which is slow but
exact; these layers are for accuracy studies, not for the TensorRT fast path.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor
from ..quantizer import TensorQuantizer
from .base import QuantMixin, _pick_desc

__all__ = ["QuantLSTM", "QuantLSTMCell", "QuantRNN", "LSTM", "LSTMCell"]


_Weights = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]


def _lstm_step(x: Tensor, h: Tensor, c: Tensor, weights: _Weights,
               input_quantizer: TensorQuantizer) -> Tuple[Tensor, Tensor]:
    w_ih, w_hh, b_ih, b_hh = weights
    x, h_in = input_quantizer(torch.cat([x, h], 1)).split([x.shape[1], h.shape[1]], 1)
    # Two GEMMs summed, in the order torch's own LSTM cell adds them (closest float results).
    gates = F.linear(x, w_ih, b_ih) + F.linear(h_in, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _fused(w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
           weight_quantizer: TensorQuantizer) -> _Weights:
    """W_ih and W_hh quantized as one tensor (one amax), split back."""
    w_ih_q, w_hh_q = weight_quantizer(torch.cat([w_ih, w_hh], 1)).split([w_ih.shape[1], w_hh.shape[1]], 1)
    return w_ih_q, w_hh_q, b_ih, b_hh


class QuantLSTMCell(QuantMixin, nn.LSTMCell):
    """nn.LSTMCell with fused input+hidden and fused weight quantizers (biases stay float)."""

    _float_type = nn.LSTMCell
    default_quant_desc_weight = QUANT_DESC_8BIT_PER_TENSOR

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, **kwargs):
        desc_in = kwargs.pop("quant_desc_input", None)
        desc_w = kwargs.pop("quant_desc_weight", None)
        if kwargs:
            raise TypeError(f"Unused keys: {sorted(kwargs)}; QuantLSTMCell takes input_size, hidden_size, bias, "
                            "quant_desc_input, quant_desc_weight")
        nn.LSTMCell.__init__(self, input_size, hidden_size, bias=bias)
        self.init_quantizer(desc_in, desc_w)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros)
        h, c = hx
        if not batched:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
        weights = _fused(self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.weight_quantizer)
        h, c = _lstm_step(input, h, c, weights, self.input_quantizer)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class QuantLSTM(nn.LSTM):
    """nn.LSTM whose every layer and direction quantizes its fused input+hidden and fused weights."""

    default_quant_desc_input: QuantDescriptor = QUANT_DESC_8BIT_PER_TENSOR
    default_quant_desc_weight: QuantDescriptor = QUANT_DESC_8BIT_PER_TENSOR

    def __init__(self, *args, **kwargs):
        desc_in = _pick_desc(kwargs.pop("quant_desc_input", None), self.default_quant_desc_input, "input", self)
        desc_w = _pick_desc(kwargs.pop("quant_desc_weight", None), self.default_quant_desc_weight, "weight", self)
        super().__init__(*args, **kwargs)
        if self.proj_size:
            raise ValueError(f"QuantLSTM does not support proj_size={self.proj_size}; use proj_size=0")
        n = self.num_layers * (2 if self.bidirectional else 1)
        self._input_quantizers = nn.ModuleList(TensorQuantizer(desc_in) for _ in range(n))
        self._weight_quantizers = nn.ModuleList(TensorQuantizer(desc_w) for _ in range(n))

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        cls.default_quant_desc_input = _pick_desc(value, value, "input", cls)

    @classmethod
    def set_default_quant_desc_weight(cls, value: QuantDescriptor) -> None:
        cls.default_quant_desc_weight = _pick_desc(value, value, "weight", cls)

    @property
    def input_quantizers(self) -> nn.ModuleList:
        return self._input_quantizers

    @property
    def weight_quantizers(self) -> nn.ModuleList:
        return self._weight_quantizers

    def _weights(self, layer: int, reverse: bool) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        sfx = f"_l{layer}{'_reverse' if reverse else ''}"
        return (getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx),
                getattr(self, "bias_ih" + sfx, None) if self.bias else None,
                getattr(self, "bias_hh" + sfx, None) if self.bias else None)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):  # type: ignore[override]
        if isinstance(input, PackedSequence):
            raise ValueError("QuantLSTM does not take PackedSequence inputs; pad the batch (pad_packed_sequence) first")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        dirs = 2 if self.bidirectional else 1
        steps, batch = input.shape[0], input.shape[1]
        if hx is None:
            zeros = input.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
            hx = (zeros, zeros)
        h0, c0 = hx
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        layer_in = input
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                idx = layer * dirs + d
                weights = _fused(*self._weights(layer, d == 1), self._weight_quantizers[idx])
                h, c = h0[idx], c0[idx]
                ys: List[Optional[Tensor]] = [None] * steps
                for t in (range(steps - 1, -1, -1) if d else range(steps)):
                    h, c = _lstm_step(layer_in[t], h, c, weights, self._input_quantizers[idx])
                    ys[t] = h
                outs.append(torch.stack(ys))  # type: ignore[arg-type]
                h_n.append(h)
                c_n.append(c)
            layer_in = torch.cat(outs, 2) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, True)
        out, hn, cn = layer_in, torch.stack(h_n), torch.stack(c_n)
        if not batched:
            return out.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (hn, cn)


class QuantRNN(QuantLSTM):
    """pytorch-quantization's ``QuantRNN(mode, ...)``: only ``mode='LSTM'`` is quantized, as in the original."""

    def __init__(self, mode: str, *args, **kwargs):
        if mode != "LSTM":
            raise ValueError(f"QuantRNN mode={mode!r} is not supported; only 'LSTM' has a quantized implementation")
        super().__init__(*args, **kwargs)


LSTM, LSTMCell = QuantLSTM, QuantLSTMCell
