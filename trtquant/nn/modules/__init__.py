"""pytorch-quantization's module paths (``nn.modules.tensor_quantizer``, ``quant_conv`` ...).

Each submodule re-exports the trtquant classes under the path users of pytorch-quantization import
them from; the implementations live in :mod:`trtquant.quantizer` and :mod:`trtquant.nn`.
"""
