from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fp_bounds import IMAGE_TERMS, reorder_bound
from tiny_records import meta_prompts

from mpad.config import ScoringConfig
from mpad.curves import curve_points, read_curve, read_xy, save_curves
from mpad.data import DatasetError, list_split
from mpad.data.synthetic import generate
from mpad.detector import Detector
from mpad.evaluation import CategoryResult, category_metrics, resize_mask, run_detector, unmeasured
from mpad.overlays import pick_overlays
from mpad.summary import markdown_table, summarize
from mpad.visualize import heatmap, overlay_panel


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "synthetic"
    generate(root, seed=0, n_train=2, n_test=6)
    return root


def detector(tiny_clip, sigma=1.0):
    return Detector(
        tiny_clip, meta_prompts(tiny_clip), ScoringConfig(smoothing_sigma=sigma, image_score="max", topk=0.01)
    )


@pytest.mark.numerics
def test_run_detector_keeps_order_and_masks(tiny_clip, dataset):
    samples = list_split(dataset, "disc", "test")
    result = run_detector(detector(tiny_clip), samples, 32, batch_size=4, workers=0)
    assert result.maps.shape == (len(samples), 32, 32) and result.masks.dtype == torch.bool
    assert result.labels.tolist() == [s.label for s in samples]
    assert torch.equal(result.scores, result.maps.flatten(1).amax(1))
    assert not result.masks[result.labels == 0].any() and result.masks[result.labels == 1].any()
    # The same images one at a time, in another process: the same maps, up to the kernels another batch size may
    # take. Patch features (unit vectors, D = 64) within r = reorder_bound(IMAGE_TERMS) elementwise move each
    # logit difference s f.(t_a - t_n) by <= s sqrt(D) r |t_a - t_n|; sigmoid is 1/4-Lipschitz and upsampling and
    # blurring average (tests/fp_bounds.py; tests/test_precision.py's map bound). Another image's map is O(1e-2) off.
    again = run_detector(detector(tiny_clip), samples, 32, batch_size=1, workers=1)
    text, scale = detector(tiny_clip).text, float(tiny_clip.model.logit_scale.exp())
    bound = scale / 4 * math.sqrt(text.shape[1]) * reorder_bound(IMAGE_TERMS) * float((text[1] - text[0]).norm())
    torch.testing.assert_close(again.maps, result.maps, rtol=0, atol=bound)


def test_decoding_threads_and_worker_processes_give_the_same_result(tiny_clip, dataset):
    """workers 0 decodes each batch in this process's threads (one per torch thread, each single-threaded),
    workers > 0 in DataLoader processes: the same batches, hence the same maps, scores, masks and labels, bit for
    bit, and the calling thread keeps its torch threads."""
    samples = list_split(dataset, "disc", "test")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two decoding threads, whatever pytest's setting; the model on two threads in both
    try:
        pooled = run_detector(detector(tiny_clip), samples, 32, batch_size=4, workers=0)
        assert torch.get_num_threads() == 2
        loaded = run_detector(detector(tiny_clip), samples, 32, batch_size=4, workers=1)
    finally:
        torch.set_num_threads(threads)
    for name in ("maps", "scores", "masks", "labels"):
        assert torch.equal(getattr(pooled, name), getattr(loaded, name)), name


