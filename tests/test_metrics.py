"""Tests for mpad.metrics: ranking metrics against sklearn, AUPRO against hand-computed values and a
slow per-threshold reference implementation.

Tolerances: float64 arithmetic on a few thousand terms at most (rounding <= n 2^-53 ~ 1e-12 of values <= 1) where
1e-12 or 1e-9 is asserted; 1e-6 where one side converts scores to float32 (ties and thresholds are the same, the
areas add float32 values). Not CPU-kernel dependent: no BLAS reduction of torch's is involved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.measure import label as cc_label
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from mpad.metrics import aupro, auroc, average_precision, f1_max, f1_max_threshold, pro_curve, roc_curve

# ---------------------------------------------------------------- ranking metrics


def _tied_data(seed: int, n: int = 2000, pos_rate: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < pos_rate
    s = (rng.random(n) + 0.3 * y).round(2)  # many ties, overlapping classes
    return s, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_ap_match_sklearn_with_ties(seed: int) -> None:
    s, y = _tied_data(seed)
    assert len(np.unique(s)) < len(s) / 5
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-6)


def test_auroc_ap_match_sklearn_continuous_and_2d() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random((20, 30)) < 0.1).astype(np.int64)
    s = rng.normal(size=(20, 30)).astype(np.float32) + y
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-6)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y.ravel(), s.ravel()), abs=1e-6)


def test_perfect_and_inverted_separation() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert auroc(s, y) == 1.0
    assert average_precision(s, y) == 1.0
    assert f1_max(s, y) == 1.0
    assert auroc(-s, y) == 0.0
    assert average_precision(-s, y) == pytest.approx(average_precision_score(y, -s), abs=1e-12)
    assert auroc(np.ones(5), y) == 0.5  # all tied


def test_torch_input() -> None:
    s, y = _tied_data(7)
    st, yt = torch.from_numpy(s).float(), torch.from_numpy(y)
    assert auroc(st, yt) == pytest.approx(roc_auc_score(y, s.astype(np.float32)), abs=1e-6)
    assert average_precision(st, yt.long()) == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert f1_max(st, yt) == pytest.approx(f1_max(s, y), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_f1_max_brute_force(seed: int) -> None:
    s, y = _tied_data(seed, n=300)
    s = (s * 10).round() / 10  # few distinct thresholds
    brute = max(f1_score(y, s >= t) for t in np.unique(s))
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        via_pr = np.nanmax(2 * p * r / (p + r))
    best, thr = f1_max_threshold(s, y)
    assert best == pytest.approx(brute, abs=1e-12)
    assert best == pytest.approx(via_pr, abs=1e-12)
    assert f1_score(y, s >= thr) == pytest.approx(best, abs=1e-12)
    assert f1_max(s, y) == best
    above, below = s[s >= thr].min(), s[s < thr].max()  # the cut lies strictly between two scores, midway
    assert below < thr < above and thr == (above + below) / 2


def test_f1_max_threshold_is_a_midpoint_not_a_score() -> None:
    # float32 scores one ulp apart around the cut: the threshold still separates them, in float64
    cut = np.float32(0.101286381483078)
    below = np.nextafter(cut, np.float32(0))
    s = np.array([0.05, below, cut, 0.3], dtype=np.float32)
    best, thr = f1_max_threshold(s, np.array([0, 0, 1, 1]))
    assert best == 1.0 and float(below) < thr < float(cut)
    # every sample anomalous: below the lowest score by half the gap above it; all equal: 0.5 below
    assert f1_max_threshold(np.array([0.2, 0.6, 0.9]), np.array([1, 1, 0])) == (0.8, pytest.approx(0.0))
    assert f1_max_threshold(np.array([0.4, 0.4]), np.array([1, 0])) == (pytest.approx(2 / 3), pytest.approx(-0.1))


def test_single_class_and_bad_labels_raise() -> None:
    s = np.array([0.1, 0.5, 0.9])
    for fn in (auroc, average_precision, f1_max, roc_curve):
        with pytest.raises(ValueError, match="only one class"):
            fn(s, np.zeros(3))
        with pytest.raises(ValueError, match="only one class"):
            fn(s, np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="binary"):
        auroc(s, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="size"):
        auroc(s, np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))


def test_roc_curve_matches_sklearn_and_thins() -> None:
    s, y = _tied_data(11, n=500)
    fpr, tpr, thr = roc_curve(s, y, max_points=None)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf

    rng = np.random.default_rng(0)
    y = rng.random(20000) < 0.5
    s = rng.random(20000) + 0.5 * y
    fpr, tpr, thr = roc_curve(s, y, max_points=100)
    assert 50 <= len(fpr) <= 100
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(s, y), abs=5e-3)


# ---------------------------------------------------------------- AUPRO


def _two_regions() -> np.ndarray:
    """Two images 8x8: a 2x2 region in image 0 and a 3x3 region in image 1."""
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 4:7, 4:7] = True
    return masks


def test_aupro_perfect_and_inverted() -> None:
    masks = _two_regions()
    assert aupro(masks.astype(np.float32), masks) == 1.0
    assert aupro(-masks.astype(np.float32), masks) == 0.0
    assert aupro(masks.astype(np.float32), masks.astype(np.uint8) * 255) == 1.0  # 0/255 masks


def test_aupro_one_region_found_one_missed() -> None:
    masks = _two_regions()
    maps = np.full(masks.shape, 0.5, dtype=np.float32)
    maps[0][masks[0]] = 1.0  # the small region above all normal pixels
    maps[1][masks[1]] = 0.0  # the large one below
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)  # PRO is 0.5 from FPR 0 to 1


def test_aupro_constant_map_ties_grouped() -> None:
    masks = _two_regions()
    # all ties: the curve jumps from (0, 0) to (1, 1); area to 0.3 is 0.045, normalised 0.15
    assert aupro(np.zeros(masks.shape), masks) == pytest.approx(0.15, abs=1e-12)
    assert aupro(np.zeros(masks.shape), masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_hand_computed_with_interpolation() -> None:
    # one image 3x4: a 2-pixel region, 10 normal pixels
    masks = np.zeros((1, 3, 4), dtype=int)
    masks[0, 0, 0:2] = 1
    maps = np.full((1, 3, 4), 0.1)
    maps[0, 0, 0] = 0.8  # region pixel a
    maps[0, 0, 1] = 0.7  # region pixel b, tied with two normal pixels
    maps[0, 1, 0:2] = 0.9  # two normal pixels above everything
    maps[0, 2, 0:2] = 0.7
    # curve: (0,0) -> (0.2,0) -> (0.2,0.5) -> (0.4,1.0) -> (1,1); PRO at FPR 0.3 is 0.75
    # area to 0.3 = 0.1 * (0.5 + 0.75) / 2 = 0.0625
    assert aupro(maps, masks) == pytest.approx(0.0625 / 0.3, abs=1e-12)
    # to 0.2: only the zero segment
    assert aupro(maps, masks, fpr_limit=0.2) == pytest.approx(0.0, abs=1e-12)
    # to 0.5: 0.0625 + 0.1 * (0.75 + 1) / 2 + 0.1 * 1
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx((0.0625 + 0.0875 + 0.1) / 0.5, abs=1e-12)


def test_aupro_regions_8_connected_and_per_image() -> None:
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal pair: one region with 8-connectivity
    masks[0, 4:6, 4:6] = True
    masks[1, 0:2, 0:2] = True  # same place as image 0's pair, but another image: its own region
    maps = np.full(masks.shape, 0.5)
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0  # the diagonal region above all normal pixels
    maps[0, 4:6, 4:6] = 0.0
    maps[1, 0:2, 0:2] = 0.0
    # 3 regions, one found: PRO 1/3 (it would be 2/4 with 4-connectivity)
    assert aupro(maps, masks) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_errors_and_torch() -> None:
    masks = _two_regions()
    with pytest.raises(ValueError, match="no anomalous region"):
        aupro(np.zeros(masks.shape), np.zeros(masks.shape))
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(np.zeros(masks.shape), np.ones(masks.shape))
    with pytest.raises(ValueError, match="shape"):
        aupro(np.zeros((2, 8, 7)), masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros(masks.shape), masks, fpr_limit=0.0)
    maps = torch.from_numpy(masks).float().unsqueeze(1) * 0.5  # (N, 1, H, W) tensor
    assert aupro(maps, torch.from_numpy(masks)) == 1.0


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Slow reference: loop over all distinct thresholds, then integrate segment by segment."""
    normal = maps[~masks]
    region_scores = []
    for i, m in enumerate(masks):
        lab = cc_label(m, connectivity=2)
        region_scores += [maps[i][lab == k] for k in range(1, lab.max() + 1)]
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = float(np.mean(normal >= t))
        pro = float(np.mean([np.mean(r >= t) for r in region_scores]))
        pts.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, h, w = 3, 24, 24
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):  # 1-3 rectangles per image, some may touch
            y0, x0 = rng.integers(0, h - 4, size=2)
            dy, dx = rng.integers(1, 7, size=2)
            masks[i, y0 : y0 + dy, x0 : x0 + dx] = True
    maps = rng.random((n, h, w)) + 0.4 * masks
    if seed % 2:
        maps = maps.round(1)  # heavy ties, also between normal and anomalous pixels
    n_regions = sum(cc_label(m, connectivity=2).max() for m in masks)
    assert n_regions >= 3
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(_reference_aupro(maps, masks, limit), abs=1e-9)


def test_pro_curve_monotone_and_thinned() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 64, 64), dtype=bool)
    masks[:, 10:30, 20:40] = True
    masks[1, 50:60, 5:9] = True
    maps = rng.random(masks.shape) + 0.5 * masks
    fpr, pro = pro_curve(maps, masks, max_points=None)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and (fpr[-1], pro[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert len(fpr) == len(np.unique(maps)) + 1
    tf, tp = pro_curve(maps, masks, max_points=200)
    assert 100 <= len(tf) <= 200
    assert (tf[0], tp[0]) == (0.0, 0.0) and (tf[-1], tp[-1]) == (1.0, 1.0)
    assert np.all(np.diff(tf) >= 0) and np.all(np.diff(tp) >= 0)
    assert set(zip(tf, tp, strict=True)) <= set(zip(fpr, pro, strict=True))
