"""Stage `sample`: choose the k normal training images (shots) of one category, seeded.

Writes data/shots/<category>.json: {"category", "root", "k", "seed", "shots": [{"path", "sha256"}]},
paths relative to dataset.root. Same params, same picks, on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mpad.data import DatasetError, list_split, pick_shots
from mpad.data.shots import save_shots
from mpad.layout import shots_file
from stages.common import PARAMS_OPTION, fail, load_params

MANIFEST = Path("data/manifest.json")


def _check_manifest(root: str, category: str) -> None:
    """When fetch has run, its manifest must describe this root and category (else it is stale)."""
    if not MANIFEST.is_file():
        return
    try:
        manifest = json.loads(MANIFEST.read_text())
    except ValueError:
        fail(f"{MANIFEST} is not valid JSON: run `mpad fetch` again")
    if manifest.get("root") != root:
        fail(f"{MANIFEST} describes root {manifest.get('root')!r}, params say {root!r}: run `mpad fetch` first")
    if category not in manifest.get("categories", {}):
        fail(f"category {category!r} is not in {MANIFEST}: add it to dataset.categories and run `mpad fetch`")


def main(
    category: str = typer.Option(..., "--category", help="Category to draw the shots of."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Pick shots.k training images of CATEGORY with shots.seed and write data/shots/<category>.json."""
    cfg = load_params(params)
    dataset, shots = cfg.get("dataset"), cfg.get("shots")
    if not isinstance(dataset, dict) or not dataset.get("root"):
        fail(f"{params}: missing dataset.root")
    if not isinstance(shots, dict):
        fail(f"{params}: missing section 'shots'")
    if not category or Path(category).name != category or category in (".", ".."):
        fail(f"--category must be a plain category name, got {category!r}")
    listed = dataset.get("categories")
    if isinstance(listed, list) and category not in listed:
        fail(f"category {category!r} is not in dataset.categories ({', '.join(map(str, listed))})")
    _check_manifest(str(dataset["root"]), category)
    root = Path(str(dataset["root"]))
    k, seed = shots.get("k"), shots.get("seed", 0)
    try:
        picks = pick_shots(list_split(root, category, "train"), k, seed, category)
    except DatasetError as err:
        fail(str(err))
        return
    out = shots_file(category)
    record = save_shots(out, category, str(dataset["root"]), k, seed, picks)
    typer.echo(f"wrote {out}: {', '.join(e['path'] for e in record['shots'])}")
