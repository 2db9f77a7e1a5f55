#!/usr/bin/env bash
# One prepared call on a lent GPU machine (no dvc, no pydantic there): set-up, then the given modes in order,
# all inside SESSION_S seconds (default 570, one call's worth):
#   bench        ~5 min: step ratios per compile mode, score/cache, digest
#   compile      ~1 min: the step ratios and warm-up under COMPILE (default cudagraphs) alone
#   pipeline     ~7 min: the GPU profile end to end, `ours` only (PIPELINE_SETS: extra -S overrides)
#   experiment   the next chunk of experiments/paper.py in what is left (or BUDGET_S), results to $OUT;
#                JOBS runs at once (default 4), CELLS: only these cells, in grid order (default: all),
#                EXPECT_S: seconds a run of a regime and student with none recorded yet takes (e.g. `full`'s first)
#   concurrency  ~5 min: 8 short student runs one at a time vs 4 and 8 at once
#   teachers     only send back the parts of the teachers trained here that earlier calls had no room for
#                (TEACHER_PARTS="3 4": these parts again, e.g. ones `teacher_bank.py collect` says are missing)
# e.g. SESSION_S=560 bash bench/device_check.sh pipeline experiment
# Here first: pydantic's wheels in .whl/ (see docs/BENCHMARKS.md) and Fashion-MNIST's .gz files in .fmnist/,
# both git-ignored and named in the call's carry. `experiment` restores the teachers in .teacher-bank/ (parts
# carried by earlier calls on this machine) and sends back the parts of those it trains, as room is left in $OUT;
# here: python experiments/teacher_bank.py collect <files_at> --bank .teacher-bank (docs/RESULTS.md).
set -euo pipefail
modes=("${@:-bench}")
for mode in "${modes[@]}"; do
  case $mode in
    bench | compile | pipeline | experiment | concurrency | teachers) ;;
    *) echo "unknown mode: $mode (bench, compile, pipeline, experiment, concurrency, teachers)" >&2; exit 2 ;;
  esac
done
deadline=$((SECONDS + ${SESSION_S:-570}))  # from the start: the set-up below counts against the call too
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fmnist=$PWD/.fmnist

bounded() {  # each command on its own and inside the deadline: one failing does not hide the others
  local left=$((deadline - SECONDS))
  if ((left < 20)); then echo "SKIPPED (deadline): $*"; return; fi
  timeout "$left" "$@" 2>&1 | tee -a "$OUT/run.log" || echo "FAILED: $*"
}

steps() {
  bounded python3 bench/train_step.py --device cuda --images 50000 --width 1 --batch 128 --compile "$1" "${@:2}"
}

compile() {
  steps "${COMPILE:-cudagraphs}" --repeats 1
}

bench() {
  steps none,reduce-overhead,cudagraphs
  bounded python3 bench/score_cache.py --device cuda --images 50000 --width 1
  bounded python3 bench/digest.py --gb 2
}

pipeline() {
  # shellcheck disable=SC2086  # PIPELINE_SETS splits into words, e.g. "-S teacher.train.compile=cudagraphs"
  METHODS=ours bounded bash bench/gpu_pipeline.sh profiles/gpu.yaml "$fmnist" ${PIPELINE_SETS:-}
  tar czf "$OUT/pipeline.tgz" stage_times.txt metrics 2>/dev/null || true
}

experiment() {
  local bank=()
  [[ -d .teacher-bank ]] && bank=(--teacher-bank .teacher-bank)
  bounded python3 experiments/paper.py run --work /tmp/paper --jobs "${JOBS:-4}" "${bank[@]}" \
    --budget-s "${BUDGET_S:-$((deadline - SECONDS - 60))}" ${EXPECT_S:+--expect-s $EXPECT_S} --drop-caches \
    -S prepare.root="$fmnist" ${CELLS:+--cells $CELLS}
  tar czf "$OUT/results.tgz" experiments/results  # what finished comes back even after a failure (one file)
  teachers
  python3 experiments/paper.py table
}

teachers() {  # within what may come back: 8 files, 64 MiB (a margin left for the logs that still grow)
  local used files
  used=$(du -sm "$OUT" | cut -f1)
  files=$(find "$OUT" -type f | wc -l)
  # shellcheck disable=SC2086  # TEACHER_PARTS splits into indices
  python3 experiments/teacher_bank.py send --work /tmp/paper --out "$OUT" ${TEACHER_PARTS:+--only $TEACHER_PARTS} \
    --max-mib $((58 - used)) --max-files $((7 - files)) 2>&1 | tee -a "$OUT/run.log" || echo "FAILED: sending teachers"
}

concurrency() {
  bounded python3 bench/concurrent_runs.py --params profiles/gpu.yaml --jobs 1,4,8 --runs 8 \
    -S prepare.root="$fmnist" -S prepare.train_subset=6000 -S teacher.train.epochs=2 -S student.train.epochs=10
}

for mode in "${modes[@]}"; do "$mode"; done
