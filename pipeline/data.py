"""Prepared datasets in memory: uint8 images on the compute device, batched, normalised and augmented there."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import InputError
from pipeline.io import hash_obj, load_npy, manifest_id, read_json, read_manifest, verify_files


@dataclass
class Prepared:
    """The `prepare` stage's outputs, verified against their manifest."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    meta: dict
    data_id: str  # identity of these arrays, recorded by consumers
    seed: int = 0  # the prepare stage's
    resize_mode: str | None = None  # how the prepare stage brought images to image_shape: pad or resize

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])  # H, W, C

    def checkpoint_info(self) -> dict:
        """What a model checkpoint keeps of its data: their id, class names and normalisation (for deployment)."""
        return {"data_id": self.data_id, "classes": self.meta["classes"], "mean": self.meta["mean"],
                "std": self.meta["std"]}

    def train_subset(self, size: int | None) -> Prepared:
        """A class-balanced `size` of the training split, drawn as `prepare.train_subset` draws it (same seed: from
        an unsubsetted split, the same images), with the same test split and normalisation; all of it when `size`
        is None or larger."""
        if size is None or size >= len(self.train_labels):
            return self
        from pipeline.prepare import balanced_subset

        keep = balanced_subset(self.train_labels, size, self.seed)
        return replace(self, train_images=self.train_images[keep], train_labels=self.train_labels[keep],
                       data_id=hash_obj({"data": self.data_id, "train_subset": size}))


def load_prepared(data_dir: str | Path) -> Prepared:
    manifest = read_manifest(data_dir, "prepare")
    verify_files(data_dir, manifest)
    data_dir = Path(data_dir)
    arrays = {name: load_npy(data_dir / f"{name}.npy")
              for name in ("train_images", "train_labels", "test_images", "test_labels")}
    meta = read_json(data_dir / "meta.json")
    try:
        problem = _inconsistency(arrays, meta)
    except (TypeError, ValueError) as err:  # e.g. a number where a list belongs
        problem = f"meta.json is malformed ({type(err).__name__}: {err})"
    if problem:
        raise InputError(f"{data_dir} is not a prepared dataset: {problem}")
    return Prepared(**arrays, meta=meta, data_id=manifest_id(manifest),
                    seed=manifest["params"].get("seed", 0), resize_mode=manifest["params"].get("resize_mode"))


def _inconsistency(arrays: dict[str, np.ndarray], meta) -> str | None:
    """What makes arrays and meta.json other than what `prepare` writes (made by hand, or by another tool), if
    anything: they would fail deep inside training, or worse, not fail."""
    if not isinstance(meta, dict) or not {"classes", "num_classes", "image_shape", "mean", "std"} <= meta.keys():
        return "meta.json lacks classes, num_classes, image_shape, mean or std"
    shape, classes = tuple(meta["image_shape"]), meta["num_classes"]
    if len(shape) != 3 or len(meta["classes"]) != classes or not len(meta["mean"]) == len(meta["std"]) == shape[2]:
        return f"meta.json's image_shape, classes, mean and std disagree ({shape}, {len(meta['classes'])} names, " \
               f"{classes} classes, {len(meta['mean'])} means, {len(meta['std'])} stds)"
    if not all(s > 0 for s in meta["std"]):
        return f"meta.json's std {meta['std']} is not positive"
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.shape[1:] != shape:
            return f"{split}_images are {images.dtype} {images.shape[1:]}, not uint8 images of {shape}"
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
            return f"{split}_labels are {labels.dtype} {labels.shape}, not one integer per image ({len(images)})"
        if len(labels) and not 0 <= labels.min() <= labels.max() < classes:
            return f"{split}_labels run from {labels.min()} to {labels.max()}, outside the {classes} classes"
    return None


class DeviceData:
    """One split held as uint8 NHWC on `device`; yields normalised float NCHW batches.

    Keeping the whole split on the device avoids a host-side loader that would starve a GPU.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, device: torch.device):
        self.device = device
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        channels = self.images.shape[-1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        self.channels_last = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.labels)

    def steps(self, batch_size: int, drop_last: bool) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def normalise(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def batches(self, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                generator: torch.Generator | None = None, augment: "Augment | None" = None,
                shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (sample ids, images, labels). `generator` (a CPU generator) drives shuffling and augmentation.

        With `shard=(rank, world)` each global batch is drawn and augmented as in one process, and this rank
        keeps every world-th sample of it.
        """
        rank, world = shard
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        for start in range(0, self.steps(batch_size, drop_last) * batch_size, batch_size):
            ids = order[start:start + batch_size]
            x = self.normalise(self.images[ids])
            if augment is not None:
                x = augment(x, generator)
            if world > 1:
                ids, x = ids[rank::world], x[rank::world]
            yield ids, x, self.labels[ids]


@dataclass
class Augment:
    """Per-image random crop (zero padding, after normalisation) and horizontal flip, on the batch's device."""

    padding: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.padding
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            # drawn on the CPU for reproducibility; non_blocking: a blocking copy would wait for the GPU every step
            dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator).to(x.device, non_blocking=True)
            dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator).to(x.device, non_blocking=True)
            rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # b,1,h,1
            cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # b,1,1,w
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(x.device, non_blocking=True)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x
