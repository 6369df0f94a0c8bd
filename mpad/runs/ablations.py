"""The ablation arms (presets/ablations.yaml) as experiments: {name: its `-S key=value` overrides}."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml


def override_text(key: str, value: Any) -> str:
    """`key=value` as `dvc exp run -S` reads it (YAML): booleans lower-case, lists in brackets."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def ablation_experiments(
    spec: Mapping[str, Any], given: Mapping[str, Any], seeds: Sequence[int] | None
) -> dict[str, dict[str, Any]]:
    """{experiment name: {key: value}} of every arm of `spec` (presets/ablations.yaml), in its order: the spec's
    settings, then `given` (the command's -S overrides), then the arm's own values; per seed s of `seeds`,
    `<arm>-s<s>` with each of the spec's seed_keys set to s (None: the arm's name, params.yaml's seeds)."""
    settings = {**spec["settings"], **given}
    out = {}
    for arm, own in spec["arms"].items():
        for seed in [None] if seeds is None else seeds:
            name = arm if seed is None else f"{arm}-s{seed}"
            out[name] = {**settings, **(own or {}), **({} if seed is None else dict.fromkeys(spec["seed_keys"], seed))}
    return out
