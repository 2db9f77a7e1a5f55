"""Benchmark: onnxruntime (CPU) vs torch eager (CPU) on an exported student, at batch 1 and 256, in one run.

    python bench/onnx_vs_torch.py --model models/export/model.onnx --runs runs/student-ours-s0 --data data/prepared
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import onnxruntime as ort
import torch

from pipeline.data import load_prepared
from pipeline.export import Deployable
from pipeline.student import load_student_dir


def throughput(fn, images: np.ndarray, batch: int, seconds: float = 3.0) -> float:
    fn(images[:batch])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for s in range(0, len(images) - batch + 1, batch):
            fn(images[s:s + batch])
            done += batch
            if time.perf_counter() - start >= seconds:
                break
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/export/model.onnx")
    ap.add_argument("--runs", default="runs/student-ours-s0")
    ap.add_argument("--data", default="data/prepared")
    args = ap.parse_args()
    data = load_prepared(args.data)
    distiller, spec, _ = load_student_dir(args.runs, data)
    model = Deployable(distiller, data.meta["mean"], data.meta["std"]).eval()
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    images = np.ascontiguousarray(data.test_images[:2048])

    @torch.no_grad()
    def eager(x):
        return model(torch.from_numpy(x))

    def onnx(x):
        return session.run(["logits"], {"images": x})

    print(f"| machine | {platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch "
          f"{torch.__version__}, onnxruntime {ort.__version__} | {spec.arch} x{spec.width} |")
    print("| batch | torch eager img/s | onnxruntime img/s | ratio |")
    for batch in (1, 256):
        t, o = throughput(eager, images, batch), throughput(onnx, images, batch)
        print(f"| {batch} | {t:,.0f} | {o:,.0f} | {o / t:.2f}x |")


if __name__ == "__main__":
    main()
