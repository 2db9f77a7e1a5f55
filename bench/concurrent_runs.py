"""Benchmark: experiment throughput: the same student runs one after another vs several at once on one device.

    python bench/concurrent_runs.py --params profiles/gpu.yaml --jobs 1,4 --runs 8 \
        -S prepare.train_subset=6000 -S student.train.epochs=10 -S prepare.root=.fmnist

Data, teacher, scores and cache are made once (not timed); then, for each concurrency, `--runs` fresh `ours`
students (seeds 0..runs-1, each with its probe, as `experiments/paper.py` runs them: stage commands, start-up
included). Prints runs per hour and the students' aggregate training throughput, the ratio to one at a time,
and the ratio to the reference implementation's logit-free student on an H200 run one after another (12,300
img/s at batch 128, issue 6; compare on that card and recipe only).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from paper import Runner, device_name  # noqa: E402
from paper_grid import Cell  # noqa: E402
from paper_table import describe, time_split  # noqa: E402

REFERENCE_IMG_S = 12_300


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=Path, default=Path("profiles/gpu.yaml"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/kd-concurrent"))
    ap.add_argument("--jobs", default="1,4", help="comma-separated concurrencies")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--method", default="ours")
    ap.add_argument("-S", "--set", action="append", default=[])
    args = ap.parse_args()
    cell = Cell("bench", "resnet9", "Q", (args.method,), (), {})
    prepared = Runner(args.params.resolve(), args.work, args.set, 1).prepare_cell(cell)
    print(f"{device_name()}, {args.runs} `{args.method}` runs per row, overrides {' '.join(args.set) or 'none'}")
    print("| runs at once | wall | runs/hour | student img/s | vs one at a time | vs reference | mean per run |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for jobs in (int(j) for j in args.jobs.split(",")):
        runner = Runner(args.params.resolve(), args.work, args.set, jobs)
        for seed in range(args.runs):  # fresh runs: nothing reused from an earlier invocation
            shutil.rmtree(runner.run_dir(cell, args.method, seed, f"-j{jobs}"), ignore_errors=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            entries = list(pool.map(lambda seed: runner.student_run(cell, prepared, args.method, seed, jobs, start,
                                                                    f"-j{jobs}"), range(args.runs)))
        wall = time.perf_counter() - start
        images = sum(e["train_seconds"] * e["train_img_per_s"] for e in entries)
        per_hour = args.runs * 3600 / wall
        base = base or per_hour
        splits = [time_split(e) for e in entries]
        mean = {part: sum(split[part] for split in splits) / len(splits) for part in splits[0]}
        print(f"| {jobs} | {wall:.0f} s | {per_hour:.0f} | {images / wall:,.0f} | {per_hour / base:.2f}x | "
              f"{images / wall / REFERENCE_IMG_S:.2f}x | {describe(mean)} |", flush=True)


if __name__ == "__main__":
    main()
