"""Stage `summarize`: metrics.json (means over categories and over texture / object groups) and metrics.md.

A category with null (unmeasurable) metrics is named on stderr, under `unmeasured` in metrics.json and
marked "(!)" in metrics.md; its nulls are left out of the means.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mpad import layout
from mpad.data.manifest import group_of, load_manifest
from mpad.data.mvtec import DatasetError
from mpad.summary import load_category_metrics, save_summary, unmeasured_of
from stages.common import PARAMS_OPTION, fail, load_config


def main(params: Path = PARAMS_OPTION) -> None:
    """Gather metrics/<category>.json of every dataset category into metrics.json and metrics.md."""
    (dataset,) = load_config(params, "dataset")
    try:
        manifest = load_manifest(layout.MANIFEST)
    except DatasetError as err:
        fail(f"{err}; run the fetch stage")
    categories = list(dataset.categories)
    try:
        per_category = {c: load_category_metrics(layout.metrics_file(c)) for c in categories}
    except ValueError as err:
        fail(f"{err}; run the evaluate stage")
    groups = {c: group_of(manifest, c) for c in categories}
    summary = save_summary(per_category, groups, layout.METRICS_JSON, layout.METRICS_MD)
    for category, why in unmeasured_of(summary).items():
        typer.secho(
            f"warning: {category} cannot be fully measured ({why}): its null metrics are left out of the means",
            err=True,
            fg=typer.colors.YELLOW,
        )
    typer.echo(layout.METRICS_MD.read_text())
