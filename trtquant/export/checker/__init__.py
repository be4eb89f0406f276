"""Static TensorRT explicit-quantization checks for any Q/DQ ONNX model.

``check_onnx`` implements the static part (rules 1-26) of the validator checklist in
``shared/reference/tensorrt.md``: model-level rules (A1-A5), per-Q/DQ rules (B6-B16) and
placement/fusion rules (C17-C26). Numerics (D27-D29) and artifacts (E30-E31) need onnxruntime or a
GPU and live elsewhere.

Each rule is one function in a ``rules_*`` module, registered with ``@rule(<the ids it emits>)``
in :data:`RULES` (checklist order); it receives a :class:`Ctx` (graph index, target, every Q/DQ
node parsed once) and yields :class:`Finding` s. A new rule is one such function beside its
siblings plus one broken model in ``tests/unit/test_checker.py``. Rule ids are
``<checklist number>-<slug>`` and stable, e.g. ``B8-zero-point``; ``A0-no-qdq`` is the one id
outside the checklist (a model without any Q/DQ node). :data:`RULE_IDS` lists every declared id,
:data:`VALIDATION_IDS` the A1 ids of loading and validation.

Nothing is assumed about node names or the exporter: scales, zero points and weights may be
initializers, ``Constant`` nodes, or constants seen through Identity/Cast/Transpose/Reshape/
Unsqueeze/Squeeze/Flatten; unnamed nodes are reported as ``<op_type>#<index>``.

Rule ids (E error, W warning, I info):
    A0-no-qdq I | A1-load, A1-onnx-checker, A1-shape-inference, A1-unknown-rank E, A1-too-large I |
    A2-opset E | A3-qoperator E | A4-trt-domain I | A5-fp32-graph W (strongly typed) / I (unknown) |
    B6-dtype E | B7-scale E/W | B8-zero-point E | B9-scale-rank E/W | B10-per-channel-activation E |
    B11-axis E | B12-channel-axis E (W: grouped ConvTranspose) | B13-scalar E | B14-int4 E |
    B15-qdq-pairing W | B16-double-qdq W | C17-partial-quant W | C18-output-qdq W | C19-conv-act-qdq W |
    C20-residual-add W | C21-concat W | C22-redundant-qdq, C22-fusible, C22-float-island I |
    C23-small-channel-conv W | C24-gemv W | C25-quantized-bias W (E: int32) | C26-dla E/I (target dla) |
    C27-attention-fusable I, C27-attention-float W, C27-attention-scale W (TensorRT's fused attention)
A rule that crashes on an odd graph is reported as ``internal-error`` W instead of stopping the check.
"""

from .context import QDQ, RULE_IDS, RULES, Ctx, rule, rule_ids
from .report import FUSION_RULE_PREFIXES, CheckReport, Finding, Severity, Target
from .rules_model import MAX_OPSET
from .run import VALIDATION_IDS, check_onnx

__all__ = ["CheckReport", "Ctx", "FUSION_RULE_PREFIXES", "Finding", "MAX_OPSET", "QDQ", "RULES", "RULE_IDS",
           "Severity", "Target", "VALIDATION_IDS", "check_onnx", "rule", "rule_ids"]
