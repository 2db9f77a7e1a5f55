#!/usr/bin/env bash
# The whole chain on one GPU with the stage commands called directly (no dvc there), timing each stage.
#   bash bench/gpu_pipeline.sh PARAMS FMNIST_DIR [extra -S overrides...]
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
extra=("$@")
rm -f stage_times.txt
stage prepare prepare
stage teacher teacher
stage score score
stage cache cache
stage student-ours student -S seed=0 -S student.method=ours --out runs/student-ours-s0 \
  --metrics metrics/student-ours-s0.json --live-dir dvclive/student-ours-s0
stage student-ce student -S seed=0 -S student.method=ce --out runs/student-ce-s0 \
  --metrics metrics/student-ce-s0.json --live-dir dvclive/student-ce-s0
stage probe probe -S seed=0 --student runs/student-ours-s0 --out runs/probe-ours-s0 --metrics metrics/probe-ours-s0.json
stage evaluate evaluate
stage export export
