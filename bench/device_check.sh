#!/usr/bin/env bash
# One prepared call on a lent GPU machine (no dvc, no pydantic there): set-up, then one of
#   bash bench/device_check.sh bench        # ~4 min: step ratios per compile mode, score/cache, digest
#   bash bench/device_check.sh experiment   # ~9 min: the next chunk of experiments/paper.py, results to $OUT
#   bash bench/device_check.sh session      # ~9.5 min: an experiment chunk (BUDGET_S, 300 s), then `bench`
#                                           # in what is left of SESSION_S (570 s)
#   bash bench/device_check.sh pipeline [-S ...]   # the GPU profile end to end, `ours` only, stage times
#   bash bench/device_check.sh concurrency         # ~5 min: 8 short student runs one at a time vs 4 at once
# Here first: pydantic's wheels in .whl/ (see docs/BENCHMARKS.md) and Fashion-MNIST's .gz files in .fmnist/,
# both git-ignored and named in the call's carry.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
deadline=$((SECONDS + ${SESSION_S:-100000}))

bounded() {  # each benchmark on its own and inside the deadline: one failing does not hide the others
  local left=$((deadline - SECONDS))
  if ((left < 20)); then echo "SKIPPED (deadline): $*"; return; fi
  timeout "$left" "$@" 2>&1 | tee -a "$OUT/bench.log" || echo "FAILED: $*"
}

bench() {
  bounded python3 bench/train_step.py --device cuda --images 50000 --width 1 --batch 128 --compile none
  bounded python3 bench/train_step.py --device cuda --images 50000 --width 1 --batch 128 \
    --compile reduce-overhead --only student
  bounded python3 bench/score_cache.py --device cuda --images 50000 --width 1
  bounded python3 bench/digest.py --gb 2
}

experiment() {
  python3 experiments/paper.py run --work /tmp/paper --jobs "${JOBS:-4}" --budget-s "${BUDGET_S:-420}" \
    --drop-caches -S prepare.root="$PWD/.fmnist" 2>&1 | tee "$OUT/experiment.log" || echo FAILED
  tar czf "$OUT/results.tgz" experiments/results  # what finished comes back even after a failure (one file)
  python3 experiments/paper.py table
}

case ${1:-bench} in
  bench) bench ;;
  experiment) experiment ;;
  session)
    deadline=$((SECONDS + ${SESSION_S:-570}))
    BUDGET_S=${BUDGET_S:-300} experiment
    bench
    ;;
  concurrency)
    python3 bench/concurrent_runs.py --params profiles/gpu.yaml --jobs 1,4 --runs 8 -S prepare.root="$PWD/.fmnist" \
      -S prepare.train_subset=6000 -S teacher.train.epochs=2 -S student.train.epochs=10 || echo FAILED
    ;;
  pipeline)
    shift
    METHODS=ours bash bench/gpu_pipeline.sh profiles/gpu.yaml "$PWD/.fmnist" "$@" || echo FAILED
    cp stage_times.txt metrics/*.json "$OUT"/ 2>/dev/null || true
    ;;
esac
