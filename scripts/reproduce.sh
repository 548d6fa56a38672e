#!/usr/bin/env bash
# The paper's grid-world figure for one environment: six methods (AD, DPT, IDT, each with and without DICP)
# over the config's split seeds, on one shared dataset. `make reproduce-darkroom` etc. call it.
#
#   scripts/reproduce.sh darkroom [--address auto] [--set key=value ...]
#   env: darkroom | darkroom_permuted | dark_key_to_door | darkroom_cpu | ... | ml1_<task>_cpu (tune_configs/<env>.yaml)
#   REPRODUCE_JOBS=2: two method pairs at a time; REPRODUCE_VARIANTS="ad": only those variants (default ad dpt idt)
#   REPRODUCE_STAGE=train: train every method's models and stop (e.g. Meta-World rows on a GPU box without MuJoCo,
#   scripts/device_reproduce.sh); the same command without it later evaluates them and writes the report
#
# Layout: runs/reproduce/<env>/data/dataset (collected once), runs/reproduce/<env>/<variant>_{dicp,base}/ (one
# `dicp-ray pipeline` per method pair, its dataset a link to the shared one), docs/results/<env>/ (report);
# REPRODUCE_OUT and REPORT_OUT move the runs and the report (e.g. for a reduced-scale trial run).
# With the world model (DICP-X) the pipeline evaluates modes plan (DICP-X) and policy ("X + world model, no
# planning"); without it (X) mode policy. Every step is resumable: re-run the same command after a failure and
# finished stages are skipped. Extra arguments go to every dicp-ray call (e.g. --address auto on a cluster, or
# --set train.models_per_process=5 to train all split seeds of a method in one process on one GPU).
set -euo pipefail
env_name=${1:?usage: scripts/reproduce.sh darkroom|darkroom_permuted|dark_key_to_door [dicp-ray args]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${DICP_RAY:-$root/.venv/bin/dicp-ray}
py=${PYTHON:-$root/.venv/bin/python}
base=$root/tune_configs/$env_name.yaml
out=${REPRODUCE_OUT:-$root/runs/reproduce}/$env_name
report=${REPORT_OUT:-$root/docs/results/$env_name}
[ -f "$base" ] || { echo "unknown env config $base" >&2; exit 2; }
case ${REPRODUCE_STAGE:=pipeline} in
  pipeline|train) export REPRODUCE_STAGE;;
  *) echo "REPRODUCE_STAGE must be pipeline (the default) or train, got '$REPRODUCE_STAGE'" >&2; exit 2;;
esac

"$bin" collect --config "$base" --output "$out/data" "$@"

# One method pair = one `dicp-ray pipeline`. REPRODUCE_JOBS=N runs N of the six at a time (each logs to
# <run>/pipeline.log; a finished one frees its slot for the next, so evaluation overlaps the next training).
run_method() {  # variant kind [dicp-ray args]
  local variant=$1 kind=$2 config=$base run modes wm
  shift 2
  # IDT's own settings (the grid worlds' lr) where the env has a file for them; ml1_*_cpu.yaml are IDT configs
  [ "$variant" = idt ] && [ -f "$root/tune_configs/reproduce/${env_name}_idt.yaml" ] \
    && config=$root/tune_configs/reproduce/${env_name}_idt.yaml
  run=$out/${variant}_$kind
  mkdir -p "$run" && ln -sfn ../data/dataset "$run/dataset"
  if [ "$kind" = dicp ]; then modes='[policy,plan]'; wm=true; else modes='[policy]'; wm=false; fi
  "$bin" "$REPRODUCE_STAGE" --config "$config" --output "$run" "$@" \
    --set model.variant=$variant model.world_model=$wm "eval.modes=$modes"
}
jobs=${REPRODUCE_JOBS:-1}
methods=$(for variant in ${REPRODUCE_VARIANTS:-ad dpt idt}; do echo "$variant dicp"; echo "$variant base"; done)
if [ "$jobs" -le 1 ]; then
  while read -r variant kind; do run_method "$variant" "$kind" "$@"; done <<< "$methods"
else
  export -f run_method; export bin base root env_name out
  # shellcheck disable=SC2016  # xargs appends "variant kind" after the dicp-ray args
  xargs -P "$jobs" -L 1 bash -c 'set -eo pipefail; v=${*: -2:1} k=${*: -1}; set -- "${@:1:$#-2}"; mkdir -p "$out/${v}_$k"
    echo "[$(date +%T)] start ${v}_$k"; run_method "$v" "$k" "$@" > "$out/${v}_$k/pipeline.log" 2>&1 \
    && echo "[$(date +%T)] done ${v}_$k" || { echo "[$(date +%T)] FAILED ${v}_$k: $out/${v}_$k/pipeline.log"; exit 255; }' \
    _ "$@" <<< "$methods"
fi

[ "$REPRODUCE_STAGE" = train ] && { echo "REPRODUCE_STAGE=train: models trained; the same command without it evaluates them and reports"; exit 0; }
label() { case $1 in ad) echo AD;; dpt) echo DPT;; idt) echo IDT;; esac; }
# Rows: X (no world model), DICP-X (planning), and the DICP checkpoint acting by its policy ("X + world model, no
# planning"), which separates what the world-model loss does from what planning does.
args=()
for variant in ${REPRODUCE_VARIANTS:-ad dpt idt}; do
  name=$(label $variant)
  args+=(--method "$name=$out/${variant}_base/eval/summary.json:policy"
         --method "DICP-$name=$out/${variant}_dicp/eval/summary.json:plan"
         --method "$name + world model, no planning=$out/${variant}_dicp/eval/summary.json:policy"
         --compare "DICP-$name" "$name" --compare "DICP-$name" "$name + world model, no planning")
done
notes=(--note "Command: scripts/reproduce.sh $env_name (config: tune_configs/$env_name.yaml, whose header gives the scale)."
       --note "This invocation's wall time: $((SECONDS / 60)) min $((SECONDS % 60)) s on $(nproc) CPU cores.")
"$py" -m dicp_ray.evaluate.report --out "$report" "${args[@]}" "${notes[@]}" ${REPORT_NOTE:+--note "$REPORT_NOTE"}
