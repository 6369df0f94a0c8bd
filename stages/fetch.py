"""Stage `fetch`: make the dataset available, validate it, and describe it in data/manifest.json and in one
fingerprint file per category and split (data/fingerprints/<category>/<split>.json).

DVC runs it on every `dvc repro` (`always_changed`: the dataset is no DVC dependency, so only a fresh listing
can see an edit); its outputs keep their bytes while the dataset does, so DVC then skips what follows.

dataset.name: mvtec (use dataset.root if it holds the categories, else download and extract),
synthetic (generate, seeded), folder (the user's tree, read only).
"""

from __future__ import annotations

from pathlib import Path

import typer

from mpad import layout
from mpad.data.manifest import save_manifest, save_split_record
from mpad.data.mvtec import SPLITS, DatasetError
from mpad.data.prepare import prepare_dataset
from stages.common import PARAMS_OPTION, fail, load_config


def main(params: Path = PARAMS_OPTION) -> None:
    """Prepare the dataset of params `dataset`; write data/manifest.json and data/fingerprints/."""
    (dataset,) = load_config(params, "dataset")
    try:
        manifest = prepare_dataset(dataset, layout.DOWNLOADS, typer.echo)
    except DatasetError as err:
        fail(str(err))
    for category, info in manifest["categories"].items():
        tests = ", ".join(f"{k} {v}" for k, v in info["test"].items())
        typer.echo(f"{category} ({info['group']}): train {info['train']}; test {tests}")
    save_manifest(layout.MANIFEST, manifest)
    for category in manifest["categories"]:
        for split in SPLITS:
            save_split_record(layout.fingerprint_file(category, split), manifest, category, split)
    typer.echo(f"wrote {layout.MANIFEST} ({len(manifest['categories'])} categories)")
