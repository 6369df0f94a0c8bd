"""bench/peers.py's pure helpers: which test images it picks, the link names WinCLIP's folder gets, and the
ratios and table it prints. The comparison itself needs anomalib in its own venv and minutes: `make bench-peers`."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def peers():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))  # bench/ scripts import their siblings (harness) by name
        yield importlib.import_module("peers")


def test_spread_keeps_order_ends_and_count(peers):
    items = list(range(10))
    assert peers.spread(items, 4) == [0, 3, 6, 9]
    assert peers.spread(items, 2) == [0, 9]
    assert peers.spread(items, 1) == [0]


def test_spread_takes_everything_when_asked_for_all_or_more(peers):
    items = ["a", "b", "c"]
    assert peers.spread(items, 0) == items
    assert peers.spread(items, 3) == items
    assert peers.spread(items, 7) == items


def test_link_names_are_unique_and_sort_in_the_given_order(peers):
    paths = [Path(f"/d/screw/test/{d}/000.png") for d in ("good", "scratch_neck")] + [
        Path(f"/d/screw/test/good/{i:03d}.png") for i in range(1, 10)
    ]
    names = peers.link_names(paths)
    assert names[:2] == ["00_good_000.png", "01_scratch_neck_000.png"]
    assert len(set(names)) == len(paths)
    assert sorted(names) == names  # the zero-padded index keeps a sorted folder listing in this order


def test_per_round_ratios_are_mpad_over_winclip_round_by_round(peers):
    records = {
        "mpad": [{"setup_s": 10.0, "images_per_s": 2.0, "peak_rss_mib": 1000.0, "build_s": 1.0}] * 2,
        "winclip": [
            {"setup_s": 40.0, "images_per_s": 0.5, "peak_rss_mib": 2000.0, "build_s": 5.0},
            {"setup_s": 20.0, "images_per_s": 1.0, "peak_rss_mib": 2500.0, "build_s": 5.0},
        ],
    }
    ratios = peers.per_round(records)
    assert (ratios["setup_s"].low, ratios["setup_s"].high, ratios["setup_s"].median) == (0.25, 0.5, 0.375)
    assert (ratios["images_per_s"].low, ratios["images_per_s"].high) == (2.0, 4.0)
    assert (ratios["peak_rss_mib"].low, ratios["peak_rss_mib"].high) == (0.4, 0.5)
    assert ratios["setup_s"].rounds == 2


def test_table_has_one_row_per_figure_with_medians_and_ratio(peers):
    one = {"setup_s": 12.0, "images_per_s": 0.3, "peak_rss_mib": 1700.0, "build_s": 0.5, "build_peak_rss_mib": 900.0}
    other = {"setup_s": 48.0, "images_per_s": 0.1, "peak_rss_mib": 3400.0, "build_s": 9.0, "build_peak_rss_mib": 2e3}
    rows = peers.table("disc", {"mpad": [one], "winclip": [other]}).splitlines()
    assert rows[0].startswith("| disc | mpad | WinCLIP |")
    assert rows[2] == "| model build s | 0.5 | 9.0 | | |"
    assert rows[3] == "| peak RSS MiB when built | 900 | 2000 | | |"
    assert rows[4] == "| set-up s from k normal images | 12.0 | 48.0 | 0.25x (0.25-0.25x, 1 rounds) | lower |"
    assert rows[5] == "| evaluation images/s | 0.3 | 0.1 | 3.00x (3.00-3.00x, 1 rounds) | higher |"
    assert rows[6] == "| peak RSS MiB | 1700 | 3400 | 0.50x (0.50-0.50x, 1 rounds) | lower |"


def test_digests_tell_equal_weights_from_a_changed_one(peers):
    torch = pytest.importorskip("torch")
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "scale": torch.tensor(4.6)}
    same = {"w": state["w"].t().contiguous().t(), "scale": torch.tensor(4.6)}  # other strides, same values
    changed = {"w": state["w"].clone(), "scale": torch.tensor(4.6)}
    changed["w"][2, 3] += 1e-6 * changed["w"][2, 3]  # a relative change of 1e-6 in one value
    assert peers.digests(same) == peers.digests(state)
    assert {k for k in state if peers.digests(changed)[k] != peers.digests(state)[k]} == {"w"}
