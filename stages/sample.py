"""Stage `sample`: choose the k normal training images (shots) of one category, seeded.

Writes data/shots/<category>.json: {"category", "root", "k", "seed", "shots": [{"path", "sha256"}]},
paths relative to dataset.root. Same params, same picks, on any machine.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mpad import layout
from mpad.data import DatasetError, list_split, pick_shots
from mpad.data.manifest import check_split_record
from mpad.data.shots import save_shots
from stages.common import PARAMS_OPTION, fail, load_config


def main(
    category: str = typer.Option(..., "--category", help="Category to draw the shots of."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Pick shots.k training images of CATEGORY with shots.seed and write data/shots/<category>.json."""
    dataset, shots = load_config(params, "dataset", "shots")
    if not category or Path(category).name != category or category in (".", ".."):
        fail(f"--category must be a plain category name, got {category!r}")
    if category not in dataset.categories:
        fail(f"category {category!r} is not in dataset.categories ({', '.join(dataset.categories)})")
    root = dataset.path
    record = layout.fingerprint_file(category, "train")
    try:  # when fetch has run, the split it listed must be this root's and category's
        if record.is_file():
            check_split_record(record, dataset.root, category)
    except DatasetError as err:
        fail(f"{err}: run `mpad fetch` first (with the category in dataset.categories)")
    try:
        picks = pick_shots(list_split(root, category, "train"), shots.k, shots.seed, category)
    except DatasetError as err:
        fail(str(err))
    out = layout.shots_file(category)
    record = save_shots(out, category, dataset.root, shots.k, shots.seed, picks, base=root)
    typer.echo(f"wrote {out}: {', '.join(e['path'] for e in record['shots'])}")
