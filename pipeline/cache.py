"""Teacher-feature cache: one float16 .npy per selected layer for the whole training split, indexed by sample id."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.data import DeviceData, Prepared
from pipeline.errors import InputError
from pipeline.features import extract
from pipeline.io import atomic_path, read_manifest, sha256_file, verify_files

DTYPE = np.float16


def layer_file(layer: int) -> str:
    return f"layer_{layer}.npy"


def write_cache(model: nn.Module, data: Prepared, layers: list[int], device: torch.device, batch_size: int,
                out_dir: str | Path, on_batch: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Write the features; return (file checksums, layer shapes). Files appear only once complete."""
    out_dir = Path(out_dir)
    train = DeviceData(data.train_images, data.train_labels, data.meta["mean"], data.meta["std"], device)
    n = len(train)
    with torch.no_grad():
        model.eval()
        from pipeline.layers import layer_view
        from pipeline.train import autocast

        with autocast(device):
            probe = layer_view(model).collect(train.normalise(train.images[:1]), layers)
    shapes = {k: list(f.shape[1:]) for k, f in zip(layers, probe)}
    with contextlib.ExitStack() as stack:
        tmps = {k: stack.enter_context(atomic_path(out_dir / layer_file(k))) for k in dict.fromkeys(layers)}
        arrays = {k: np.lib.format.open_memmap(tmps[k], mode="w+", dtype=DTYPE, shape=(n, *shapes[k]))
                  for k in tmps}

        def sink(start: int, ids: torch.Tensor, feats: list[torch.Tensor]) -> None:
            for k, f in zip(layers, feats):
                arrays[k][start:start + len(ids)] = f.to(torch.float16).cpu().numpy()

        extract(model, train, layers, batch_size, sink, on_batch)
        for array in arrays.values():
            array.flush()
        del arrays
    files = {layer_file(k): sha256_file(out_dir / layer_file(k)) for k in dict.fromkeys(layers)}
    return files, {str(k): shapes[k] for k in shapes}


def load_cache(cache_dir: str | Path, teacher_id: str, data_id: str, layers: list[int]) -> list[np.ndarray]:
    """Memory-mapped features of `layers`, refused unless they come from this teacher, data and layer list."""
    manifest = read_manifest(cache_dir, "cache")
    expected = {"teacher": teacher_id, "data": data_id}
    for key, value in expected.items():
        if manifest["inputs"].get(key) != value:
            raise InputError(f"{cache_dir} was made from another {key}: rerun the cache stage")
    missing = [k for k in layers if str(k) not in manifest["shapes"]]
    if missing:
        raise InputError(f"{cache_dir} holds layers {manifest['layers']}, not {missing}: rerun the cache stage")
    verify_files(cache_dir, manifest)
    out = []
    for k in layers:
        array = np.load(Path(cache_dir) / layer_file(k), mmap_mode="r")
        if array.dtype != DTYPE or list(array.shape[1:]) != manifest["shapes"][str(k)]:
            raise InputError(f"{cache_dir}/{layer_file(k)} has shape {array.shape}, not the manifest's")
        out.append(array)
    return out
