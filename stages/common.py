"""What every stage shares: reading params.yaml and failing with a message a user can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml

from mpad.data.download import sha256_file
from mpad.memory import VisualMemory

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="Parameters file (DVC's params.yaml).")


def load_params(path: Path) -> dict[str, Any]:
    """Read the params file; a missing or malformed file is a clear error naming it."""
    if not path.is_file():
        fail(f"{path}: parameters file not found (run from the project root or pass --params)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        fail(f"{path}: not valid YAML: {err}")
    if not isinstance(params, dict):
        fail(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


def section(params: dict[str, Any], name: str, path: Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """params[name], which must be a mapping holding `keys`; otherwise a clear error naming the file."""
    found = params.get(name)
    if not isinstance(found, dict):
        fail(f"{path}: section '{name}' missing or not a mapping")
    missing = [key for key in keys if key not in found]
    if missing:
        fail(f"{path}: section '{name}' lacks {', '.join(missing)}")
    return found


def fail(message: str) -> None:
    """Stop the stage with `message` on stderr and exit status 1 (no traceback: the message is the point)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


def memory_from_record(record: dict[str, Any]) -> VisualMemory | None:
    """The visual memory stored with the prompts (key "memory"), or None when it was built without one."""
    stored = record.get("memory")
    return VisualMemory.from_record(stored) if stored else None


SHOTS_DIR = Path("data/shots")


def read_shots(shots_file: Path, root: Path, category: str) -> list[tuple[str, Path]]:
    """(path relative to root, path) of each shot listed in `shots_file`, checked against its sha256."""
    if not shots_file.is_file():
        fail(f"{shots_file}: shots file not found (run `mpad sample --category {category}` first)")
    try:
        record = json.loads(shots_file.read_text())
        shots = record["shots"]
        entries = [(str(s["path"]), str(s["sha256"])) for s in shots]
    except (ValueError, KeyError, TypeError) as err:
        fail(f"{shots_file}: not a valid shots file ({err!r})")
    if record.get("category", category) != category:
        fail(f"{shots_file}: holds the shots of category {record.get('category')!r}, not {category!r}")
    if not entries:
        fail(f"{shots_file}: lists no shots")
    paths = []
    for rel, sha in entries:
        path = root / rel
        if not path.is_file():
            fail(f"{path}: shot image listed in {shots_file} not found")
        if sha256_file(path) != sha:
            fail(f"{path}: shot image changed since {shots_file} was written (sha256 differs); re-run `sample`")
        paths.append((rel, path))
    return paths
