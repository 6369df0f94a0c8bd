"""The `mpad` console script: one Typer app gathering every stage command.

Stage modules are imported only when their command runs (or its own `--help` is asked for): `mpad --help`
lists the commands from the one-line summaries below, so it, and the stages that need no model (fetch,
sample, summarize), start without importing torch or open_clip (about 4 s and 900 MB per process saved,
times the ~60 stage processes of the paper setting).
"""

from __future__ import annotations

import importlib

import click
import typer
from typer.core import TyperGroup
from typer.main import CommandInfo, get_command_from_info

# command -> one-line summary shown by `mpad --help` (the full help is the stage's docstring).
COMMANDS = {
    "check": "Validate params.yaml (every section) before DVC reads it.",
    "schema": "Write params.schema.json (params.yaml's JSON Schema, for editors) from the models and comments.",
    "fetch": "Find or download the dataset and write data/manifest.json.",
    "sample": "Draw the k normal training images (shots) of a category.",
    "synthesize": "OAGM: synthesize anomalous training images and masks from the shots.",
    "train": "MPTS: learn the normal / anomaly prompts of a category.",
    "evaluate": "Evaluate the learned prompts on a category's test split.",
    "summarize": "Gather per-category metrics into metrics.json and metrics.md.",
    "predict": "Score new images with learned prompts: maps, overlays, decisions.",
    "plots": "Draw the run's curves and the ablation / sweep charts as PNG files (no browser, no network).",
    "export": "Export the learned detector as one ONNX model (+ sidecar JSON) for deployment.",
    "serve": "Serve an exported model over HTTP, with dynamic batching and a page to try it.",
    "exp": "Runs, sweeps and ablations, here or on a Ray cluster: run, offline, sweep, ablations, compare.",
}


class LazyStages(TyperGroup):
    """A command group that imports `stages.<name>` only when that command is resolved."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        if self._listing:  # the group's help only needs names and summaries
            return click.Command(cmd_name, help=COMMANDS[cmd_name])
        module = importlib.import_module(f"stages.{cmd_name}")
        if hasattr(module, "app"):  # a command group (stages/exp.py)
            return typer.main.get_group(module.app)
        from stages.common import disk_errors  # a full disk: one line, not a traceback (every command)

        info = CommandInfo(name=cmd_name, callback=disk_errors(module.main))
        return get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=self.rich_markup_mode)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(cls=LazyStages, no_args_is_help=True, add_completion=False)


@app.callback()
def _group() -> None:
    """Few-shot anomaly detection with learned CLIP prompts (OAGM + MPTS + LAA). Each command is one DVC stage;
    see dvc.yaml."""
