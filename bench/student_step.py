"""Benchmark: the `ours` student training epoch vs a bare forward+backward of the same student, in one run.

    python bench/student_step.py --device cuda --images 50000 --width 1 --batch 128

The pipeline side is `pipeline.train.train_one_epoch` with the Distiller (cached teacher features gathered by
sample id, four 1x1 projectors, feature MSE, detached head); the bare side is the student alone with
cross-entropy. Both use the same device-resident data, bf16 autocast and channels_last on a GPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import RecipeParams
from pipeline.data import DeviceData
from pipeline.distill import LossWeights
from pipeline.layers import layer_shapes
from pipeline.models import ModelSpec, build_model
from pipeline.student import TeacherTargets, build_distiller
from pipeline.train import autocast, make_optimizer, make_scheduler, prepare_model, train_one_epoch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_epoch(model, data: DeviceData, batch: int, device) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    synchronize(device)
    start = time.perf_counter()
    for _, x, y in data.batches(batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)):
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(device)
    return data.steps(batch, True) * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.images)
    data = DeviceData(images, labels, [0.5] * 3, [0.25] * 3, device)
    teacher_layers = [12, 13, 14, 15]
    shapes = layer_shapes(build_model(ModelSpec("resnet34", 10, 3, 32, args.width)), (3, 32, 32))
    teacher_shapes = [shapes[k] for k in teacher_layers]
    cached = [rng.standard_normal((args.images, *s), dtype=np.float32).astype(np.float16) for s in teacher_shapes]
    logits = rng.standard_normal((args.images, 10), dtype=np.float32)
    spec = ModelSpec("resnet9", 10, 3, 32, args.width)
    results = {}
    for name in ("bare", "ours", "bare", "ours"):  # alternate; keep the second (warm) figure of each
        torch.manual_seed(0)
        if name == "bare":
            results[name] = bare_epoch(prepare_model(build_model(spec), device), data, args.batch, device)
            continue
        distiller = prepare_model(build_distiller(spec, "ours", [1, 2, 3, 4], teacher_layers, teacher_shapes,
                                                  LossWeights(), args.batch, None), device)
        targets = TeacherTargets(teacher_layers, device, cached, logits)
        recipe = RecipeParams(epochs=1, batch_size=args.batch)
        opt = make_optimizer(distiller, recipe)
        sched = make_scheduler(opt, recipe, data.steps(args.batch, True))

        def step(model, ids, x, y):
            feats, t_logits = targets(ids, x)
            return model(x, y, feats, t_logits)

        synchronize(device)
        start = time.perf_counter()
        train_one_epoch(distiller, data, opt, sched, recipe, torch.Generator().manual_seed(0), step_loss=step)
        synchronize(device)
        results[name] = data.steps(args.batch, True) * args.batch / (time.perf_counter() - start)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"| {card} | torch {torch.__version__} | resnet9 x{args.width} | batch {args.batch} |")
    print(f"| bare student step | {results['bare']:,.0f} img/s |")
    print(f"| ours step (pipeline) | {results['ours']:,.0f} img/s | ratio {results['ours'] / results['bare']:.2f}x |")


if __name__ == "__main__":
    main()
