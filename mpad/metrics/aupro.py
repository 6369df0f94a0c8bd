"""Per-region overlap (PRO) curve and its normalised area up to a false positive rate limit (AUPRO).

Definitions (MVTec AD convention), for maps (N, H, W) of float anomaly scores and masks (N, H, W)
(nonzero = anomalous):

- regions: the connected components (8-connectivity) of each image's ground-truth mask;
- FPR(t): fraction of all normal pixels (mask == 0, over all images) with score >= t;
- PRO(t): mean over all regions of the fraction of the region's pixels with score >= t;
- AUPRO: area under PRO vs FPR from FPR 0 to `fpr_limit`, divided by `fpr_limit` (a value in [0, 1]).

The curve is exact over every threshold: pixels are sorted once by score (descending), FPR is a cumulative
count of normal pixels and PRO a cumulative sum of per-pixel weights 1 / (|region| * n_regions); tied
scores are grouped (the curve is taken only after each run of equal scores). The area uses the trapezoid
rule, starting at (0, 0), with linear interpolation at exactly `fpr_limit`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.measure import label as cc_label

from mpad.metrics.ranking import as_scores, run_ends, sort_desc, thin_curve, to_numpy

__all__ = ["aupro", "pro_curve", "region_labels"]


def _as_stack(x: Any, name: str) -> np.ndarray:
    """(N, H, W) view of a map/mask stack given as (H, W), (N, H, W) or (N, 1, H, W)."""
    a = to_numpy(x)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {tuple(a.shape)}")
    return a


def region_labels(masks: Any) -> tuple[np.ndarray, int]:
    """Label ground-truth regions: (labels int32 (N, H, W), n_regions).

    Label 0 is normal; regions (8-connected components of each image's mask) get ids 1..n_regions,
    unique across images.
    """
    m = _as_stack(masks, "masks")
    out = np.zeros(m.shape, dtype=np.int32)
    n = 0
    for i in range(m.shape[0]):
        lab, k = cc_label(m[i] != 0, connectivity=2, return_num=True)
        if k:
            np.add(lab, n, out=out[i], where=lab > 0, casting="unsafe")
            n += k
    return out, n


def _pro_points(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """Full exact PRO curve (fpr, pro), float64, starting at (0, 0) and ending at (1, 1)."""
    m = _as_stack(maps, "maps")
    regions, n_regions = region_labels(masks)
    if m.shape != regions.shape:
        raise ValueError(f"maps and masks differ in shape: {tuple(m.shape)} vs {regions.shape}")
    if n_regions == 0:
        raise ValueError("AUPRO is undefined: the masks contain no anomalous region (all pixels normal)")
    sizes = np.bincount(regions.reshape(-1), minlength=n_regions + 1)
    n_normal = int(sizes[0])
    if n_normal == 0:
        raise ValueError("AUPRO is undefined: the masks contain no normal pixel (FPR has no denominator)")
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (sizes[1:] * float(n_regions))

    s, order = sort_desc(as_scores(m))
    lab = regions.reshape(-1)[order]
    del order, regions
    ends = run_ends(s)
    del s
    fpr = np.cumsum(lab == 0, dtype=np.int64)[ends] / n_normal
    w = weight[lab]
    del lab
    np.cumsum(w, out=w)
    pro = np.minimum(w[ends], 1.0)  # the last value is 1 up to rounding
    del w
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    pro[-1] = 1.0
    return fpr, pro


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under a curve with nondecreasing x from x[0] to `x_max`, interpolating y at x_max."""
    i = int(np.searchsorted(x, x_max, side="right"))  # points x[:i] are <= x_max
    xs, ys = x[:i], y[:i]
    if i < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (value in [0, 1]).

    maps: float scores (N, H, W) (or (H, W), (N, 1, H, W)); masks: same shape, nonzero = anomalous.
    Raises ValueError if there is no anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = _pro_points(maps, masks)
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit


def pro_curve(maps: Any, masks: Any, max_points: int | None = 1000) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve (fpr, pro), float64 arrays from (0, 0) to (1, 1), nondecreasing in both.

    Exact over all thresholds, then thinned to at most `max_points` points (None: keep all).
    """
    fpr, pro = _pro_points(maps, masks)
    keep = thin_curve(fpr, pro, max_points)
    return fpr[keep], pro[keep]
