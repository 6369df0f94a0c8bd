"""`mpad check [-S key=value ...]`: validate every section of params.yaml before DVC reads it (`make run` and the
`mpad exp` commands run it first).

DVC expands dvc.yaml's matrices from params.yaml before any stage runs, so a value it cannot expand (e.g.
`dataset.categories: null`) stops DVC itself with its own error; and `dvc exp run -S key=value` writes the
value into params.yaml and removes the outputs of the stages it changes before any stage can refuse it. So
the overrides are applied here in memory, parsed as `dvc exp run -S` parses them (DVC's Hydra override
grammar: `-S mpts.lambda=true` is the boolean true; a sweep `-S shots.k=1,2` is checked at each of its
points), and nothing is written. With a fetched split (data/fingerprints), shots.k is checked against the
number of training images of each category. Exit status 1: params.yaml is wrong; 2: the file is right
and the overrides make it wrong (or cannot be parsed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from stages.common import PARAMS_OPTION, load_params, problems


def main(
    params: Path = PARAMS_OPTION,
    overrides: list[str] = typer.Option(
        [], "-S", "--set-param", help="An override as `dvc exp run -S` takes it (key=value), checked in memory."
    ),
) -> None:
    """Check every section of the params file, with the -S overrides applied in memory; one line per bad value."""
    base = load_params(params)
    where = f"{params} with -S {' -S '.join(overrides)}" if overrides else str(params)
    points = _with_overrides(base, overrides, params) if overrides else [base]
    for point in points:
        lines = _problems(point)
        if lines:  # exit 2 when the file alone is right: the arguments are wrong (a usage error)
            _stop(problems(Path(where), lines), 2 if overrides and not _problems(base) else 1)
    typer.echo(f"{where}: ok" + (f" ({len(points)} sweep points)" if len(points) > 1 else ""))


def _stop(message: str, code: int) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=code)


def _problems(params: dict[str, Any]) -> list[str]:
    """One line per bad value of params.yaml's values `params`."""
    from mpad.config import SECTIONS, ConfigError, load_sections

    try:
        sections = dict(zip(SECTIONS, load_sections(params, *SECTIONS), strict=True))
    except ConfigError as err:
        return str(err).splitlines()
    return _shots_beyond_split(sections["dataset"], sections["shots"])


def _with_overrides(base: dict[str, Any], overrides: list[str], params: Path) -> list[dict[str, Any]]:
    """params.yaml's values with the overrides applied as `dvc exp run -S` applies them (dvc.utils.hydra's
    apply_overrides, here on a copy), one mapping per point of a sweep; exit 2 with one line naming the
    override that names another file or cannot be parsed or applied."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.collections import to_omegaconf
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from omegaconf import OmegaConf

    for override in overrides:  # one at a time, so that the line names the culprit
        path, _, value = override.partition(":") if ":" in override.partition("=")[0] else ("", "", override)
        if path and Path(path) not in (Path("params.yaml"), params):
            _stop(f"-S {override}: names {path}, but mpad reads only {params}", 2)
        _refused(override, get_hydra_sweeps, {"params": [value]})  # parses it, and refuses what DVC refuses
    listed = [value for values in to_path_overrides(overrides).values() for value in values]
    points = []
    for sweep in get_hydra_sweeps({"params": listed}):
        config = OmegaConf.create(to_omegaconf(base), flags={"allow_objects": True})
        OmegaConf.set_struct(config, True)  # as DVC's: a key that is not in the file needs `+key=value`
        for parsed in to_hydra_overrides(sweep["params"]):
            _refused(parsed.input_line, ConfigLoaderImpl._apply_overrides_to_config, [parsed], config)
        points.append(OmegaConf.to_object(config))
    return points


def _refused(override: str, step: Callable[..., Any], *args: Any) -> None:
    """`step(*args)`; exit 2 with one line naming `override` when Hydra or OmegaConf refuses it."""
    from dvc.exceptions import DvcException
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        step(*args)
    except (DvcException, HydraException, OmegaConfBaseException, ValueError) as err:
        why = [str(e).strip().splitlines()[0].rstrip(".") for e in (err, err.__cause__) if e and str(e).strip()]
        _stop(f"-S {override}: {': '.join(why) or type(err).__name__} (`dvc exp run -S` refuses it too)", 2)


def _shots_beyond_split(dataset: Any, shots: Any) -> list[str]:
    """One line per category whose fetched training split (its data/fingerprints record, when fetch has run
    with this dataset.root) holds fewer images than shots.k: sample would fail there, inside a queued run."""
    from mpad import layout

    lines = []
    for category in dataset.categories:
        try:
            record = json.loads(layout.fingerprint_file(category, "train").read_text())
        except (OSError, ValueError):
            continue  # not fetched (or unreadable: fetch rewrites it): sample checks the split itself
        if not isinstance(record, dict) or (record.get("root"), record.get("category")) != (dataset.root, category):
            continue  # fetched for another dataset
        images = record.get("images")
        if isinstance(images, int) and shots.k > images:
            lines.append(
                f"shots.k = {shots.k}: category {category!r} has only {images} training image(s) "
                f"({layout.fingerprint_file(category, 'train')})"
            )
    return lines
