"""Stage `summarize`: metrics.json (means over categories and over texture / object groups) and metrics.md.

A category with null (unmeasurable) metrics is named on stderr, under `unmeasured` in metrics.json and
marked "(!)" in metrics.md; its nulls are left out of the means.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mpad import layout
from mpad.config import RANDOM_WEIGHTS_NOTE
from mpad.data.manifest import group_of, load_manifest
from mpad.data.mvtec import DatasetError
from mpad.io import write_json, write_text
from mpad.summary import load_category_metrics, markdown_table, summarize
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
    summary = summarize(per_category, {c: group_of(manifest, c) for c in categories})
    for category, why in summary.get("unmeasured", {}).items():
        typer.secho(
            f"warning: {category} cannot be fully measured ({why}): its null metrics are left out of the means",
            err=True,
            fg=typer.colors.YELLOW,
        )
    random_weights = any(m.get("random_weights") for m in per_category.values())
    summary["random_weights"] = random_weights
    note = RANDOM_WEIGHTS_NOTE if random_weights else ""
    if note:
        summary["note"] = note
    write_json(layout.METRICS_JSON, summary)
    write_text(layout.METRICS_MD, markdown_table(per_category, summary, note))
    typer.echo(markdown_table(per_category, summary, note))
