"""pytorch-quantization's ``quant_nn`` face: quantized layers and TensorQuantizer."""

from ..quantizer import TensorQuantizer
from .base import QuantInputMixin, QuantMixin
from .conv import (
    QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d,
    Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
)
from .attention import QuantMultiheadAttention
from .linear import Linear, QuantLinear
from .pool import (
    QuantAdaptiveAvgPool1d, QuantAdaptiveAvgPool2d, QuantAdaptiveAvgPool3d,
    QuantAvgPool1d, QuantAvgPool2d, QuantAvgPool3d, QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d,
    AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d, AvgPool1d, AvgPool2d, AvgPool3d,
    MaxPool1d, MaxPool2d, MaxPool3d,
)
from .registry import QUANT_MODULE_MAP, register, unregister
from ..functional import Clip
from .norm import QuantInstanceNorm1d, QuantInstanceNorm2d, QuantInstanceNorm3d
from .rnn import LSTM, LSTMCell, QuantLSTM, QuantLSTMCell, QuantRNN
from . import functional, modules

__all__ = [
    "TensorQuantizer", "QuantMixin", "QuantInputMixin",
    "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantConvTranspose1d", "QuantConvTranspose2d",
    "QuantConvTranspose3d", "QuantLinear", "QuantMultiheadAttention",
    "QuantMaxPool1d", "QuantMaxPool2d", "QuantMaxPool3d", "QuantAvgPool1d", "QuantAvgPool2d", "QuantAvgPool3d",
    "QuantAdaptiveAvgPool1d", "QuantAdaptiveAvgPool2d", "QuantAdaptiveAvgPool3d",
    "QUANT_MODULE_MAP", "register", "unregister",
    "Clip", "QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d",
    "QuantLSTM", "QuantLSTMCell", "QuantRNN",
]
