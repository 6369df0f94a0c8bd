"""Stage `fetch`: make the dataset available, validate it, and describe it in data/manifest.json.

dataset.name: mvtec (use dataset.root if it holds the categories, else download and extract),
synthetic (generate, seeded), folder (the user's tree, read only).
"""

from __future__ import annotations

from pathlib import Path

import typer

from mpad import layout
from mpad.data.manifest import save_manifest
from mpad.data.mvtec import DatasetError
from mpad.data.prepare import prepare_dataset
from stages.common import PARAMS_OPTION, fail, load_config


def main(params: Path = PARAMS_OPTION) -> None:
    """Prepare the dataset of params `dataset` and write data/manifest.json."""
    (dataset,) = load_config(params, "dataset")
    try:
        manifest = prepare_dataset(dataset, layout.DOWNLOADS, typer.echo)
    except DatasetError as err:
        fail(str(err))
    for category, info in manifest["categories"].items():
        tests = ", ".join(f"{k} {v}" for k, v in info["test"].items())
        typer.echo(f"{category} ({info['group']}): train {info['train']}; test {tests}")
    save_manifest(layout.MANIFEST, manifest)
    typer.echo(f"wrote {layout.MANIFEST} ({len(manifest['categories'])} categories)")
