"""The exportable core of torchvision detectors: backbone + FPN + heads, ending at raw head outputs.

A torchvision detector's ``forward(images)`` also resizes and normalizes the images
(``GeneralizedRCNNTransform``), generates anchors, decodes boxes, runs NMS and (Faster R-CNN)
pools RoIs - Python control flow and data-dependent shapes that TensorRT should not see as one
graph. :func:`detection_core` returns a module holding the same (quantized) submodules whose
forward takes the already transformed image batch and returns the raw head outputs as a tuple of
tensors; :func:`detection_roi_head` does the same for Faster R-CNN's second stage. Box decoding and
NMS then run in TensorRT (EfficientNMS_TRT plugin or the built-in NMS layer) or in Python.

The modules share parameters and quantizers with the detector, so calibrate the whole detector
(``trtquant.calibrate(model, batches_of_image_lists)``) and export the core.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["DetectionCore", "detection_core", "detection_roi_head", "prepare_images"]

_SUPPORTED = "RetinaNet, FCOS, SSD/SSDlite and GeneralizedRCNN (Faster/Mask/Keypoint R-CNN)"


def _torchvision_detection():
    try:
        from torchvision.models import detection
    except ImportError as e:  # pragma: no cover - torchvision is a test dependency
        raise ImportError("detection_core needs torchvision (pip install torchvision)") from e
    return detection


class DetectionCore(nn.Module):
    """Base of the exported cores: ``forward(images) -> tuple`` named by :attr:`output_names`.

    ``images`` is the (N, 3, H, W) batch the detector's ``GeneralizedRCNNTransform`` produces:
    resized, normalized with the model's mean/std and padded to a multiple of its
    ``size_divisible`` (32). That transform stays in Python (see :func:`prepare_images`).
    """

    output_names: List[str]

    def named_outputs(self, images: Tensor) -> Dict[str, Tensor]:
        """The forward's outputs by name (for tests and for decoding in Python)."""
        return dict(zip(self.output_names, self(images)))


class DenseHeadCore(DetectionCore):
    """RetinaNet / FCOS: backbone+FPN -> classification and regression heads (+ FCOS centerness).

    Outputs use the head's own layout, (N, H*W*A, K) and (N, H*W*A, 4) - the tensors torchvision's
    ``postprocess_detections`` decodes. ``per_level=False`` gives them concatenated over the FPN
    levels (the layout box decoding and EfficientNMS_TRT take); ``per_level=True`` one tensor per
    level, whose concatenation along dim 1 is the former.
    """

    def __init__(self, model: nn.Module, per_level: bool, fcos: bool):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.per_level = per_level
        self.fcos = fcos
        kinds = ["cls_logits", "bbox_regression"] + (["bbox_ctrness"] if fcos else [])
        if per_level:
            levels = len(model.anchor_generator.sizes)
            self.output_names = [f"{k}_{i}" for i in range(levels) for k in kinds]
        else:
            self.output_names = kinds
        self._kinds = kinds

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        features = list(self.backbone(images).values())
        if not self.per_level:
            out = self.head(features)
            return tuple(out[k] for k in self._kinds)
        outputs: List[Tensor] = []
        for f in features:
            # The heads loop over the list they get: a one-level list gives that level's output.
            cls = self.head.classification_head([f])
            reg = self.head.regression_head([f])
            outputs.append(cls)
            outputs.extend(reg if self.fcos else (reg,))
        return tuple(outputs)


class SSDCore(DetectionCore):
    """SSD / SSDlite: backbone -> scoring heads, concatenated over feature maps as torchvision does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.output_names = ["cls_logits", "bbox_regression"]

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        out = self.head(list(self.backbone(images).values()))
        return out["cls_logits"], out["bbox_regression"]


class RPNCore(DetectionCore):
    """Faster R-CNN's first stage: FPN features (the RoI pooler's input) and, per level, the RPN's
    objectness (N, A, H, W) and box deltas (N, 4A, H, W). Proposal selection stays outside."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        levels = len(model.rpn.anchor_generator.sizes)
        self.output_names = ([f"features_{i}" for i in range(levels)] + [f"rpn_objectness_{i}" for i in range(levels)]
                             + [f"rpn_bbox_deltas_{i}" for i in range(levels)])

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        features = list(self.backbone(images).values())
        objectness, deltas = self.rpn_head(features)
        return tuple(features) + tuple(objectness) + tuple(deltas)


