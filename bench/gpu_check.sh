#!/usr/bin/env bash
# GPU readiness check: one run on the GPU machine (an H200: Python 3.12, torch 2.11, no network, no
# open_clip / dvc / dvclive), under 8 minutes. It
#   0. installs the carried wheels (.whl/, made by bench/gpu_wheels.sh) into a fresh --target folder and
#      puts it and this checkout on PYTHONPATH (no pip install of the project, no DVC: stages run directly);
#   a. runs the tests marked `cuda` (tests/test_cuda.py: same weights, LAA features and MPTS prompts on
#      cuda as on cpu; fp16 encoding close to fp32);
#   b. runs the offline preset (stripes, weave, disc) as cpu fp32, cuda fp32 and cuda fp16 projects at once
#      and compares metrics and anomaly maps with the cpu run (bench/offline_compare.py, tolerances there);
#   c. runs bench/fullscale.py (paper setting, random ViT-B-16-plus-240) on two categories on cuda.
# Logs and results go to $OUT (the device tool brings them back; 7 files), else ./gpu-check-out/.
# Exit status 0 only when every step passed; summary.txt lists each step's status and seconds.
#
# On the GPU, through the device tool, after `make gpu-wheels` (bench/gpu_wheels.sh) in the checkout the
# tool sends (the session's own, not a helper's worktree: these files must be in it):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# then give_back. 540 s leaves room under the 10-minute limit; the logs come back even on a timeout.
# Dry run on a CPU machine, same steps with tiny sizes (step a on the cpu through MPAD_CUDA_TEST_DEVICE;
# step b compares cpu fp32, cpu fp32 again (another process: its differences should be 0) and cpu bf16;
# step c on mpad-tiny with 5 steps):
#   DEVICE=cpu PYTHON=/path/to/python WHEELS=/path/to/wheels-for-that-python bench/gpu_check.sh
# `make gpu-dry` does that in a Python that sees only the GPU image's packages. HALF=fp32|bf16|fp16
# overrides the half precision of step b.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
LOGS=${OUT:-$PWD/gpu-check-out}
mkdir -p "$LOGS"
if [ "$DEVICE" = cuda ]; then
  HALF=${HALF:-fp16}; CONFIGS=cpu:fp32,cuda:fp32,cuda:$HALF; OFFLINE_SET=()
  FULLSCALE=(--fraction 0.2 --categories carpet,screw)  # 24 and 32 test images: more than one batch of 16
else
  export MPAD_CUDA_TEST_DEVICE=$DEVICE
  HALF=${HALF:-bf16}; CONFIGS=cpu:fp32,cpu:fp32,cpu:$HALF; OFFLINE_SET=(--set mpts.steps=10)
  FULLSCALE=(--fraction 0.02 --categories carpet,screw --set model.name=mpad-tiny --set laa.layers=2
             --set oagm.mask_layers=2 --set mpts.steps=5 --set evaluate.batch_size=2)
fi

SITE=$(mktemp -d /tmp/mpad-site.XXXXXX)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 2
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
: > "$LOGS/summary.txt"
status=0
step() {  # step NAME COMMAND...: run it, log to $LOGS/NAME.log, record its status and duration
  local name=$1 start=$SECONDS rc; shift
  echo "== $name: $*"
  "$@" > "$LOGS/$name.log" 2>&1; rc=$?
  tail -n 25 "$LOGS/$name.log"
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
  [ "$rc" = 0 ] || status=1
}

step env "$PY" -c "import sys, torch; from importlib.metadata import version as v
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '-')
print(*(f'{n} {v(n)}' for n in ('open_clip_torch', 'dvclive', 'dvc', 'typer', 'timm', 'numpy', 'scikit-image')))
import open_clip, dvclive; print(open_clip.__file__, dvclive.__file__)
from stages.cli import app; app(['--help'], standalone_mode=False)"
step tests "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step offline "$PY" bench/offline_compare.py --configs "$CONFIGS" "${OFFLINE_SET[@]}" \
  --out "$LOGS/offline.json"
step fullscale "$PY" bench/fullscale.py --device "$DEVICE" --precision fp32 "${FULLSCALE[@]}" --out "$LOGS/fullscale.json"
rm -rf "$SITE"
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED), $SECONDS s" | tee -a "$LOGS/summary.txt"
exit $status
