"""``nn.modules.quant_rnn``: :mod:`trtquant.nn.rnn` under its old path."""

from ..rnn import LSTM, LSTMCell, QuantLSTM, QuantLSTMCell, QuantRNN

__all__ = ["QuantLSTM", "QuantLSTMCell", "QuantRNN", "LSTM", "LSTMCell"]
