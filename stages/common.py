"""What every stage shares: reading params.yaml and failing with a message a user can act on."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
import yaml
from tqdm import tqdm

from mpad import config, layout, params_file
from mpad.data import DatasetError
from mpad.data.shots import load_shots
from mpad.io import FULL, NoSpaceError, bar_interval, disk_usage_of, require_space

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="Parameters file (DVC's params.yaml).")


def load_params(path: Path) -> dict[str, Any]:
    """Read the params file; a missing or malformed file is a clear error naming it."""
    if not path.is_file():
        fail(f"{path}: parameters file not found (run from the project root or pass --params)")
    try:
        params = params_file.parse_params(path.read_bytes())
    except config.ConfigError as err:
        fail(f"{path}: {err}")
    if not isinstance(params, dict):
        fail(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


def load_config(path: Path, *names: str) -> list[Any]:
    """The `mpad.config` objects of sections `names` of the params file, in that order; every bad value of
    them is reported (one line each) before the stage stops."""
    try:
        return config.load_sections(load_params(path), *names)
    except config.ConfigError as err:
        fail(problems(path, str(err).splitlines()))


def problems(path: Path, lines: list[str]) -> str:
    """`fail`'s message for the problems of the file `path`: one line, or the name then one line each."""
    return f"{path}: {lines[0]}" if len(lines) == 1 else f"{path}:\n  " + "\n  ".join(lines)


def fail(message: str) -> NoReturn:
    """Stop the stage with `message` on stderr and exit status 1 (no traceback: the message is the point)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


def disk_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` (a stage's main) with a full disk or quota ending in `fail`'s one line naming the path and the
    space it needs (mpad.io.NoSpaceError), instead of a traceback; under DVC, which removed the stage's
    outputs before running it, the line says how to get the previous ones back."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OSError as err:
            if err.errno not in FULL:
                raise
            fail(
                (str(err) if isinstance(err, NoSpaceError) else f"{err.filename}: {err.strerror} while writing it")
                + _under_dvc()
            )

    return run


def ensure_space(*outputs: Path, least: int = 1 << 20) -> None:
    """Before a stage's work: `fail` in one line when the filesystem of its outputs has less free space than
    twice their expected size (the new output is written beside the old one, then DVC copies it into its cache
    on the same disk, failing there with "No possible cache link types" when that copy does not fit). An
    output's expected size is the previous run's: its size now, or (DVC removed it before running the stage)
    the size dvc.lock records; at least `least` bytes."""
    sizes = [disk_usage_of(out) for out in outputs]
    if not all(sizes):
        locked = _locked_sizes()
        sizes = [size or locked.get(out, 0) for size, out in zip(sizes, outputs, strict=True)]
    try:
        needed = 2 * sum(max(size, least) for size in sizes)
        require_space(outputs[0], needed, "twice the previous run's outputs: the new ones and DVC's cache copy")
    except NoSpaceError as err:
        fail(str(err) + _under_dvc())


def _under_dvc() -> str:
    """What a full disk's line adds in a stage DVC runs: DVC removed the stage's outputs before running it."""
    return "; `dvc checkout` restores the previous outputs" if os.environ.get("DVC_STAGE") else ""


def _locked_sizes() -> dict[Path, int]:
    """{output path: its size} as dvc.lock records them (empty without a readable dvc.lock)."""
    try:
        lock = yaml.load(Path("dvc.lock").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return {}
    stages = lock.get("stages") if isinstance(lock, dict) else None
    outs = [out for stage in (stages or {}).values() if isinstance(stage, dict) for out in stage.get("outs") or []]
    return {Path(str(out.get("path"))): int(out.get("size") or 0) for out in outs if isinstance(out, dict)}


def warn(message: str, kind: str = "warning") -> None:
    """`kind: message` on stderr in yellow: something the user should know, that does not stop the stage."""
    typer.secho(f"{kind}: {message}", err=True, fg=typer.colors.YELLOW)


def read_shots(root: Path, category: str) -> list[tuple[str, Path]]:
    """(path relative to root, path) of each shot of `category` (`mpad.data.shots.load_shots`, checked
    against the sha256 recorded by `sample`); any problem stops the stage, naming the file."""
    try:
        return load_shots(layout.shots_file(category), root, category)
    except DatasetError as err:
        fail(f"{err} (run `mpad sample --category {category}`)")


TIMINGS_ENV = "MPAD_TIMINGS"


class StageProgress(tqdm):
    """The progress bar of a stage's main loop (tqdm). When the environment variable MPAD_TIMINGS names a
    file, closing the bar appends one JSON line there: {"desc", "unit", "n", "first", "first_n", "end", "pid"},
    where `first` is the wall-clock time of the first update (the first `first_n` items done: one batch in
    evaluate) and `end` of the close; where CUDA is in use, also "cuda_max_mib", the peak of memory allocated
    by torch on the current device. `bench/fullscale.py` splits each stage's time into a fixed cost and a
    per-item cost with it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("mininterval", bar_interval())
        self.first_update: float | None = None
        self.first_n: float = 0
        self.done: float = 0  # items done (a disabled tqdm does not count)
        self._timings = os.environ.get(TIMINGS_ENV)
        self._label = (str(kwargs.get("desc") or ""), str(kwargs.get("unit", "it")))
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        if self.first_update is None and n:
            self.first_update = time.time()
            self.first_n = n
        self.done += n or 0
        return super().update(n)

    def close(self) -> None:
        if self._timings and self.first_update is not None:
            line = {
                "desc": self._label[0],
                "unit": self._label[1],
                "n": self.done,
                "first": self.first_update,
                "first_n": self.first_n,
                "end": time.time(),
                "pid": os.getpid(),
            }
            torch = sys.modules.get("torch")  # never imported here: stages without a model stay torch-free
            if torch is not None and torch.cuda.is_initialized():
                line["cuda_max_mib"] = torch.cuda.max_memory_allocated() / 2**20
            with open(self._timings, "a") as out:
                out.write(json.dumps(line) + "\n")
            self._timings = None  # once, though tqdm may close twice
        super().close()
