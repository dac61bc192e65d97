"""Evaluation metrics: DAVIS J and F (functional, vectorised) and the J&F torchmetrics Metric."""

from .davis import (
    BOUNDARY_TOLERANCE,
    boundary_f,
    boundary_map,
    boundary_precision_recall,
    boundary_tolerance,
    dilate_disk,
    mask_iou,
)
from .jandf import JAndF

__all__ = [
    "BOUNDARY_TOLERANCE",
    "JAndF",
    "boundary_f",
    "boundary_map",
    "boundary_precision_recall",
    "boundary_tolerance",
    "dilate_disk",
    "mask_iou",
]
