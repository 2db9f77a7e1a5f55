#!/usr/bin/env bash
# The whole chain on one GPU with the stage commands called directly (no dvc there), timing each stage.
#   [METHODS="ours ce"] bash bench/gpu_pipeline.sh PARAMS FMNIST_DIR [extra -S overrides...]
set -euo pipefail
params=$1; fmnist=$2; shift 2
kd() { python3 -m stages.cli "$@"; }
stage() {
  local name=$1; shift
  local start=$(date +%s%N)
  kd "$@" -p "$params" -S prepare.root="$fmnist" "${extra[@]}"
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf 'STAGE %-14s %4d.%03d s\n' "$name" $((ms / 1000)) $((ms % 1000)) | tee -a stage_times.txt
}
methods=(${METHODS:-ours ce})
extra=("$@" -S "methods=[$(IFS=,; echo "${methods[*]}")]")
rm -f stage_times.txt
stage prepare prepare
stage teacher teacher
stage score score
stage cache cache
for m in "${methods[@]}"; do
  stage "student-$m" student -S seed=0 -S student.method="$m" --out "runs/student-$m-s0" \
    --metrics "metrics/student-$m-s0.json" --live-dir "dvclive/student-$m-s0"
  stage "probe-$m" probe -S seed=0 --student "runs/student-$m-s0" --out "runs/probe-$m-s0" \
    --metrics "metrics/probe-$m-s0.json"
done
stage evaluate evaluate
stage export export
