"""Evaluation metrics for anomaly detection (image level) and segmentation (pixel level).

- `auroc`, `average_precision`, `f1_max`, `f1_max_threshold`, `roc_curve`: ranking metrics on flat
  scores/labels (any shape, numpy or torch), exact over all thresholds with ties grouped.
- `aupro`, `pro_curve`: per-region overlap vs FPR on (N, H, W) maps and masks (MVTec AD convention).
"""

from mpad.metrics.aupro import aupro, pro_curve
from mpad.metrics.ranking import auroc, average_precision, both_classes, f1_max, f1_max_threshold, roc_curve

__all__ = [
    "auroc",
    "aupro",
    "average_precision",
    "both_classes",
    "f1_max",
    "f1_max_threshold",
    "pro_curve",
    "roc_curve",
]
