"""The console script: light start-up (no torch for commands that need no model) and lazy stage commands."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from stages.cli import COMMANDS, app

HEAVY = ("torch", "open_clip", "torchvision", "dvclive", "sklearn")

PROBE = """
import json, sys
from typer.testing import CliRunner
import stages.cli, stages.fetch, stages.sample, stages.summarize
runner = CliRunner()
codes = [runner.invoke(stages.cli.app, args).exit_code
         for args in (["--help"], ["fetch", "--help"], ["sample", "--help"], ["summarize", "--help"])]
print(json.dumps({"codes": codes, "heavy": [m for m in %r if m in sys.modules]}))
"""


def test_light_commands_import_no_torch():
    out = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,)], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["codes"] == [0, 0, 0, 0]
    assert found["heavy"] == []


def test_help_lists_every_stage_and_stage_help_is_its_own():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
    train_help = CliRunner().invoke(app, ["train", "--help"])
    assert train_help.exit_code == 0 and "--category" in train_help.output
    assert CliRunner().invoke(app, ["no-such-stage"]).exit_code == 2


def test_stage_progress_records_first_update_and_end(tmp_path, monkeypatch):
    from stages.common import StageProgress

    timings = tmp_path / "timings.jsonl"
    monkeypatch.setenv("MPAD_TIMINGS", str(timings))
    with StageProgress(total=3, desc="evaluate disc", unit="img", disable=True) as bar:
        for _ in range(3):
            bar.update(1)
    with StageProgress(total=2, desc="never updated", disable=True):
        pass
    lines = [json.loads(line) for line in timings.read_text().splitlines()]
    assert len(lines) == 1
    assert lines[0]["desc"] == "evaluate disc" and lines[0]["unit"] == "img" and lines[0]["n"] == 3
    assert lines[0]["first"] <= lines[0]["end"] and lines[0]["first_n"] == 1
