"""Readers for the raw dataset formats: MNIST idx (.gz), CIFAR python pickles, image folders.

Each reader returns a `RawData`: uint8 images in NHWC and int64 labels for a train and a test split.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class RawData:
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


# --- MNIST idx ---------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped), as distributed by (Fashion-)MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(f"cannot read idx file {path}: {err}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise InputError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise InputError(f"{path}: idx header is truncated")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):  # np.prod wraps around on huge headers
        raise InputError(f"{path} holds {body.size} values, its header says {dims}")
    return body.reshape(dims).copy()  # frombuffer arrays are read-only


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise InputError(f"missing {stem}(.gz) in {root}")


def read_fashion_mnist(root: str | Path) -> RawData:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Fashion-MNIST folder not found: {root}")
    split = {}
    for name, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise InputError(f"{root}: {name} images {images.shape} do not match labels {labels.shape}")
        split[name] = (images[..., None], labels)
    return RawData(*split["train"], *split["test"], classes=list(FASHION_MNIST_CLASSES))


def locate_fashion_mnist(root: str | Path | None, cache_dir: str | Path) -> Path:
    """The folder holding the idx files: `root`, the Debian package, or torchvision's download."""
    if root is not None:
        return Path(root)
    for candidate in FASHION_MNIST_DIRS:
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(cache_dir), train=True, download=True)
        FashionMNIST(str(cache_dir), train=False, download=True)
    except Exception as err:  # network errors come in many types
        raise InputError(f"Fashion-MNIST not installed and download failed: {err}") from None
    return Path(cache_dir) / "FashionMNIST" / "raw"


# --- CIFAR python pickles --------------------------------------------------------------------------

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's pickles hold dicts, lists and numpy arrays: anything else a pickle names (os.system...) is refused,
    not called."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # (bytes in Python 3's protocol 2)

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR pickle")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"missing CIFAR file: {path}")
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="bytes").load()
    except Exception as err:  # a corrupt pickle raises almost anything (OverflowError, MemoryError, ImportError...)
        raise InputError(f"corrupt CIFAR pickle {path}: {type(err).__name__}: {err}") from None


def _cifar_split(folder: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise InputError(f"{folder / name} is not a CIFAR batch (needs keys data and {label_key.decode()})")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[label_key]):
            raise InputError(f"{folder / name}: data {data.shape} is not N x 3072 with one label per row")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_cifar(root: str | Path, name: str) -> RawData:
    """Read torchvision's CIFAR layout from `root` (the folder or the .tar.gz archive it came in)."""
    folder_name, train_files, test_files, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
    root = Path(root)
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        root = _extract(root)
    folder = root if (root / meta_file).is_file() else root / folder_name
    if not folder.is_dir():
        raise InputError(f"{name} folder not found: {folder}")
    meta = _unpickle(folder / meta_file)
    if not isinstance(meta, dict) or not isinstance(meta.get(names_key), list):
        raise InputError(f"{folder / meta_file} is not a CIFAR meta file (needs key {names_key.decode()})")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    return RawData(*_cifar_split(folder, train_files, label_key), *_cifar_split(folder, test_files, label_key),
                   classes=classes)


def _extract(archive: Path) -> Path:
    """The archive extracted beside it, in a folder named by its digest: a replaced archive is extracted anew."""
    import shutil

    from pipeline.io import file_digest

    stem = archive.name.split(".tar")[0].split(".tgz")[0]
    target = archive.parent / f"{stem}_extracted_{file_digest(archive)[:12]}"
    if not target.is_dir():  # extract beside, rename when complete: a failed run leaves no partial folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=archive.parent))
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            tmp.rename(target)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            if not (isinstance(err, OSError) and target.is_dir()):  # else a run beside this one renamed first
                raise InputError(f"cannot extract {archive}: {err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_cifar(name: str, cache_dir: str | Path) -> Path:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        cls(str(cache_dir), train=True, download=True)
    except Exception as err:  # network errors come in many types
        raise InputError(f"{name} download failed: {err}; pass `root` to read a local copy") from None
    return Path(cache_dir)


# --- image folders ---------------------------------------------------------------------------------

def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise InputError(f"{root} has no class sub-folders")
    return dirs


def load_image(path: Path, channels: int) -> np.ndarray:
    """One image file as (H, W, channels) uint8 at its own size; InputError if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode.startswith("I;16"):  # 16-bit grey: its top 8 bits (convert() would clip it to white)
                img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
            elif img.mode in ("I", "F"):
                raise InputError(f"{img.mode} pixels (32-bit) have no 8-bit scale; convert it first")
            array = np.array(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's ways to fail on a file
        raise InputError(f"unreadable: {err}") from None
    return array.reshape(*array.shape[:2], channels)


def _read_image(path: Path, size: int, channels: int, resize_mode: str) -> np.ndarray:
    from pipeline.prepare import fit_size

    try:
        return fit_size(load_image(path, channels)[None], size, resize_mode)[0]
    except InputError as err:
        raise InputError(f"image {path}: {err}") from None


def _read_class_folders(root: Path, classes: list[str], size: int, channels: int, resize_mode: str):
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise InputError(f"class folder {folder} has no images")
        images += [_read_image(p, size, channels, resize_mode) for p in files]
        labels += [label] * len(files)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def read_image_folder(root: str | Path, size: int, channels: int, test_fraction: float, seed: int,
                      resize_mode: str = "resize") -> RawData:
    """`root/train/<class>/*` and `root/test/<class>/*`, or `root/<class>/*` split by a seeded stratified split;
    each image padded or resized to size x size (`resize_mode`)."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [d.name for d in _class_dirs(root / "train")]
        test_classes = [d.name for d in _class_dirs(root / "test")]
        if test_classes != classes:
            raise InputError(f"{root}: train classes {classes} differ from test classes {test_classes}")
        train = _read_class_folders(root / "train", classes, size, channels, resize_mode)
        test = _read_class_folders(root / "test", classes, size, channels, resize_mode)
        return RawData(*train, *test, classes=classes)
    classes = [d.name for d in _class_dirs(root)]
    images, labels = _read_class_folders(root, classes, size, channels, resize_mode)
    test_mask = stratified_mask(labels, test_fraction, seed)
    return RawData(images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask], classes)


def stratified_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing round(fraction * n_c) samples of every class c (at least one, never all)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise InputError(f"class {c} has {len(idx)} image(s): need at least 2 to split train/test")
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        mask[rng.choice(idx, size=k, replace=False)] = True
    return mask


def read_source(source: str, root: str | None, cache_dir: str, image_size: int, channels: int | None,
                test_fraction: float, seed: int, resize_mode: str = "resize") -> RawData:
    """Read any supported source; `root` is a local copy, None means the system package or a download."""
    if source == "fashion-mnist":
        return read_fashion_mnist(locate_fashion_mnist(root, cache_dir))
    if source in CIFAR_LAYOUT:
        return read_cifar(root or download_cifar(source, cache_dir), source)
    if source == "imagefolder":
        if root is None:
            raise InputError("prepare.root must name the image folder when source is imagefolder")
        return read_image_folder(root, image_size, channels or 3, test_fraction, seed, resize_mode)
    raise InputError(f"unknown source {source!r}")
