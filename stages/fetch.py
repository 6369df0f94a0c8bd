"""Stage `fetch`: make the dataset available, validate it, and describe it in data/manifest.json and in one
fingerprint file per category and split (data/fingerprints/<category>/<split>.json).

DVC runs it on every `dvc repro` (`always_changed`: the dataset is no DVC dependency, so only a fresh listing
can see an edit); its outputs keep their bytes while the dataset does, so DVC then skips what follows.

dataset.name: mvtec (use dataset.root if it holds the categories, else download and extract),
synthetic (generate, seeded), folder (the user's tree, read only).

On a Ray node running a whole experiment, MPAD_PINNED_DATASET names the coordinator's manifest of the same
dataset, which fetch then writes instead of its own when this copy has the same files and sizes
(mpad.data.manifest.pin): fingerprints hold mtimes, and the coordinator's are the ones its workspace will see.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from mpad import layout
from mpad.data.manifest import pin, save_manifest, save_split_record
from mpad.data.mvtec import SPLITS, DatasetError
from mpad.data.prepare import prepare_dataset
from stages.common import PARAMS_OPTION, fail, load_config

PINNED = "MPAD_PINNED_DATASET"


def main(params: Path = PARAMS_OPTION) -> None:
    """Prepare the dataset of params `dataset`; write data/manifest.json and data/fingerprints/."""
    (dataset,) = load_config(params, "dataset")
    try:
        manifest = prepare_dataset(dataset, layout.DOWNLOADS, typer.echo)
        if pinned := os.environ.get(PINNED):
            manifest = pin(manifest, json.loads(Path(pinned).read_text()), dataset.path)
            typer.echo(f"the coordinator's manifest ({pinned}): this copy has its files and sizes")
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
