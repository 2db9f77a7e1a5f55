"""Serve an exported student with onnxruntime on image files, folders or .npy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.export import read_metadata
from pipeline.sources import IMAGE_SUFFIXES


@dataclass
class Inputs:
    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # each (H, W, C) uint8
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def _load_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    h, w, c = shape
    with Image.open(path) as img:
        array = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    if array.shape[:2] != (h, w):
        raise ValueError(f"size {array.shape[1]}x{array.shape[0]}, the model needs {w}x{h}")
    return array.reshape(h, w, c)


def _load_npy(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.dtype != np.uint8:
        raise ValueError(f"dtype {array.dtype}, the model needs uint8")
    if array.shape == shape or (shape[2] == 1 and array.shape == shape[:2]):
        array = array[None]
    if array.shape[1:] == shape[:2] and shape[2] == 1:
        array = array[..., None]
    if array.shape[1:] != shape:
        raise ValueError(f"shape {array.shape}, the model needs (N, {', '.join(map(str, shape))})")
    return array


def gather_inputs(paths: list[Path], shape: tuple[int, int, int]) -> Inputs:
    """Read every image (folders recursively, in sorted order); unreadable or wrong-sized ones are skipped."""
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
                array = _load_npy(path, shape)
                inputs.names += [f"{path}[{i}]" for i in range(len(array))]
                inputs.images += list(array)
            else:
                inputs.images.append(_load_image(path, shape))
                inputs.names.append(str(path))
        except (OSError, ValueError, EOFError) as err:  # PIL's UnidentifiedImageError is an OSError; EOF: empty .npy
            inputs.skipped.append((str(path), str(err).splitlines()[0] if str(err) else type(err).__name__))
    return inputs


def pick_providers(choice: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cuda" or (choice == "auto" and "CUDAExecutionProvider" in available):
        if "CUDAExecutionProvider" not in available:
            from pipeline.errors import InputError
            raise InputError("provider cuda requested, but this onnxruntime has no CUDAExecutionProvider "
                             "(install the gpu extra: onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def predict(model_path: Path, inputs: Inputs, classes: list[str], top_k: int, providers: list[str],
            batch_size: int = 256) -> tuple[list[dict], str]:
    """Rows of (input, class, probability, top-k) and the execution provider actually used."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=providers)
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
    return {"classes": meta["classes"], "image_shape": tuple(meta["image_shape"])}
