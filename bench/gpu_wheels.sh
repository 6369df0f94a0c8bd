#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into a git-ignored folder (default .whl/), for
# bench/gpu_check.sh. That machine (Python 3.12, torch 2.11, timm, typer, scikit-image, pyyaml, requests,
# fsspec, psutil, ... : see /work/.library/device/KINDS.md) has no network, no open_clip and no dvc/dvclive.
# The list is what `import open_clip, dvclive` and the train stage's `dvclive.Live(dir=...,
# save_dvc_exp=False, dvcyaml=None)` import beyond that machine's packages (dvclive imports dvc's core
# even when it saves no experiment), pinned to the project venv's versions (`.venv/bin/pip freeze`).
# Each was found needed by leaving it out in a Python that sees only the GPU's packages (bench/gpu_like_env.py):
# orjson, also imported by dvc when present, is optional.
# Usage: bench/gpu_wheels.sh [DEST=.whl] [PYTHON_VERSION=3.12]
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
WHEELS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  dvclive==3.49.1 dvc==3.67.1 dvc-data==3.18.3 dvc-objects==5.2.0 dvc-http==2.32.0 dvc-render==1.0.2
  dvc-studio-client==0.23.0 scmrepo==3.6.2 dulwich==1.2.21 funcy==2.1 ruamel.yaml==0.19.1
  diskcache==5.6.3 dpath==2.2.0 flatten-dict==0.5.0 flufl.lock==9.2.0 atpublic==9.0.0
  pygtrie==2.6.2 sqltrie==0.11.3 voluptuous==0.16.0 zc.lockfile==4.0
)
mkdir -p "$dest"
pip=${PIP:-python3 -m pip}
$pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${WHEELS[@]}"
ls "$dest"
du -sh "$dest"
