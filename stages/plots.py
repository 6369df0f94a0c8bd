"""`mpad plots`: the run's pictures as PNG files that open without a browser or network (`make plots`).

    mpad plots [--experiments exp.json] [--sweep sweep.json] [--out figures] [--categories C...]

The categories are params.yaml's dataset.categories, validated as every stage validates them (metrics/ and
plots/ may still hold files of categories dropped since). The drawing is mpad.plots'.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, fail, load_config


def main(
    experiments: Path | None = typer.Option(None, "--experiments", help="`dvc exp show --json` output: ablations."),
    sweep: Path = typer.Option(Path("sweep.json"), "--sweep", help="`make sweep`'s results, drawn when there."),
    out: Path = typer.Option(Path("figures"), "--out", help="Folder for the PNG files."),
    categories: list[str] | None = typer.Option(None, "--categories", help="Default: params.yaml's categories."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Draw curves.png, training.png, and the ablation and sweep charts when their data are given."""
    from mpad.plots import (
        ablation_rows,
        ablation_spec,
        curve_panel_rows,
        line_panels,
        render_png,
        sweep_rows,
        sweep_spec,
        training_rows,
    )  # fmt: skip

    if not categories:
        (dataset,) = load_config(params, "dataset")
        categories = list(dataset.categories)
    written = []
    try:
        curves, training = curve_panel_rows(categories), training_rows(categories)
    except ValueError as err:  # a curve file without its columns, named
        fail(str(err))
    if curves:
        spec = line_panels(curves, "false positive rate", "TPR / PRO", "Evaluation curves", 3)
        written.append(render_png(spec, out / "curves.png"))
    if rows := training:
        written.append(render_png(line_panels(rows, "step", "value", "Training (MPTS)"), out / "training.png"))
    if experiments and (rows := ablation_rows(json.loads(experiments.read_text()))):
        written.append(render_png(ablation_spec(rows), out / "ablation_pixel_auroc.png"))
    if sweep.is_file() and (rows := sweep_rows(results := json.loads(sweep.read_text()))):
        title = "Shots x seeds sweep" + (" (random weights)" if results.get("random_weights") else "")
        written.append(render_png(sweep_spec(rows, title), out / "sweep.png"))
    typer.echo("\n".join(f"wrote {p}" for p in written) or "nothing to draw: run the pipeline first")
