"""Run one stage command with its start-up timed by phase: `python bench/phases.py train --category carpet`.

What `python -m stages ARGS` does, plus one JSON line appended to the file named by $MPAD_PHASES:
{"pid", "imported": wall-clock time once the stage's module (torch, open_clip, mpad) is imported,
"calls": [[phase, start, end], ...]} for each call of the functions below, wrapped here (the library is
not changed for it). bench/fullscale.py counts the calls that ended before the stage's first item.

- build: `open_clip.create_model` (the weight read inside it is counted apart);
- weights: `open_clip.factory.load_checkpoint` (read the checkpoint, load it into the model);
- ensemble: `mpad.prompts.text_ensemble` (hand-written prompt ensembles: cached after the first category);
- features: `mpad.features.encode_batched` (train: the synthesized images; synthesize: the shots' masks).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import sys
import time

PHASES_ENV = "MPAD_PHASES"
TARGETS = {
    "build": ("open_clip", "create_model"),
    "weights": ("open_clip.factory", "load_checkpoint"),
    "ensemble": ("mpad.prompts", "text_ensemble"),
    "features": ("mpad.features", "encode_batched"),
}


def timed(phase: str, function, calls: list):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            calls.append([phase, start, time.time()])

    return wrapper


def install(calls: list) -> None:
    """Replace each target function by its timed wrapper wherever a loaded module holds it (modules import
    them by name: `from mpad.features import encode_batched`)."""
    for phase, (module, name) in TARGETS.items():
        original = getattr(importlib.import_module(module), name)
        wrapper = timed(phase, original, calls)
        for loaded in list(sys.modules.values()):
            for attr, value in list(getattr(loaded, "__dict__", {}).items()):
                if value is original:
                    setattr(loaded, attr, wrapper)


def main() -> None:
    command = sys.argv[1]
    importlib.import_module(f"stages.{command}")
    record = {"pid": os.getpid(), "imported": time.time(), "calls": []}
    if command in ("synthesize", "train", "evaluate"):
        install(record["calls"])

    def write() -> None:
        if os.environ.get(PHASES_ENV):
            with open(os.environ[PHASES_ENV], "a") as out:
                out.write(json.dumps(record) + "\n")

    atexit.register(write)
    from stages.cli import app

    app(args=sys.argv[1:], prog_name="mpad")


if __name__ == "__main__":
    main()
