"""Turn raw images into the prepared arrays every later stage reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.io import file_digest, save_npy, write_json
from pipeline.sources import RawData

ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size // C` random samples of each of the C classes."""
    classes = np.unique(labels)
    per_class = size // len(classes)
    if per_class == 0:
        raise InputError(f"subset of {size} is smaller than the {len(classes)} classes: no sample per class")
    rng = np.random.default_rng(seed)
    picks = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise InputError(f"class {c} has {len(idx)} samples, the balanced subset needs {per_class}")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def fit_size(images: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Zero-pad (centred) or bilinearly resize NHWC uint8 images to size x size."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    if mode == "pad":
        if h > size or w > size:
            raise InputError(f"cannot pad {h}x{w} images to {size}x{size}: use resize_mode: resize")
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((n, size, size, c), dtype=np.uint8)
        out[:, top:top + h, left:left + w] = images
        return out
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def fit_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    have = images.shape[-1]
    if channels is None or channels == have:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return grey.round().clip(0, 255).astype(np.uint8)[..., None]
    raise InputError(f"cannot convert {have}-channel images to {channels} channels")


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images scaled to [0, 1] (two float64 passes, exact for constants);
    a constant channel gets std 1, so normalising maps it to zeros, not to NaN (0 / 0)."""
    c = images.shape[-1]

    def chunks():
        for start in range(0, len(images), chunk):
            yield images[start:start + chunk].reshape(-1, c).astype(np.float64) / 255.0

    count = len(images) * images[0].size // c
    mean = sum(x.sum(0) for x in chunks()) / count
    std = np.sqrt(sum(((x - mean) ** 2).sum(0) for x in chunks()) / count)
    return mean.tolist(), np.where(std > 0, std, 1.0).tolist()


def transform(raw: RawData, image_size: int, resize_mode: str, channels: int | None,
              train_subset: int | None, test_subset: int | None, seed: int) -> RawData:
    """Subset (class-balanced), resize/pad and convert channels of both splits."""
    if len(raw.classes) < 2:
        raise InputError(f"need at least 2 classes, found {len(raw.classes)}")
    splits = {}
    for name, images, labels, subset in (("train", raw.train_images, raw.train_labels, train_subset),
                                          ("test", raw.test_images, raw.test_labels, test_subset)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(raw.classes)):
            raise InputError(f"{name} labels span {labels.min()}..{labels.max()}, "
                             f"outside 0..{len(raw.classes) - 1} for {len(raw.classes)} classes")
        missing = set(range(len(raw.classes))) - set(np.unique(labels).tolist())
        if missing:
            raise InputError(f"{name} split has no samples of class(es) {sorted(missing)}")
        if subset is not None and subset < len(labels):
            keep = balanced_subset(labels, subset, seed)
            images, labels = images[keep], labels[keep]
        splits[name] = (fit_channels(fit_size(images, image_size, resize_mode), channels), labels)
    return RawData(*splits["train"], *splits["test"], classes=list(raw.classes))


def save_prepared(data: RawData, out_dir: str | Path) -> tuple[dict, dict[str, str]]:
    """Write the four arrays and meta.json; return the meta and each file's digest."""
    out_dir = Path(out_dir)
    mean, std = channel_stats(data.train_images)
    meta = {
        "classes": data.classes,
        "num_classes": len(data.classes),
        "image_shape": list(data.train_images.shape[1:]),
        "num_train": len(data.train_labels),
        "num_test": len(data.test_labels),
        "mean": mean,
        "std": std,
        "train_class_counts": np.bincount(data.train_labels, minlength=len(data.classes)).tolist(),
    }
    files = {}
    for name in ARRAYS:
        files[f"{name}.npy"] = save_npy(out_dir / f"{name}.npy", getattr(data, name))
    write_json(out_dir / "meta.json", meta)
    files["meta.json"] = file_digest(out_dir / "meta.json")
    return meta, files
