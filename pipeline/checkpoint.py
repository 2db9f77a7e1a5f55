"""Model checkpoints: weights plus everything needed to rebuild and trust them, read with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.io import atomic_path
from pipeline.models import ModelSpec, build_model

MODEL_FORMAT = "kd-model/1"


def save_torch(path: str | Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # how torch's writer reports e.g. a full disk
            raise OSError(f"writing {path} failed: {str(err).splitlines()[0]}") from None


def load_torch(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing checkpoint: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... on corrupt files
        raise InputError(f"corrupt or unreadable checkpoint {path}: {type(err).__name__}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} is not a checkpoint of this pipeline")
    return obj


def save_checkpoint(path: str | Path, fmt: str, module: nn.Module | None = None, **fields) -> None:
    """`fields` tagged with their format, plus `module`'s weights (on the CPU) as `state_dict`."""
    if module is not None:
        fields["state_dict"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    save_torch(path, {"format": fmt, **fields})


def load_checkpoint(path: str | Path, fmt: str, what: str) -> dict:
    """A checkpoint of format `fmt`, else one line saying the file holds no `what`."""
    ckpt = load_torch(path)
    if ckpt.get("format") != fmt:
        raise InputError(f"{path} is not a {what} checkpoint of this pipeline")
    return ckpt


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec, **info) -> None:
    save_checkpoint(path, MODEL_FORMAT, model, spec=spec.to_dict(), **info)


def load_model(path: str | Path) -> tuple[nn.Module, ModelSpec, dict]:
    """Rebuild the model of a checkpoint; return it (eval mode, CPU), its spec and the checkpoint's info."""
    ckpt = load_checkpoint(path, MODEL_FORMAT, "model")
    try:
        spec = ModelSpec(**{**ckpt["spec"], "pretrained": False})
        model = build_model(spec)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: malformed model description ({type(err).__name__}: {err})") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise InputError(f"{path}: weights do not fit {spec.arch}: {str(err).splitlines()[0]}") from None
    info = {k: v for k, v in ckpt.items() if k not in ("state_dict", "spec", "format")}
    return model.eval(), spec, info
