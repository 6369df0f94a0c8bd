"""Where each artifact of the pipeline lives, relative to the project root: the one place that names them.

dvc.yaml declares the same paths as deps / outs (DVC needs them literally); `tests/test_layout.py` checks
that the two agree. Each artifact's format has its own owner module (save / load / checks), named below.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
MANIFEST = DATA / "manifest.json"  # mpad.data.manifest: the dataset's categories and counts (fetch)
FINGERPRINTS = DATA / "fingerprints"  # mpad.data.manifest.split_record: one file per category and split (fetch)
DOWNLOADS = DATA / "downloads"  # archives being / once downloaded (never a DVC output)
METRICS_JSON = Path("metrics.json")  # mpad.summary: means over categories (summarize)
METRICS_MD = Path("metrics.md")


def fingerprint_file(category: str, split: str) -> Path:
    """The file listing fingerprint of a category's split (fetch): a dependency of sample (train) and evaluate
    (test), so that a dataset edit re-runs the stages and categories it touches (datasets are never DVC deps)."""
    return FINGERPRINTS / category / f"{split}.json"


def shots_file(category: str) -> Path:
    """mpad.data.shots: the k normal training images of a category (sample)."""
    return DATA / "shots" / f"{category}.json"


def synth_dir(category: str) -> Path:
    """mpad.synth_set: OAGM's synthesized images, masks and manifest (synthesize)."""
    return DATA / "synth" / category


def prompts_file(category: str) -> Path:
    """mpad.prompt_file: the learned prompts (train)."""
    return DATA / "prompts" / f"{category}.pt"


def thresholds_file(category: str) -> Path:
    """mpad.thresholds: F1-max thresholds, scoring settings and map colour range (evaluate)."""
    return DATA / "thresholds" / f"{category}.json"


def train_curves_dir(category: str) -> Path:
    """dvclive's folder of the training curves (train)."""
    return Path("dvclive") / "train" / category


def metrics_file(category: str) -> Path:
    """A category's metrics (evaluate), a DVC metrics file."""
    return Path("metrics") / f"{category}.json"


def curve_file(kind: str, category: str) -> Path:
    """kind: roc_pixel | roc_image | pro: a curve as CSV (evaluate), a DVC plot."""
    return Path("plots") / kind / f"{category}.csv"


def overlays_dir(category: str) -> Path:
    """[image | ground truth | map] panels of a few test images (evaluate)."""
    return Path("plots") / "overlays" / category