def test_corrupt_test_image_is_named_in_one_line(tiny_clip, dataset, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(dataset, root)
    bad = list_split(root, "disc", "test")[1].image
    bad.write_bytes(bad.read_bytes()[:200])
    for workers in (2, 0):  # from a DataLoader process, and from a decoding thread
        with pytest.raises(DatasetError) as err:
            run_detector(detector(tiny_clip), list_split(root, "disc", "test"), 32, batch_size=2, workers=workers)
        assert str(err.value).startswith(str(bad)) and "truncated" in str(err.value) and "\n" not in str(err.value)


def test_resize_mask_keeps_majority_pixels():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    small = resize_mask(mask, 4)
    assert small.tolist() == [[True, True, False, False]] * 2 + [[False] * 4] * 2


def test_category_metrics_perfect_and_inverted():
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[2:, 4:8, 4:8] = True
    labels = torch.tensor([0, 0, 1, 1])
    perfect = CategoryResult(masks.float(), masks, labels, torch.tensor([0.1, 0.2, 0.8, 0.9]))
    values = category_metrics(perfect)
    assert values == {k: 100.0 for k in values} and len(values) == 7
    inverted = CategoryResult(1 - masks.float(), masks, labels, torch.tensor([0.9, 0.8, 0.2, 0.1]))
    assert category_metrics(inverted)["pixel_auroc"] == 0.0 and category_metrics(inverted)["image_auroc"] == 0.0
    no_defect = torch.zeros(2, 8, 8, dtype=torch.bool)
    only_good = CategoryResult(torch.rand(2, 8, 8), no_defect, torch.zeros(2), torch.rand(2))
    assert category_metrics(only_good) == dict.fromkeys(values)  # undefined: null, not a number from one class
    assert unmeasured(only_good) == [
        "pixel metrics: the test masks hold no defect pixel (no defect image, or only empty masks)",
        "image metrics: the test split holds no defect image",
    ]
    empty_masks = CategoryResult(torch.rand(2, 8, 8), no_defect, torch.tensor([0, 1]), torch.tensor([0.2, 0.7]))
    partial = category_metrics(empty_masks)  # a defect image whose mask is empty: image metrics only
    assert partial["pixel_auroc"] is None and partial["aupro"] is None and partial["image_auroc"] == 100.0
    assert unmeasured(empty_masks) == [unmeasured(only_good)[0]] and unmeasured(perfect) == []


def test_summary_means_groups_and_table():
    per = {
        "carpet": {"pixel_auroc": 90.0, "image_auroc": 80.0},
        "screw": {"pixel_auroc": 70.0},
        "bottle": {"pixel_auroc": 80.0, "image_auroc": 60.0},
    }
    summary = summarize(per, {"carpet": "texture", "screw": "object", "bottle": "object"})
    assert summary["mean"] == {"pixel_auroc": 80.0, "image_auroc": 70.0}
    assert summary["texture"] == {"pixel_auroc": 90.0, "image_auroc": 80.0}
    assert summary["object"] == {"pixel_auroc": 75.0, "image_auroc": 60.0}
    assert set(summary) == {"mean", "texture", "object"}  # no copy of the per-category files
    table = markdown_table(per, summary, note="RANDOM")
    assert "| Metric | carpet | screw | bottle | mean |" in table
    assert "| Pixel AUROC | 90.00 | 70.00 | 80.00 | 80.00 |" in table
    assert "| Image AUROC | 80.00 | - | 60.00 | 70.00 |" in table and table.startswith("> **RANDOM**")


def test_summary_leaves_null_metrics_out_and_says_so():
    per = {
        "carpet": {"pixel_auroc": 90.0, "image_auroc": 80.0},
        "screw": {"pixel_auroc": None, "image_auroc": 40.0, "null_reason": "pixel metrics: no defect pixel"},
    }
    summary = summarize(per, {"carpet": "texture", "screw": "object"})
    assert summary["mean"] == {"pixel_auroc": 90.0, "image_auroc": 60.0}
    assert "pixel_auroc" not in summary["object"]
    assert summary["unmeasured"] == {"screw": "pixel metrics: no defect pixel"}
    table = markdown_table(per, summary)
    assert "| Metric | carpet | screw (!) | mean |" in table and "| Pixel AUROC | 90.00 | n/a | 90.00 |" in table
    assert "(!) screw cannot be fully measured: pixel metrics: no defect pixel; its n/a values are left out" in table


def test_heatmap_and_panel():
    colours = heatmap(np.array([[0.0, 1.0, 2.0]]), 0.0, 1.0)
    assert colours[0, 0].tolist() == [0, 0, 4] and colours[0, 1].tolist() == colours[0, 2].tolist() == [252, 255, 164]
    image = np.full((10, 12, 3), 100, np.uint8)
    mask = np.zeros((10, 12), bool)
    mask[2:6, 2:6] = True
    panel = overlay_panel(image, mask, np.zeros((10, 12)), 0.0, 1.0)
    assert panel.shape == (10, 3 * 12 + 8, 3)
    truth = panel[:, 16:28]
    assert truth[2, 2].tolist() == [0, 255, 0] and truth[3, 3].tolist() == [100, 100, 100]  # outline only


def test_render_map_sizes_and_scaling():
    from mpad.visualize import render_map

    image = np.zeros((90, 120, 3), np.uint8)
    amap = np.zeros((4, 4), np.float32)
    amap[:, 2:] = 1.0
    overlay, gray = render_map(image, amap, max_size=60, low=0.0, high=1.0)
    assert overlay.shape == (45, 60, 3) and gray.shape == (45, 60) and gray.dtype == np.uint8
    assert gray[:, 0].max() == 0 and gray[:, -1].min() == 255  # left half normal, right half anomalous
    _, half = render_map(image, amap, max_size=120, low=0.0, high=2.0)
    assert half[:, -1].min() == 128  # 1.0 on a 0..2 range


def test_curve_points_files_and_reading_by_column_name(tmp_path, monkeypatch):
    maps = torch.tensor([[0.1] * 4, [0.2, 0.2, 0.2, 0.9]]).reshape(2, 2, 2)
    masks = maps > 0.5
    result = CategoryResult(maps, masks, torch.tensor([0, 1]), torch.tensor([0.1, 0.9]))
    points = curve_points(result)
    assert points["roc_image"] == [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    assert points["roc_pixel"][:2] == [(0.0, 0.0), (0.0, 1.0)]
    assert points["pro"][0] == (0.0, 0.0) and points["pro"][-1] == (1.0, 1.0)
    normal = CategoryResult(maps, torch.zeros_like(masks), torch.tensor([0, 0]), result.scores)
    assert curve_points(normal) == {"roc_pixel": [], "roc_image": [], "pro": []}
    monkeypatch.chdir(tmp_path)
    save_curves("disc", points)
    assert Path("plots/pro/disc.csv").read_text().startswith("fpr,pro\n0.000000,0.000000\n")
    assert read_curve("roc_image", "disc") == points["roc_image"] and read_curve("pro", "absent") == []
    swapped = tmp_path / "swapped.tsv"  # columns are found by name, not position
    swapped.write_text("loss_ano\tstep\n0.5\t0\n0.25\t1\n")
    assert read_xy(swapped, "step", "loss_ano", "\t") == [(0.0, 0.5), (1.0, 0.25)]
    with pytest.raises(ValueError, match="swapped.tsv: expected columns step and cos"):
        read_xy(swapped, "step", "cos", "\t")


def test_pick_overlays_one_per_defect_type_in_turn():
    defects = ["good", "scratch", "good", "crack", "scratch", "crack"]
    assert pick_overlays(defects, 4) == [3, 1, 0, 5]  # crack, scratch, good, then round two
    assert pick_overlays(defects, 10) == [3, 1, 0, 5, 4, 2]
    assert pick_overlays(defects, 0) == [] and pick_overlays(["good"], 3) == [0]
