"""`mpad check`: validate every section of params.yaml before DVC reads it (`make run` runs it first).

DVC expands dvc.yaml's matrices from params.yaml before any stage runs, so a value it cannot expand (e.g.
`dataset.categories: null`) stops DVC itself with its own error; this says which key and what to write.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, load_config


def main(params: Path = PARAMS_OPTION) -> None:
    """Check every section of the params file; exit status 1 with one line per bad value."""
    from mpad.config import SECTIONS

    load_config(params, *SECTIONS)
    typer.echo(f"{params}: ok")
