"""What every stage shares: reading params.yaml and failing with a message a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

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


def fail(message: str) -> None:
    """Stop the stage with `message` on stderr and exit status 1 (no traceback: the message is the point)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


def memory_from_record(record: dict[str, Any]) -> VisualMemory | None:
    """The visual memory stored with the prompts (key "memory"), or None when it was built without one."""
    stored = record.get("memory")
    return VisualMemory.from_record(stored) if stored else None
