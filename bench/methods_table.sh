#!/usr/bin/env bash
# Every student method on the current params (after `dvc repro` has made data, teacher and scores):
# caches the layers all methods need into $OUT_DIR/cache, trains each method, prints a Markdown table.
#   bash bench/methods_table.sh [OUT_DIR] [extra -S overrides...]
set -euo pipefail
out=${1:-/tmp/kd-methods}; shift || true
methods=(ce vkd vkd_std base_fkd base_fkd_nokl base_fkd_all stl_seplin ours ours_ce ours_kl sp simkd semckd)
all=$(IFS=,; echo "${methods[*]}")
kd cache -S "methods=[$all]" --out "$out/cache" "$@"
for m in "${methods[@]}"; do
  kd student -S student.method="$m" --cache "$out/cache" --out "$out/$m" --metrics "$out/$m.json" \
    --live-dir "$out/live-$m" "$@" 2>/dev/null | tail -1
done
python3 - "$out" "${methods[@]}" <<'PY'
import json, sys
out, methods = sys.argv[1], sys.argv[2:]
print("| method | last-epoch top-1 (%) | best-epoch top-1 (%) | s/epoch |")
print("|---|---|---|---|")
for m in methods:
    d = json.load(open(f"{out}/{m}.json"))
    print(f"| {m} | {100 * d['test_acc']:.2f} | {100 * d['best_test_acc']:.2f} | {d['train_seconds'] / d['epochs']:.1f} |")
PY
