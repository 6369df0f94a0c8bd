"""dvc.yaml declares the paths that mpad.layout names (DVC needs them literally; the stages write them)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mpad import layout

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
C = "${item.category}"


def _paths(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_dvc_yaml_declares_the_layout_paths():
    outs = {
        name: _paths(spec.get("outs", [])) | _paths(spec.get("metrics", [])) | _paths(spec.get("plots", []))
        for name, spec in STAGES.items()
    }
    assert outs["fetch"] == {layout.MANIFEST.as_posix(), layout.FINGERPRINTS.as_posix()}
    assert outs["sample"] == {layout.shots_file(C).as_posix()}
    assert outs["synthesize"] == {layout.synth_dir(C).as_posix()}
    curves = f"{layout.train_curves_dir(C).as_posix()}/plots/metrics"
    assert outs["train"] == {layout.prompts_file(C).as_posix(), curves}
    assert outs["evaluate"] == {
        layout.thresholds_file(C).as_posix(),
        layout.metrics_file(C).as_posix(),
        layout.overlays_dir(C).as_posix(),
    } | {layout.curve_file(kind, C).as_posix() for kind in ("roc_pixel", "roc_image", "pro")}
    assert outs["summarize"] == {layout.METRICS_JSON.as_posix(), layout.METRICS_MD.as_posix()}
    assert layout.shots_file(C).as_posix() in STAGES["synthesize"]["deps"]
    assert layout.prompts_file(C).as_posix() in STAGES["evaluate"]["deps"]


def test_a_dataset_edit_reaches_the_stages_that_read_it():
    """fetch re-lists the dataset on every repro; sample / evaluate of a category depend on its split's file."""
    assert STAGES["fetch"].get("always_changed") is True
    assert layout.fingerprint_file(C, "train").parent.parent == layout.FINGERPRINTS
    assert layout.fingerprint_file(C, "train").as_posix() in STAGES["sample"]["deps"]
    assert layout.fingerprint_file(C, "test").as_posix() in STAGES["evaluate"]["deps"]
    # the manifest changes with any category: a dep on it would re-run every category
    assert [name for name, spec in STAGES.items() if layout.MANIFEST.as_posix() in spec.get("deps", [])] == [
        "summarize"
    ]


def test_commands_quote_the_category():
    """A category with a space (`my part`) stays one argument in the shell DVC runs each command in."""
    commands = {name: spec["cmd"] for name, spec in STAGES.items() if "matrix" in spec}
    assert commands == {name: f"mpad {name} --category '{C}'" for name in ("sample", "synthesize", "train", "evaluate")}
