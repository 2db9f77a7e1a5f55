"""Benchmark: teacher features (cached to disk, or kept on the device) vs a bare bf16 teacher forward, and scoring
every layer (one run, one card).

    python bench/score_cache.py --device cuda --images 50000 --width 1

Prints throughputs and their ratio to the bare forward: `write_cache` (the cache stage: features gathered, then
written and digested) and `gather_features` alone (what a student with `teacher_features: device` does at
start); the scoring time for all generalized layers; peak host memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch

from pipeline.cache import gather_features, write_cache
from pipeline.data import DeviceData, Prepared
from pipeline.models import ModelSpec, build_model
from pipeline.scoring import score_layers
from pipeline.train import autocast, prepare_model


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bare_forward(model, data: DeviceData, batch: int, device) -> float:
    model.eval()
    for _, x, _ in data.batches(batch):  # warm-up pass
        with autocast(device):
            model(x)
    synchronize(device)
    start = time.perf_counter()
    for _, x, _ in data.batches(batch):
        with autocast(device):
            model(x)
    synchronize(device)
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--arch", default="resnet34")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--layers", default="12,13,14,15")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--score-images", type=int, default=5000)
    args = ap.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    labels = np.arange(args.images) % 10
    images = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    data = Prepared(images, labels, images[:1000], labels[:1000],
                    {"num_classes": 10, "image_shape": [32, 32, 3], "mean": [0.5] * 3, "std": [0.25] * 3}, "bench")
    torch.manual_seed(0)
    model = prepare_model(build_model(ModelSpec(args.arch, 10, 3, 32, args.width)), device)
    split = DeviceData(images, labels, [0.5] * 3, [0.25] * 3, device)
    bare = bare_forward(model, split, args.batch, device)
    layers = [int(k) for k in args.layers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        write_cache(model, Prepared(images[:2000], labels[:2000], images[:10], labels[:10], data.meta, "w"),
                    layers, device, args.batch, tmp)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        write_cache(model, data, layers, device, args.batch, tmp)
        cache = args.images / (time.perf_counter() - start)
    start = time.perf_counter()
    buffers = gather_features(model, data, layers, device, args.batch, channel_stats=False)[0]  # as `align: none`
    synchronize(device)
    on_device = args.images / (time.perf_counter() - start)
    where = next(iter(buffers.values())).device
    del buffers
    score_data = Prepared(images[:args.score_images], labels[:args.score_images], images[:10], labels[:10],
                          data.meta, "s")
    start = time.perf_counter()
    rows = score_layers(model, score_data, device, "reference", args.score_images, 500, 0, args.batch,
                        torch.float32)
    score_s = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"| device | {name} | torch {torch.__version__} |")
    print(f"| bare bf16 forward ({args.arch} x{args.width}, batch {args.batch}) | {bare:,.0f} img/s |")
    print(f"| cache layers {layers} ({args.images} images) | {cache:,.0f} img/s | ratio {cache / bare:.2f}x |")
    print(f"| same features kept on {where}, no channel statistics | {on_device:,.0f} img/s | "
          f"ratio {on_device / bare:.2f}x |")
    print(f"| score {len(rows)} layers on {args.score_images} images | {score_s:.1f} s |")
    print(f"| peak host memory (RSS) | {peak_gb:.2f} GB |")


if __name__ == "__main__":
    main()
