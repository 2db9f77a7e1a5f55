"""Benchmark: pipeline training steps vs bare models on the same card, side by side in one run.

    python bench/train_step.py --device cuda --images 50000 --width 1 --batch 128 \
        --compile none,reduce-overhead,cudagraphs

For each compile mode: a bare ResNet-9 (cross-entropy, fused AdamW) vs the `ours` student epoch of
`pipeline.train.train_one_epoch` (cached float16 teacher features of ResNet-34 layers 12-15 gathered by sample
id, four 1x1 projectors, feature MSE, detached head); and a bare ResNet-34 vs the teacher's epoch (the same
`train_one_epoch` with cross-entropy). Both sides use the same device-resident data, bf16 autocast and
channels_last on a GPU. Each side runs a warm-up epoch (compilation, graph capture), then --repeats timed epochs
alternating with the other side's (the best of each counts); "warm-up" is the pipeline side's first epoch less its
best one: what compilation costs a run once. In eager mode one more epoch counts the aten
operations dispatched per step: about one kernel launch each, so their ratio predicts the speed ratio where a
small-batch step is bound by launches, and it does not vary from run to run (on CPUs the optimizer is not fused,
so the counts there are higher than on a GPU).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import RecipeParams
from pipeline.data import DeviceData
from pipeline.distill import LossWeights
from pipeline.layers import layer_shapes
from pipeline.models import ModelSpec, build_model
from pipeline.student import build_distiller
from pipeline.targets import CachedTargets
from pipeline.train import (autocast, compiled, cross_entropy_step, make_optimizer, make_scheduler, prepare_model,
                            train_one_epoch, uses_cuda_graphs)

TEACHER_LAYERS = [12, 13, 14, 15]


def timed(device, run) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bare_trainer(model, data: DeviceData, batch: int, mode: str):
    """The plainest loop: no scheduler, no metrics, no callbacks. Returns a function running one epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=data.device.type == "cuda" or None)
    step = compiled(model, mode)

    def epoch():
        model.train()
        for _, x, y in data.batches(batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)):
            if uses_cuda_graphs(mode):
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(data.device):
                loss = F.cross_entropy(step(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return epoch


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched: in eager mode about one kernel launch each."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(epoch, steps: int) -> float:
    with CountOps() as counter:
        epoch()
    return counter.count / steps


def pipeline_trainer(model, data: DeviceData, batch: int, mode: str, step_loss, epochs: int):
    recipe = RecipeParams(epochs=epochs, batch_size=batch, compile=mode)  # OneCycle refuses steps beyond its length
    opt = make_optimizer(model, recipe)
    sched = make_scheduler(opt, recipe, data.steps(batch, True))
    step = compiled(model, mode)
    return lambda: train_one_epoch(step, data, opt, sched, recipe, torch.Generator().manual_seed(0),
                                   step_loss=step_loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compile", default="none", help="comma-separated train.compile modes")
    ap.add_argument("--only", default="student,teacher")
    ap.add_argument("--repeats", type=int, default=2, help="timed epochs per side, alternating; the best counts")
    args = ap.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    data = DeviceData(images, rng.integers(0, 10, size=args.images), [0.5] * 3, [0.25] * 3, device)
    student, teacher = (ModelSpec(arch, 10, 3, 32, args.width) for arch in ("resnet9", "resnet34"))
    shapes = layer_shapes(build_model(teacher), (3, 32, 32))
    teacher_shapes = [shapes[k] for k in TEACHER_LAYERS]
    cached = [rng.standard_normal((args.images, *s), dtype=np.float32).astype(np.float16) for s in teacher_shapes]
    targets = CachedTargets(TEACHER_LAYERS, cached, rng.standard_normal((args.images, 10), np.float32), device)

    def ours_step(model, ids, x, y):
        feats, logits = targets(ids, x)
        return model(x, y, feats, logits)

    def ours_model():
        return build_distiller(student, "ours", [1, 2, 3, 4], TEACHER_LAYERS, teacher_shapes, LossWeights(),
                               args.batch, None)

    pairs = {"student": (student, ours_model, ours_step), "teacher": (teacher, lambda: build_model(teacher),
                                                                      cross_entropy_step)}
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{card}, torch {torch.__version__}, width x{args.width}, batch {args.batch}, {args.images} images")
    print("| step | compile | bare img/s | pipeline img/s | ratio | warm-up | ops/step bare, pipeline |")
    print("|---|---|---|---|---|---|---|")
    images_per_epoch = data.steps(args.batch, True) * args.batch
    for mode in args.compile.split(","):
        for name in args.only.split(","):
            spec, build, step_loss = pairs[name]
            torch.manual_seed(0)
            trainers = {"bare": bare_trainer(prepare_model(build_model(spec), device), data, args.batch, mode),
                        "pipeline": pipeline_trainer(prepare_model(build(), device), data, args.batch, mode,
                                                     step_loss, epochs=args.repeats + 2)}  # + warm-up, count
            first = {side: timed(device, epoch) for side, epoch in trainers.items()}  # compilation, graph capture
            seconds = {side: float("inf") for side in trainers}
            for _ in range(args.repeats):  # alternating, best of each: neither side gets the warmer card
                for side, epoch in trainers.items():
                    seconds[side] = min(seconds[side], timed(device, epoch))
            speed = {side: images_per_epoch / s for side, s in seconds.items()}
            ops = "–"  # compiled steps are not dispatched op by op
            if mode == "none":
                steps = data.steps(args.batch, True)
                ops = ", ".join(f"{ops_per_step(epoch, steps):.0f}" for epoch in trainers.values())
            label = "ours student" if name == "student" else "teacher"
            warm_up = first["pipeline"] - seconds["pipeline"]
            print(f"| {label} | {mode} | {speed['bare']:,.0f} | {speed['pipeline']:,.0f} | "
                  f"{speed['pipeline'] / speed['bare']:.2f}x | {warm_up:.1f} s | {ops} |", flush=True)


if __name__ == "__main__":
    main()
