"""`mpad exp run|offline|sweep|ablations|compare`: the pipeline's runs, sweeps and ablations (mpad.runs.dispatch),
on this machine or with `--cluster ADDRESS` on a Ray cluster. The Makefile's run, offline, sweep, ablations and
compare targets call these."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

HELP = "Runs, sweeps and ablations, here or on a Ray cluster."
app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP)


@app.callback()
def _venv_first_on_path() -> None:
    """`dvc` and the stages' `mpad` from this interpreter's environment, also when the venv is not activated
    (`.venv/bin/mpad exp ...`), as the Makefile's PATH does."""
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


JOBS = typer.Option("1", "--jobs", "-j", help="Categories' units or experiments at once (JOBS).")
CLUSTER = typer.Option(None, "--cluster", help="Ray address (auto, HOST:PORT, ray://HOST:10001) (CLUSTER).")
SETS = typer.Option([], "--set", "-S", metavar="KEY=VALUE", help="A params override, as dvc exp run -S.")
PRESET = typer.Option(None, "--preset", help="presets/NAME.txt's overrides for every experiment (PRESET).")
SHOTS = typer.Option("1,2,4", "--shots", help="shots.k values, e.g. 1,2,4 (SHOTS).")
SEEDS = typer.Option(None, "--seeds", help="Seeds, e.g. 0,1,2 (SEEDS).")


def _exit(command: str, **kwargs) -> None:
    from mpad.runs.dispatch import dispatch

    raise typer.Exit(dispatch(command, Path.cwd(), **kwargs))


@app.command()
def run(jobs: str = JOBS, cluster: str = CLUSTER, sets: list[str] = SETS) -> None:
    """The pipeline on params.yaml (with -S written to it): `dvc repro`, or per-category units on JOBS workers."""
    _exit("run", jobs=jobs, cluster=cluster, sets=sets)


@app.command()
def offline(jobs: str = JOBS, cluster: str = CLUSTER, sets: list[str] = SETS) -> None:
    """The offline preset (presets/offline.txt) as the experiment `offline`; prints metrics.md."""
    _exit("offline", jobs=jobs, cluster=cluster, sets=sets)


@app.command()
def sweep(
    jobs: str = JOBS,
    cluster: str = CLUSTER,
    sets: list[str] = SETS,
    preset: str = PRESET,
    shots: str = SHOTS,
    seeds: str = SEEDS,
) -> None:
    """shots.k x shots.seed (default seeds 0,1,2) as experiments, those without a run; writes sweep.md/sweep.json."""
    _exit("sweep", jobs=jobs, cluster=cluster, sets=sets, preset=preset, shots=shots, seeds=seeds)


@app.command()
def ablations(
    jobs: str = JOBS, cluster: str = CLUSTER, sets: list[str] = SETS, preset: str = PRESET, seeds: str = SEEDS
) -> None:
    """The arms of presets/ablations.yaml (per seed: <arm>-s<seed>) as experiments, those without a run; compares."""
    _exit("ablations", jobs=jobs, cluster=cluster, sets=sets, preset=preset, seeds=seeds)


@app.command()
def compare() -> None:
    """Experiments x the params that differ between them x mean metrics, under 120 characters a line."""
    from mpad.runs.dispatch import compare as show

    raise typer.Exit(show(Path.cwd()))
