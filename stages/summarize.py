"""Stage `summarize`: metrics.json (means over categories and over texture / object groups) and metrics.md."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mpad.io import write_json, write_text
from mpad.notes import RANDOM_WEIGHTS_NOTE
from mpad.summary import markdown_table, summarize
from stages.common import PARAMS_OPTION, fail, load_params, section


def main(params: Path = PARAMS_OPTION) -> None:
    """Gather metrics/<category>.json of every dataset category into metrics.json and metrics.md."""
    cfg = load_params(params)
    manifest_path = Path("data/manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        fail(f"{manifest_path}: cannot read the dataset manifest ({err}); run the fetch stage")
        return
    categories = list(section(cfg, "dataset", params).get("categories") or manifest["categories"])
    per_category = {}
    for category in categories:
        path = Path("metrics") / f"{category}.json"
        try:
            per_category[category] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            fail(f"{path}: missing or unreadable ({err}); run the evaluate stage for {category}")
    groups = {c: manifest["categories"].get(c, {}).get("group", "object") for c in categories}
    summary = summarize(per_category, groups)
    random_weights = any(m.get("random_weights") for m in per_category.values())
    summary["random_weights"] = random_weights
    note = RANDOM_WEIGHTS_NOTE if random_weights else ""
    if note:
        summary["note"] = note
    write_json("metrics.json", summary)
    write_text("metrics.md", markdown_table(per_category, summary, note))
    typer.echo(markdown_table(per_category, summary, note))
