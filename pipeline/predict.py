"""Serve an exported student with onnxruntime on image files, folders or .npy arrays."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.export import read_metadata
from pipeline.sources import IMAGE_SUFFIXES


@dataclass
class Inputs:
    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # each (H, W, C) uint8
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def fit_to_model(images: np.ndarray, shape: tuple[int, int, int], resize_mode: str | None) -> np.ndarray:
    """(N, H, W, C) uint8 images brought to the model's size as the prepare stage brought its training images."""
    from pipeline.prepare import fit_channels, fit_size

    h, w, c = shape
    images = fit_channels(images, c)  # grey to RGB by copying, RGB to grey by luma, as `prepare.channels` does
    size = f"size {images.shape[2]}x{images.shape[1]}"
    if images.shape[1:3] == (h, w):
        return images
    if resize_mode is None:  # exported before the model recorded how its images were prepared
        raise ValueError(f"{size}, the model needs {w}x{h}")
    if resize_mode == "pad" and (images.shape[1] > h or images.shape[2] > w):
        raise ValueError(f"{size}, larger than the model's {w}x{h} (its training images were padded, not resized)")
    return fit_size(images, h, resize_mode)


def read_npy_images(path: Path) -> np.ndarray:
    """A uint8 array as (N, H, W, C): one image (H, W) or (H, W, C) with C 1 or 3, or a stack (N, H, W) (grey, W
    neither 1 nor 3) or (N, H, W, C)."""
    array = np.load(path, allow_pickle=False)
    if array.dtype != np.uint8:
        raise ValueError(f"dtype {array.dtype}, the model needs uint8")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] not in (1, 3)):
        array = array[..., None]  # grey images without their channel axis
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or 0 in array.shape:
        raise ValueError(f"shape {array.shape}: not an image or a stack of images")
    return array


def gather_inputs(paths: list[Path], shape: tuple[int, int, int], resize_mode: str | None = None) -> Inputs:
    """Read every image (folders recursively, in sorted order), brought to the model's size (`fit_to_model`);
    unreadable ones, and ones that cannot be brought to it, are skipped."""
    from pipeline.sources import load_image

    inputs = Inputs()
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
        else:
            files.append(path)
    for path in files:
        try:
            if path.suffix.lower() == ".npy":
                array = fit_to_model(read_npy_images(path), shape, resize_mode)
                inputs.names += [f"{path}[{i}]" for i in range(len(array))]
            else:
                array = fit_to_model(load_image(path, shape[2])[None], shape, resize_mode)
                inputs.names.append(str(path))
            inputs.images += list(array)
        except (InputError, OSError, ValueError, EOFError) as err:  # EOFError: an empty .npy
            inputs.skipped.append((str(path), str(err).splitlines()[0] if str(err) else type(err).__name__))
    return inputs


def pick_providers(choice: str) -> list[str]:
    """onnxruntime's execution providers for `choice`: auto (CUDA where onnxruntime-gpu finds a GPU), cuda or cpu."""
    import onnxruntime as ort

    if choice not in ("auto", "cuda", "cpu"):
        raise InputError(f"provider must be auto, cuda or cpu, not {choice!r}")
    available = ort.get_available_providers()
    if choice == "cuda" or (choice == "auto" and "CUDAExecutionProvider" in available):
        if "CUDAExecutionProvider" not in available:
            raise InputError("provider cuda requested, but this onnxruntime has no CUDAExecutionProvider "
                             "(install the gpu extra: onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def predict(model_path: Path, inputs: Inputs, classes: list[str], top_k: int, providers: list[str],
            batch_size: int = 256) -> tuple[list[dict], str]:
    """Rows of (input, class, probability, top-k) and the execution provider actually used."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as err:  # onnxruntime's errors (bad ops, opsets, weights) derive from Exception alone
        raise InputError(f"{model_path}: onnxruntime cannot load it: {err}") from None
    rows = []
    k = min(top_k, len(classes))
    for start in range(0, len(inputs.images), batch_size):
        batch = np.stack(inputs.images[start:start + batch_size])
        logits = session.run(["logits"], {"images": batch})[0].astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        for name, p in zip(inputs.names[start:start + batch_size], probs):
            top = np.argsort(-p, kind="stable")[:k]
            rows.append({"input": name, "class": classes[top[0]], "index": int(top[0]),
                         "probability": float(p[top[0]]),
                         "top_k": [{"class": classes[i], "probability": float(p[i])} for i in top]})
    return rows, session.get_providers()[0]


def model_info(model_path: Path) -> dict:
    meta = read_metadata(model_path)
    resize_mode = meta.get("resize_mode")  # absent from files exported before it was recorded
    if resize_mode not in (None, "pad", "resize"):
        raise InputError(f"{model_path}: damaged metadata (resize_mode {resize_mode!r}, not pad or resize)")
    return {"classes": meta["classes"], "image_shape": tuple(meta["image_shape"]), "resize_mode": resize_mode}


def format_rows(rows: list[dict], suffix: str) -> str:
    """`predict`'s rows as .json or .csv text."""
    if suffix == ".json":
        return json.dumps(rows, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["input", "class", "index", "probability", "top_k"])
    for r in rows:
        writer.writerow([r["input"], r["class"], r["index"], f"{r['probability']:.6f}",
                         ";".join(f"{t['class']}:{t['probability']:.6f}" for t in r["top_k"])])
    return buffer.getvalue()