class RoIBoxHead(DetectionCore):
    """Faster R-CNN's second stage on pooled RoI features (R, C, P, P): class logits (R, K) and
    per-class box deltas (R, 4K). RoI pooling (MultiScaleRoIAlign) stays outside."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor
        self.output_names = ["class_logits", "box_regression"]

    def forward(self, roi_features: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self.box_predictor(self.box_head(roi_features)))


def detection_core(model: nn.Module, per_level: bool = False) -> DetectionCore:
    """The exportable part of a torchvision detector: ``forward(images) -> tuple of raw head outputs``.

    Args:
        model: a (quantized, calibrated) torchvision RetinaNet, FCOS, SSD/SSDlite or
            GeneralizedRCNN (Faster/Mask/Keypoint R-CNN). The core shares its modules.
        per_level: RetinaNet/FCOS only: one output per FPN level instead of the concatenation.

    Returns:
        A :class:`DetectionCore` whose ``output_names`` name the outputs (pass them to
        ``export_onnx(..., output_names=core.output_names)``):

        * RetinaNet: ``cls_logits`` (N, boxes, K), ``bbox_regression`` (N, boxes, 4);
        * FCOS: the same plus ``bbox_ctrness`` (N, boxes, 1);
        * SSD/SSDlite: ``cls_logits``, ``bbox_regression``;
        * Faster R-CNN: ``features_i`` (the FPN levels), ``rpn_objectness_i``, ``rpn_bbox_deltas_i``;
          the RoI box head is :func:`detection_roi_head`.

    The input is the already transformed batch - resized, normalized, padded to a multiple of 32:
    ``GeneralizedRCNNTransform`` stays in Python (:func:`prepare_images`), and so do anchors, box
    decoding, NMS and RoI pooling.
    """
    det = _torchvision_detection()
    if isinstance(model, (det.RetinaNet, det.FCOS)):
        return DenseHeadCore(model, per_level, fcos=isinstance(model, det.FCOS)).train(model.training)
    if per_level:
        raise ValueError(f"per_level=True is for RetinaNet and FCOS; {type(model).__name__}'s outputs are fixed")
    if isinstance(model, det.ssd.SSD):
        return SSDCore(model).train(model.training)
    if isinstance(model, det.generalized_rcnn.GeneralizedRCNN):
        return RPNCore(model).train(model.training)
    raise TypeError(
        f"detection_core supports {_SUPPORTED}, got {type(model).__name__}; for another detector export "
        "its backbone and heads as a module of your own that returns their raw outputs"
    )


def detection_roi_head(model: nn.Module) -> DetectionCore:
    """Faster R-CNN's RoI box head as a module of its own: ``forward(roi_features) -> (class_logits,
    box_regression)``, ``roi_features`` being MultiScaleRoIAlign's (R, C, 7, 7) output."""
    det = _torchvision_detection()
    if not isinstance(model, det.generalized_rcnn.GeneralizedRCNN):
        raise TypeError(f"detection_roi_head needs a GeneralizedRCNN (Faster/Mask R-CNN), got {type(model).__name__}")
    return RoIBoxHead(model).train(model.training)


def prepare_images(model: nn.Module, images: Sequence[Tensor]) -> Tensor:
    """The batch the core takes: ``images`` ([C, H, W], 0..1) through the detector's own transform."""
    transform = getattr(model, "transform", None)
    if transform is None:
        raise TypeError(f"{type(model).__name__} has no GeneralizedRCNNTransform 'transform'; normalize the images yourself")
    with torch.no_grad():
        return transform(list(images))[0].tensors
