"""Threshold-free ranking metrics for binary anomaly scores: AUROC, average precision, max F1, ROC curve.

All functions take `scores` (higher = more anomalous) and `labels` (1/True = anomalous, 0/False = normal)
as numpy arrays or torch tensors of any matching shape; both are flattened. Every metric is exact over
all thresholds: the scores are sorted once (descending) and the confusion counts are taken only at the
last index of each run of equal scores, so tied scores are always decided together (as in sklearn).

Both classes must be present; otherwise the metrics are undefined and `ValueError` is raised.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["auroc", "average_precision", "both_classes", "f1_max", "f1_max_threshold", "roc_curve", "thin_curve"]


def both_classes(labels: Any) -> bool:
    """True when `labels` (any shape, bool / 0-1, numpy or torch) holds both classes: the ranking metrics and
    curves are defined."""
    y = to_numpy(labels)
    return 0 < int(y.sum()) < y.size


def to_numpy(x: Any) -> np.ndarray:
    """Return `x` (numpy array, torch tensor, or sequence) as a numpy array, copying only if needed."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def as_scores(x: Any) -> np.ndarray:
    """Scores as a flat float array: float32/float64 input is kept as is, anything else becomes float64."""
    s = to_numpy(x).reshape(-1)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def as_labels(x: Any, name: str = "labels") -> np.ndarray:
    """Labels as a flat bool array; only 0/1 or bool values are accepted."""
    y = to_numpy(x).reshape(-1)
    if y.dtype != np.bool_:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{name} must be binary (0/1 or bool)")
        y = y != 0
    return y


def sort_desc(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort a flat float array in descending order; return (sorted values, permutation indices)."""
    if not (scores.flags.c_contiguous and scores.flags.writeable):
        scores = scores.copy()  # torch.from_numpy needs a writable contiguous buffer
    values, order = torch.sort(torch.from_numpy(scores), descending=True)
    return values.numpy(), order.numpy()


def run_ends(sorted_values: np.ndarray) -> np.ndarray:
    """Indices of the last element of each run of equal values in a sorted array (int64, ascending)."""
    ends = np.flatnonzero(sorted_values[1:] != sorted_values[:-1])
    return np.append(ends, sorted_values.size - 1)


def _counts(scores: Any, labels: Any, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Confusion counts at each distinct threshold, thresholds descending.

    Returns (tps, fps, thresholds, n_pos, n_neg): at threshold `thresholds[i]` (predict anomalous when
    score >= threshold) there are `tps[i]` true and `fps[i]` false positives (int64).
    """
    s = as_scores(scores)
    y = as_labels(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        which = "anomalous (1)" if n_pos == 0 else "normal (0)"
        raise ValueError(f"{metric} is undefined: labels contain no {which} samples, only one class")
    s, order = sort_desc(s)
    y = y[order]
    del order
    ends = run_ends(s)
    thresholds = s[ends]
    del s
    tps = np.cumsum(y, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return tps, fps, thresholds, n_pos, n_neg


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (true vs false positive rate), ties counted as half, as sklearn's.

    scores, labels: any matching shape (flattened). Computed exactly with integer arithmetic.
    """
    tps, fps, _, n_pos, n_neg = _counts(scores, labels, "AUROC")
    dfp = np.diff(fps, prepend=0)
    tsum = tps.copy()
    tsum[1:] += tps[:-1]
    area2 = int(np.dot(dfp, tsum))  # = 2 * sum of trapezoids in count units
    return area2 / (2.0 * n_pos * n_neg)


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision: sum over thresholds of (R_i - R_{i-1}) * P_i, no interpolation (as sklearn's).

    scores, labels: any matching shape (flattened).
    """
    tps, fps, _, n_pos, _ = _counts(scores, labels, "Average precision")
    dtp = np.diff(tps, prepend=0)
    return float(np.dot(dtp, tps / (tps + fps)) / n_pos)


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """(best F1, threshold): the maximum over all thresholds of F1 = 2TP / (2TP + FP + FN).

    Predicting anomalous when score >= threshold achieves the F1. Among equal F1 values the highest cut is
    taken. The threshold is not a score but the midpoint (in float64) between the lowest score on the
    anomalous side of the cut and the highest score below it, so it lies strictly between the two: a
    sample's score recomputed with float noise smaller than half that gap (another backend, another CPU's
    kernels) is decided the same way. When every sample is on the anomalous side, the threshold lies below
    the lowest score by half the gap above it (by 0.5 when all scores are equal). scores, labels: any shape.
    """
    tps, fps, thresholds, n_pos, _ = _counts(scores, labels, "F1")
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))
    cut = float(thresholds[best])
    if best + 1 < thresholds.size:
        below = float(thresholds[best + 1])
    elif best > 0:
        below = cut - (float(thresholds[best - 1]) - cut)
    else:
        below = cut - 1.0
    return float(f1[best]), (cut + below) / 2.0


def f1_max(scores: Any, labels: Any) -> float:
    """Maximum F1 score over all thresholds (see `f1_max_threshold`)."""
    return f1_max_threshold(scores, labels)[0]


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int | None) -> np.ndarray:
    """Indices of at most `max_points` points spread evenly along a monotone curve (x, y), endpoints kept.

    Points are picked at equal steps of L1 arc length (x + y - x[0] - y[0]), so steep and flat parts
    keep the same resolution. `max_points=None` keeps every point.
    """
    n = x.size
    if max_points is None or n <= max_points:
        return np.arange(n)
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    arc = (x - x[0]) + (y - y[0])
    levels = np.linspace(0.0, arc[-1], max_points - 1)
    idx = np.searchsorted(arc, levels, side="left")
    return np.unique(np.concatenate([idx.clip(0, n - 1), [0, n - 1]]))


def roc_curve(scores: Any, labels: Any, max_points: int | None = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: (fpr, tpr, thresholds), float64 arrays from (0, 0) to (1, 1).

    Point i uses "anomalous when score >= thresholds[i]"; the first point has threshold +inf.
    The curve is thinned to at most `max_points` points (None: all distinct thresholds).
    """
    tps, fps, thr, n_pos, n_neg = _counts(scores, labels, "ROC curve")
    fpr = np.concatenate([[0.0], fps / n_neg])
    tpr = np.concatenate([[0.0], tps / n_pos])
    thr = np.concatenate([[np.inf], thr.astype(np.float64)])
    keep = thin_curve(fpr, tpr, max_points)
    return fpr[keep], tpr[keep], thr[keep]
