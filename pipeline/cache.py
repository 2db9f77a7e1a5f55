"""Teacher-feature cache: one float16 .npy per selected layer for the whole training split, indexed by sample id."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.data import DeviceData, Prepared
from pipeline.errors import InputError
from pipeline.features import extract, features_and_logits
from pipeline.io import read_verified, save_npy
from pipeline.train import autocast

DTYPE = np.float16


LOGITS = "logits.npy"


def layer_file(layer: int) -> str:
    return f"layer_{layer}.npy"


class ChannelStats:
    """Running per-channel mean and std (float64) of features; channels are dim 1, or the last dim of tokens."""

    def __init__(self):
        self.sum = self.sq = None
        self.count = 0

    def update(self, f: torch.Tensor) -> None:
        # float32 sums per batch (no float64 copy, no transposed copy: 2.5x faster on the CPU), float64 across them
        channel = f.dim() - 1 if f.dim() == 3 else 1
        dims = tuple(d for d in range(f.dim()) if d != channel)
        f = f.float()
        s, q = f.sum(dims).double(), f.square().sum(dims).double()
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        self.count += f.numel() // f.shape[channel]

    def result(self) -> dict:
        mean = self.sum / self.count
        std = (self.sq / self.count - mean * mean).clamp_min(0).sqrt()
        return {"mean": mean.tolist(), "std": std.tolist()}


def gather_features(model: nn.Module, data: Prepared, layers: list[int], device: torch.device, batch_size: int,
                    on_batch: Callable[[int], None] | None = None, channel_stats: bool = True
                    ) -> tuple[dict, dict, dict]:
    """Features of `layers` (float16) and logits of every training image; their shapes; per-channel statistics
    (empty unless `channel_stats`).

    Batches land in one buffer per layer (key: layer; logits: "logits") on the device, or on the host when the
    device is short of memory.
    """
    layers = sorted(set(layers))
    train = DeviceData(data.train_images, data.train_labels, data.meta["mean"], data.meta["std"], device)
    n = len(train)
    with torch.no_grad():
        model.eval()
        with autocast(device):
            probe, logits = features_and_logits(model, train.normalise(train.images[:1]), layers)
    shapes = {k: list(f.shape[1:]) for k, f in zip(layers, probe)}
    buffers = _buffers(n, shapes, logits.shape[1], device)
    stats = {k: ChannelStats() for k in layers} if channel_stats else {}

    def sink(start: int, feats: list[torch.Tensor], logits: torch.Tensor) -> None:
        stop = start + len(logits)
        for k, f in zip(layers, feats):
            buffers[k][start:stop] = f
            if k in stats:
                stats[k].update(f)
        buffers["logits"][start:stop] = logits

    extract(model, train, layers, batch_size, sink, on_batch)
    return buffers, {str(k): shapes[k] for k in layers}, {str(k): s.result() for k, s in stats.items()}


def write_cache(model: nn.Module, data: Prepared, layers: list[int], device: torch.device, batch_size: int,
                out_dir: str | Path, on_batch: Callable[[int], None] | None = None) -> tuple[dict, dict, dict]:
    """Write features of `layers` and the logits; return (file digests, layer shapes, per-channel stats).

    Each file is written in one sequential pass from its gathered buffer and appears only once complete.
    """
    buffers, shapes, stats = gather_features(model, data, layers, device, batch_size, on_batch)
    names = {key: LOGITS if key == "logits" else layer_file(key) for key in buffers}
    files = {name: save_npy(Path(out_dir) / name, buffers.pop(key).cpu().numpy()) for key, name in names.items()}
    return files, shapes, stats


def _buffers(n: int, shapes: dict[int, list[int]], classes: int, device: torch.device) -> dict:
    need = sum(n * int(np.prod(s)) * 2 for s in shapes.values()) + n * classes * 4
    where = device
    if device.type == "cuda" and need > 0.7 * torch.cuda.mem_get_info(device)[0]:
        where = torch.device("cpu")
    out = {k: torch.empty((n, *s), dtype=torch.float16, device=where) for k, s in shapes.items()}
    out["logits"] = torch.empty((n, classes), dtype=torch.float32, device=where)
    return out


def load_cache(cache_dir: str | Path, teacher_id: str, data_id: str, layers: list[int]
               ) -> tuple[list[np.ndarray], np.ndarray, dict]:
    """Memory-mapped features of `layers`, the logits and the manifest.

    Refused unless they come from this teacher and data and hold these layers.
    """
    manifest = read_verified(cache_dir, "cache", {"teacher": teacher_id, "data": data_id})
    missing = [k for k in layers if str(k) not in manifest["shapes"]]
    if missing:
        raise InputError(f"{cache_dir} holds layers {manifest['layers']}, not {missing}: rerun the cache stage with "
                         "this method in `methods`, or set student.teacher_features=device")
    out = []
    for k in layers:
        array = np.load(Path(cache_dir) / layer_file(k), mmap_mode="r")
        if array.dtype != DTYPE or list(array.shape[1:]) != manifest["shapes"][str(k)]:
            raise InputError(f"{cache_dir}/{layer_file(k)} has shape {array.shape}, not the manifest's")
        out.append(array)
    return out, np.load(Path(cache_dir) / LOGITS, mmap_mode="r"), manifest
