"""Stage `train`: learn the category's prompts with MPTS (paper sec. 3.3) on the synthesized images.

Reads params sections `model`, `laa`, `prompts`, `mpts`, `memory` and the synthesized set
`data/synth/<category>/` (plus, with `memory.enabled`, the shots of `data/shots/<category>.json` under
`dataset.root`, whose patch features become the visual memory saved with the prompts); writes
`data/prompts/<category>.pt` and logs per-step training curves with dvclive to `dvclive/train/<category>`
(no DVC experiment, no dvc.yaml of its own: DVC runs this stage); the curves replace the previous ones only
when the run succeeds (under `dvc repro`, DVC itself has already removed the declared `plots/metrics` folder
before the stage runs). The work is `mpad.training`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from dvclive import Live

from mpad import layout
from mpad.clip import ClipBundle, ModelLoadError, load_clip
from mpad.config import RANDOM_WEIGHTS_NOTE, LaaConfig, MemoryConfig, ModelConfig, MptsConfig
from mpad.data import DatasetError, load_image
from mpad.io import atomic_path
from mpad.synth_set import SynthSetError, read_synth_set
from mpad.text_cache import TextCache
from mpad.training import learn_prompts, learned_file, seed_everything, shot_memory
from stages.common import PARAMS_OPTION, StageProgress, ensure_space, fail, load_config, read_shots


def main(
    category: str = typer.Option(..., "--category", help="Category to train prompts for."), params: Path = PARAMS_OPTION
) -> None:
    """Learn the normal / anomaly prompts of CATEGORY with MPTS on its synthesized images."""
    model, laa, prompts, mpts, memory = load_config(params, "model", "laa", "prompts", "mpts", "memory")
    ensure_space(layout.prompts_file(category), layout.train_curves_dir(category))  # before minutes of training
    try:
        images, masks, _ = read_synth_set(layout.synth_dir(category))
    except SynthSetError as err:
        fail(f"{err} (run the synthesize stage first: dvc repro)")
    seed_everything(mpts.seed)  # global generators too, for anything in torch / numpy that draws from them
    bundle = _load_model(model)
    # The memory first: a value the model bounds (memory.layers beyond its depth) stops the stage before any
    # optimiser step, as laa.layers does.
    bank = _memory(bundle, laa, memory, category, params) if memory.enabled else None
    # dvclive empties its folder on start: log into a temporary one, renamed into place only once the
    # prompts are saved, so a failed run leaves the previous curves as they were.
    with atomic_path(layout.train_curves_dir(category)) as curves:
        with (
            Live(dir=str(curves), save_dvc_exp=False, dvcyaml=None) as live,
            StageProgress(total=mpts.meta_epochs * mpts.steps, desc=f"train {category}", unit="step") as bar,
        ):
            live.log_params({"category": category, **_mpts_params(mpts)})
            try:
                learned = learn_prompts(
                    bundle,
                    category,
                    images,
                    masks,
                    laa,
                    prompts,
                    mpts,
                    _logger(live, bar),
                    TextCache.for_bundle(bundle),
                )
            except ValueError as err:  # settings the model cannot take, e.g. laa.layers beyond its depth
                fail(str(err))
        out = layout.prompts_file(category)
        learned_file(bundle, category, learned, laa, prompts, mpts, bank).save(out)
    steps = sum(learned.result.round_steps)
    typer.echo(f"{category}: {steps} optimiser steps, final loss {learned.result.final_loss:.4f} -> {out}")


def _load_model(model: ModelConfig) -> ClipBundle:
    try:
        bundle = load_clip(model.name, model.pretrained, model.device, model.precision)
    except (ModelLoadError, ValueError) as err:
        fail(str(err))
    if bundle.random_weights:
        typer.secho(f"note: {RANDOM_WEIGHTS_NOTE}", err=True, fg=typer.colors.YELLOW)
    return bundle


def _mpts_params(mpts: MptsConfig) -> dict[str, Any]:
    """mpts.<params key> -> value, for dvclive's params.yaml."""
    return {f"mpts.{key}": value for key, value in mpts.params().items()}


def _logger(live: Live, bar: StageProgress) -> Callable[[dict[str, float]], None]:
    """on_step: one dvclive step per MPTS step (running calibrated fraction) and one tick of the bar."""
    calibrated = 0

    def on_step(record: dict[str, float]) -> None:
        nonlocal calibrated
        calibrated += record["calibrated"]
        for key in ("loss_ano", "loss_div", "cos"):
            live.log_metric(key, record[key])
        live.log_metric("calibrated_fraction", calibrated / (record["step"] + 1))
        live.log_metric("meta_epoch", record["meta_epoch"], plot=False)
        live.next_step()
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss_ano']:.4f}", round=record["meta_epoch"])

    return on_step


def _memory(bundle: ClipBundle, laa: LaaConfig, memory: MemoryConfig, category: str, params: Path) -> dict:
    """The visual memory record of the category's shots (memory.enabled)."""
    (dataset,) = load_config(params, "dataset")
    shots = read_shots(dataset.path, category)
    try:
        return shot_memory(bundle, laa, memory, [load_image(path) for _, path in shots])
    except (DatasetError, ValueError) as err:
        fail(f"memory branch: {err}")
