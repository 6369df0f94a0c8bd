"""`mpad schema`: write params.schema.json, the JSON Schema of params.yaml, for editors that complete and check
the knobs (params.yaml's first line points the YAML language server of VS Code and others at it).

The schema is `mpad.config.params_schema` (the pydantic models: keys, types, bounds, choices, defaults); the
description of each key is its comment in params.yaml, its `(paper)` / `(ours: why)` tag included.
`--check` writes nothing and exits 1 when the file is not what the models and comments give (a test runs it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from stages.common import PARAMS_OPTION, fail

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")


def comments(text: str) -> dict[str, str]:
    """{"section.key": its comment} from params.yaml's text: the comment on the key's line, the comment lines
    under it indented deeper (and the comment of a value continued on the next line), and the comment lines
    just above it at its own indentation."""
    found: dict[str, list[str]] = {}
    section, key, above = "", "", []
    for line in text.splitlines():
        code, _, comment = line.partition("#")
        comment, stripped = comment.strip(), code.strip()
        match = _KEY.match(code)
        if match and not match["indent"]:
            section, key, above = match["key"], "", []
        elif match and section:
            key = f"{section}.{match['key']}"
            found[key] = above + ([comment] if comment else [])
            above = []
        elif not stripped and comment and key and len(line) - len(line.lstrip()) > 2:
            found[key].append(comment)  # a continuation line, indented under the key's comment
        elif not stripped and comment and section:
            above.append(comment)  # a comment line above the next key
        elif stripped and comment and key:
            found[key].append(comment)  # a value continued on this line
    return {key: " ".join(lines) for key, lines in found.items() if lines}


def main(
    params: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("params.schema.json"), "--out", help="Schema file to write."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 when --out is not current."),
) -> None:
    """Write the JSON Schema of params.yaml (keys, types, bounds, defaults, descriptions from its comments)."""
    from mpad.io import write_text
    from mpad.params_file import params_schema

    if not params.is_file():
        fail(f"{params}: parameters file not found (run from the project root or pass --params)")
    text = json.dumps(params_schema(comments(params.read_text())), indent=2) + "\n"
    if check:
        if not out.is_file() or out.read_text() != text:
            fail(f"{out} is not current with mpad/config.py and {params}'s comments: run `mpad schema`")
        typer.echo(f"{out}: current")
        return
    write_text(out, text)
    typer.echo(f"wrote {out}")
