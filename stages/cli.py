"""The `mpad` console script: one Typer app gathering every stage command."""

from __future__ import annotations

import typer

from stages import evaluate, fetch, predict, sample, summarize, synthesize, train

app = typer.Typer(
    help="Few-shot anomaly detection with learned CLIP prompts (OAGM + MPTS + LAA). "
    "Each command is one DVC stage; see dvc.yaml.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("fetch")(fetch.main)
app.command("sample")(sample.main)
app.command("synthesize")(synthesize.main)
app.command("train")(train.main)
app.command("evaluate")(evaluate.main)
app.command("summarize")(summarize.main)
app.command("predict")(predict.main)
