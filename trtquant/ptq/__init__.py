"""Advanced post-training quantization steps, composable around :func:`trtquant.calibrate`.

Before calibration (they change weights and activation ranges):

* :func:`equalize` - cross-layer equalization + high-bias absorption (Nagel et al. 2019), float model.
* :func:`smooth_quant` - SmoothQuant activation smoothing for Linear layers (Xiao et al. 2022).

After calibration (they need the quantized model's amax):

* :func:`bias_correction` - empirical bias correction (Nagel et al. 2019).
* :func:`adaround` - learned weight rounding, layer by layer (Nagel et al. 2020).
* :func:`clip_weight_amax` - MSE-optimal weight amax per row or INT4 block (AWQ's clip search, data-free).

Each step only edits weights, biases or (SmoothQuant's Mul path) an input quantizer's
``pre_quant_scale``: the exported TensorRT Q/DQ graph keeps its shape and needs no custom op.
See docs/ptq.md.
"""

from .adaround import LayerResult, adaround
from .bias_correction import bias_correction
from .clip_search import clip_weight_amax
from .equalize import equalize, fold_batchnorm_
from .smooth_quant import smooth_quant

__all__ = ["adaround", "bias_correction", "clip_weight_amax", "equalize", "fold_batchnorm_", "smooth_quant", "LayerResult"]
