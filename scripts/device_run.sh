#!/usr/bin/env bash
# One prepared run on a bare GPU box (issue #25): facts, the GPU speed table, the paper-scale Darkroom comparison.
#   scripts/device_run.sh            # ~9 minutes on one GPU + 16 cores; results in $OUT (default runs/device)
#   scripts/device_run.sh --smoke    # the same steps at tiny sizes on a CPU, ~2-3 minutes
# Environment: PYTHON (default python3), OUT (results, 5 small files), WORK (dataset and checkpoints, default
# /tmp/dicp_device_work). Needs PyTorch, numpy, pyarrow, pyyaml, tqdm, tensorboard, matplotlib and gymnasium; no
# Ray, no MuJoCo. Without gymnasium it unpacks the wheels of `make gpu-wheels` from .gpu_wheels/ (see README,
# "Running on a GPU box without Ray"). Everything else: scripts/device_run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
# shellcheck source=scripts/device_env.sh
source scripts/device_env.sh
"$PYTHON" scripts/device_run.py --out "$OUT" "$@" 2>&1 | tee "$OUT/device_run.log"
exit "${PIPESTATUS[0]}"
