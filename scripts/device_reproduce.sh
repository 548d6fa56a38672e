#!/usr/bin/env bash
# Rows of a scripts/reproduce.sh table on a bare GPU box without Ray: every stage on its local backend, training and
# evaluation on the GPU, one file back. Made for issue #23's Darkroom IDT split seeds 1-2 on a lent H200:
#   OUT=<dir> REPRODUCE_VARIANTS=idt REPRODUCE_JOBS=2 REPRODUCE_DATASET=.gpu_carry/darkroom_cpu_dataset.tar.xz \
#     scripts/device_reproduce.sh darkroom_cpu --set "env.split_seeds=[1,2]" train.models_per_process=2
#   scripts/device_reproduce.sh --smoke    # the same steps at tiny sizes on a CPU (make test runs it)
#   REPRODUCE_STAGE=train REPRODUCE_DATASET=... scripts/device_reproduce.sh ml1_push_cpu --set collect.backend=ray
#       Meta-World rows: the models only (the box has no MuJoCo to evaluate with); the carried dataset is complete,
#       so the collect stage returns at once and never starts Ray (collect.backend=ray only passes its check)
# Environment (besides scripts/reproduce.sh's REPRODUCE_VARIANTS and REPRODUCE_JOBS):
#   DEVICE             cuda (default when visible) or cpu
#   TRAIN_BUDGET_S     train.deadline_unix_s this many seconds after the start (default 330): a model stopped there
#                      is a checkpoint that a re-run (here or on the machine the results go to) continues
#   DEVICE_BUDGET_S    the reproduction is stopped this many seconds after the start (default 520); what it
#                      finished still comes back
#   REPRODUCE_DATASET  a .tar.xz of this env's dataset/ folder from the machine the results go to (made there by
#                      `tar cJf FILE -C runs/reproduce/ENV/data dataset`, ~3 MB for darkroom_cpu): unpacked in place of
#                      a collection, so the models train on the same bytes and that machine's `scripts/reproduce.sh`
#                      reuses them and their evaluations (the dataset's identity is in every checkpoint)
#   WORK               runs (default /tmp/dicp_device_reproduce)
# $OUT/runs.tgz holds every run directory of the env without the dataset's shards, each run's run.json, and all but
# each model's newest checkpoint; $OUT/device_reproduce.log is the console. Needs what scripts/device_env.sh says.
# Back on that machine: `tar xzf runs.tgz --skip-old-files -C runs/reproduce` (adds the box's models and evaluations
# beside what is there), then its `scripts/reproduce.sh ENV` reuses them and runs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:=runs/device_reproduce}" "${WORK:=/tmp/dicp_device_reproduce}/bin"
OUT=$(cd "$OUT" && pwd) WORK=$(cd "$WORK" && pwd)
# shellcheck source=scripts/device_env.sh
source scripts/device_env.sh
exec > >(tee "$OUT/device_reproduce.log") 2>&1
start=$(date +%s)
say() { echo "[device_reproduce $(date +%T) +$(( $(date +%s) - start ))s] $*"; }

if [ "${1:-}" = --smoke ]; then  # the Darkroom IDT pair at tiny sizes
  shift
  export REPRODUCE_VARIANTS=${REPRODUCE_VARIANTS:-idt} REPRODUCE_JOBS=${REPRODUCE_JOBS:-2}
  set -- smoke --set env.max_train_tasks=4 env.max_test_tasks=2 collect.env_steps_per_task=200 collect.num_streams=2 \
    train.num_steps=6 train.checkpoint_every_steps=3 train.log_every_steps=3 train.batch_size=8 \
    eval.num_episodes=2 plan.beam_width=2 plan.depth=2 "$@"
fi
env_name=${1:?usage: scripts/device_reproduce.sh ENV|--smoke [reproduce.sh args]}
shift
device=${DEVICE:-$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
printf '#!/bin/sh\nexec "%s" -m dicp_ray.cli "$@"\n' "$(command -v "$PYTHON")" > "$WORK/bin/dicp-ray"
chmod +x "$WORK/bin/dicp-ray"
export DICP_RAY=$WORK/bin/dicp-ray PYTHON REPRODUCE_OUT=$WORK/runs REPORT_OUT=$WORK/report
args=(--set collect.backend=local train.backend=local eval.backend=local "$@" --set "train.device=$device" "eval.device=$device"
      "train.deadline_unix_s=$(( start + ${TRAIN_BUDGET_S:-330} ))")
data=$REPRODUCE_OUT/$env_name/data
say "device $device; $env_name: ${REPRODUCE_VARIANTS:-ad dpt idt}; ${args[*]}"

if [ -n "${REPRODUCE_DATASET:-}" ]; then
  mkdir -p "$data" && "$PYTHON" -m tarfile -e "$REPRODUCE_DATASET" "$data"
  "$PYTHON" - "$data/dataset" <<'PY'
import sys
from dicp_ray.data.shards import read_manifest, shard_is_valid
bad = [t for t in read_manifest(sys.argv[1])["task_ids"] if not shard_is_valid(sys.argv[1], t)]
sys.exit(f"device_reproduce: shards of tasks {bad} do not match their sha256: the carried dataset is damaged" if bad else 0)
PY
  say "dataset unpacked from $REPRODUCE_DATASET; every shard matches its sha256"
fi

# The whole reproduction in its own process group, stopped at the budget; its children go with it. The watcher
# takes its sleep with it when it is stopped, so nothing holds the console's pipe open after the run.
budget=${DEVICE_BUDGET_S:-520}
setsid scripts/reproduce.sh "$env_name" "${args[@]}" &
pid=$!
( trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  left=$(( budget - ($(date +%s) - start) )); sleep "$(( left > 1 ? left : 1 ))" & nap=$!
  wait "$nap" && kill -TERM -- "-$pid" 2>/dev/null ) &
watcher=$!
rc=0; wait "$pid" || rc=$?
kill "$watcher" 2>/dev/null || true
[ "$(( $(date +%s) - start ))" -lt "$budget" ] || say "DEVICE_BUDGET_S ($budget s) reached: the reproduction was stopped"
say "reproduction exit $rc"

# Back: the run directories without the shards and with only each model's newest checkpoint; without each run's
# run.json (this box's config: cuda, local backends), so the machine they go to records its own on its next run.
cd "$REPRODUCE_OUT"
excludes=(--exclude "$env_name/data/dataset/shards" --exclude run.json --exclude timings.json --exclude .pipeline.lock)
while IFS= read -r ckpts; do
  for older in $(ls -d "$ckpts"/checkpoint_* 2>/dev/null | sort | head -n -1); do excludes+=(--exclude "$older"); done
done < <(find "$env_name" -type d -name checkpoints)
tar czf "$OUT/runs.tgz" "${excludes[@]}" "$env_name"
cd "$OLDPWD"
say "$OUT/runs.tgz: $(du -h "$OUT/runs.tgz" | cut -f1)"
find "$REPRODUCE_OUT/$env_name" -name summary.json -path '*/eval/*' | while read -r f; do say "$f"; done
exit "$rc"
