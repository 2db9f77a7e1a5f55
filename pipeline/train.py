"""Supervised training: optimiser and schedule recipes, one epoch, evaluation, and a resumable fit loop."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoint import load_torch, save_torch
from pipeline.config import RecipeParams
from pipeline import distributed
from pipeline.data import Augment, DeviceData
from pipeline.errors import InputError, TrainingError
from pipeline.layers import classifier_modules


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("device: cuda requested but no CUDA device is available")
        return torch.device("cuda", distributed.local_rank())
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on GPUs; plain fp32 on the CPU so CPU runs stay exactly reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """The training step's module under torch.compile (fixed shapes: training batches drop the last one).

    `cudagraphs` is dynamo's backend of that name: the traced step's aten kernels replayed as CUDA graphs, without
    inductor's code generation, whose warm-up (~40 s for a ResNet-34) can outweigh its fusions at small batches.
    """
    if mode == "none":
        return model
    if mode == "cudagraphs":
        return torch.compile(model, backend="cudagraphs")
    return torch.compile(model, mode=mode)


def uses_cuda_graphs(mode: str) -> bool:
    return mode in ("reduce-overhead", "cudagraphs")


def make_optimizer(model: nn.Module, recipe: RecipeParams) -> torch.optim.Optimizer:
    head = {id(p) for m in classifier_modules(model) for p in m.parameters()}  # the head's own group
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in head], "lr": recipe.lr * recipe.backbone_lr_scale},
              {"params": [p for p in params if id(p) in head], "lr": recipe.lr}]
    groups = [g for g in groups if g["params"]]
    fused = all(p.is_cuda for p in params)  # one kernel for the whole update instead of one per tensor
    if recipe.recipe == "sgd_multistep":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: RecipeParams, steps_per_epoch: int):
    """A scheduler stepped once per batch (OneCycle) or per epoch (MultiStep): see `per_batch`."""
    if recipe.recipe == "sgd_multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, recipe.milestones, recipe.gamma)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], epochs=recipe.epochs,
        steps_per_epoch=steps_per_epoch, pct_start=0.3, div_factor=25, final_div_factor=1e4,
        anneal_strategy="cos")


def per_batch(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


# A training step's loss: (model, sample ids, images, labels) -> (total loss, logits, named loss terms)
StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def cross_entropy_step(model: nn.Module, ids, x: torch.Tensor, y: torch.Tensor):
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    return loss, logits, {"ce": loss}


def train_one_epoch(model, data: DeviceData, optimizer, scheduler, recipe: RecipeParams,
                    generator: torch.Generator, on_step: Callable[[int], None] | None = None,
                    step_loss: StepLoss = cross_entropy_step) -> dict:
    """One pass over `data`; returns the mean of the loss and of each term, and accuracy (one host sync)."""
    model.train()
    device = data.device
    names, sums, correct, seen = [], None, None, 0  # sums: loss and terms times batch size, on the device
    augment = Augment() if recipe.augment else None
    graphs = uses_cuda_graphs(recipe.compile)
    for ids, x, y in data.batches(recipe.batch_size, shuffle=True, drop_last=True, generator=generator,
                                  augment=augment, shard=distributed.rank_and_world()):
        if graphs:  # the previous step's graph outputs are consumed: let the next replay overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device):
            loss, logits, terms = step_loss(model, ids, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if per_batch(scheduler):
            scheduler.step()
        # few kernels per step for the bookkeeping: at small batches a step is bound by kernel launches
        values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())])
        sums = values * len(y) if sums is None else sums.add_(values, alpha=len(y))
        hits = (logits.argmax(1) == y).sum()
        correct = hits if correct is None else correct.add_(hits)
        names, seen = ["loss", *terms], seen + len(y)
        if on_step:
            on_step(len(y))
    if not per_batch(scheduler):
        scheduler.step()
    if sums is None:
        raise InputError(f"no full batch of {recipe.batch_size} in {len(data)} samples")
    counts = torch.stack([correct.float(), torch.tensor(float(seen), device=device)])
    *totals, correct, seen = distributed.all_reduce_sum(torch.cat([sums, counts])).tolist()
    means = {name: value / max(seen, 1) for name, value in zip(names, totals)}
    bad = [name for name, value in means.items() if not math.isfinite(value)]
    if bad:
        raise TrainingError(f"non-finite training loss ({', '.join(bad)}); lower the learning rate")
    return {"train_loss": means.pop("loss"), "train_acc": correct / max(seen, 1),
            **{f"loss_{name}": value for name, value in means.items()}}


@torch.no_grad()
def predict_logits(model: nn.Module, data: DeviceData, batch_size: int) -> torch.Tensor:
    model.eval()
    out = []
    for _, x, _ in data.batches(batch_size):
        with autocast(data.device):
            out.append(model(x).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, batch_size: int) -> dict:
    """Top-1 accuracy and mean cross-entropy on every sample of `data` (no partial batch dropped)."""
    logits = predict_logits(model, data, batch_size)
    return {"test_loss": F.cross_entropy(logits, data.labels).item(),
            "test_acc": (logits.argmax(1) == data.labels).float().mean().item()}


@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)


def fit(model: nn.Module, train: DeviceData, test: DeviceData, recipe: RecipeParams, seed: int,
        resume_path: Path | None = None, resume_key: str = "",
        on_epoch_start: Callable[[int, int], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        step_loss: StepLoss = cross_entropy_step) -> FitState:
    """Train for `recipe.epochs`, evaluating after each epoch.

    With `resume_path`, a checkpoint is written atomically after the first epoch that ends `resume_every_s`
    seconds after the last one (0: every epoch), and a run started again with the same `resume_key` continues
    from it; each epoch draws its randomness from (seed, epoch), so a resumed run ends exactly where an
    uninterrupted one does (on the CPU).
    """
    optimizer = make_optimizer(model, recipe)
    steps = train.steps(recipe.batch_size, drop_last=True)
    if steps == 0:
        raise InputError(f"batch_size {recipe.batch_size} exceeds the {len(train)} training samples")
    world = distributed.rank_and_world()[1]
    if recipe.batch_size % world:
        raise InputError(f"batch_size {recipe.batch_size} (global) is not divisible by the {world} processes")
    # evaluation and checkpoints use `model` itself
    trained = compiled(distributed.wrap(model, recipe.sync_batchnorm), recipe.compile)
    scheduler = make_scheduler(optimizer, recipe, steps)
    state = _resumed(resume_path, resume_key, model, optimizer, scheduler)
    last_save = time.perf_counter()
    for epoch in range(state.epoch, recipe.epochs):
        if on_epoch_start:
            on_epoch_start(epoch, steps)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout and other in-model randomness
        start = time.perf_counter()
        row = {"epoch": epoch + 1,
               **train_one_epoch(trained, train, optimizer, scheduler, recipe, generator, on_step, step_loss)}
        row["seconds"] = time.perf_counter() - start
        row["img_per_s"] = steps * recipe.batch_size / row["seconds"]
        start = time.perf_counter()
        row.update(evaluate(model, test, recipe.eval_batch_size))
        row["eval_seconds"] = time.perf_counter() - start
        state.epoch, state.history = epoch + 1, state.history + [row]
        due = time.perf_counter() - last_save >= recipe.resume_every_s
        if resume_path is not None and distributed.is_main() and due:
            start = time.perf_counter()
            save_torch(resume_path, {"resume_key": resume_key, "epoch": state.epoch, "history": state.history,
                                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict()})
            last_save = time.perf_counter()
            row["checkpoint_seconds"] = last_save - start
        if on_epoch:
            on_epoch(row)
    return state


def _resumed(path: Path | None, key: str, model: nn.Module, optimizer, scheduler) -> FitState:
    """The state a resume checkpoint of this training (`key`) holds, loaded into the model, optimizer and
    scheduler; a fresh one where there is none (or one of another training)."""
    fix = f"delete the resume checkpoint {path} to train from the start"
    try:
        saved = load_torch(path) if path is not None and path.is_file() else {}
    except InputError as err:
        raise InputError(f"{err}: {fix}") from None
    if saved.get("resume_key") != key:
        return FitState()
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        return FitState(saved["epoch"], saved["history"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"{path} does not fit this training ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}): {fix}") from None


def summarise(history: list[dict]) -> dict:
    """Last-epoch (headline) and best-epoch test accuracy, kept apart."""
    best = max(history, key=lambda r: r["test_acc"])
    last = history[-1]
    return {"test_acc": last["test_acc"], "test_loss": last["test_loss"], "train_loss": last["train_loss"],
            "best_test_acc": best["test_acc"], "best_epoch": best["epoch"], "epochs": last["epoch"],
            "train_img_per_s": sum(r["img_per_s"] for r in history) / len(history),
            "train_seconds": sum(r["seconds"] for r in history),
            # rows resumed from older checkpoints have no eval_seconds; epochs without a save no checkpoint_seconds
            "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in history),
            "checkpoint_seconds": sum(r.get("checkpoint_seconds", 0.0) for r in history)}
