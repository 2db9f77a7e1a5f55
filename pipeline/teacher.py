"""Get a teacher: train one on the prepared data, or adopt a given checkpoint after checking it fits the data."""

from __future__ import annotations

import math
import time
from pathlib import Path

from torch import nn

from pipeline.checkpoint import load_model
from pipeline.config import ModelParams, TeacherParams
from pipeline.data import DeviceData, Prepared
from pipeline.errors import InputError
from pipeline.io import hash_obj, manifest_id, read_verified
from pipeline.models import ModelSpec, build_model
from pipeline.train import evaluate, fit, pick_device, prepare_model, summarise


def training_key(params: dict, data_id: str, **inputs: str) -> str:
    """Names one training: its recorded params, its data and other inputs' ids (e.g. a student's teacher); a
    resume checkpoint's key, a banked teacher's name."""
    return hash_obj({"params": params, "data": data_id, **inputs})


def spec_for(model: ModelParams, data: Prepared) -> ModelSpec:
    h, w, c = data.image_shape
    return ModelSpec(arch=model.arch, num_classes=data.num_classes, in_chans=c, image_size=h, width=model.width,
                     pretrained=model.pretrained, timm_kwargs=dict(model.timm_kwargs))


def device_splits(data: Prepared, device) -> tuple[DeviceData, DeviceData]:
    mean, std = data.meta["mean"], data.meta["std"]
    return (DeviceData(data.train_images, data.train_labels, mean, std, device),
            DeviceData(data.test_images, data.test_labels, mean, std, device))


def check_fits(spec: ModelSpec, data: Prepared, source: str) -> None:
    h, _, c = data.image_shape
    want = {"num_classes": data.num_classes, "in_chans": c, "image_size": h}
    for key, value in want.items():
        if getattr(spec, key) != value:
            raise InputError(f"{source}: {key} is {getattr(spec, key)}, the prepared data needs {value}")


def adopt_teacher(path: str | Path, data: Prepared, params: TeacherParams) -> tuple[nn.Module, ModelSpec, dict]:
    """Load a given checkpoint and measure it on the test split."""
    model, spec, _ = load_model(path)
    check_fits(spec, data, str(path))
    device = pick_device(params.device)
    model = prepare_model(model, device)
    _, test = device_splits(data, device)
    measured = evaluate(model, test, params.train.eval_batch_size)
    if not math.isfinite(measured["test_loss"]):
        raise InputError(f"{path}: the teacher's logits are not finite on the test split (NaN or inf weights?)")
    return model, spec, measured


def train_teacher(data: Prepared, params: TeacherParams, seed: int, resume_path: Path | None,
                  resume_key: str, **callbacks) -> tuple[nn.Module, ModelSpec, dict, list[dict]]:
    """The summary's `setup_seconds`: building the model and moving it and the data to the device."""
    import torch

    start = time.perf_counter()
    spec = spec_for(params.model, data)
    torch.manual_seed(seed)
    model = build_model(spec)
    device = pick_device(params.device)
    model = prepare_model(model, device)
    train, test = device_splits(data, device)
    setup_seconds = time.perf_counter() - start
    state = fit(model, train, test, params.train, seed, resume_path, resume_key, **callbacks)
    return model, spec, {**summarise(state.history), "setup_seconds": setup_seconds}, state.history


def load_teacher(teacher_dir: str | Path, data: Prepared) -> tuple[nn.Module, ModelSpec, str]:
    """The `teacher` stage's model, refused if its files changed or it was made from other data; with its id."""
    manifest = read_verified(teacher_dir, "teacher", {"data": data.data_id})
    model, spec, _ = load_model(Path(teacher_dir) / "model.pt")
    return model, spec, manifest_id(manifest)
