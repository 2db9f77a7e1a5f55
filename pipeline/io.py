"""Atomic file writes, hashing and output manifests."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline import __version__
from pipeline.errors import InputError

MANIFEST = "manifest.json"
MANIFEST_KEYS = {"stage", "params", "params_hash", "inputs", "files"}  # "digest": older ones lack it
OWN_MARKERS = (MANIFEST, "metrics.json")  # a folder this pipeline writes whole: a stage's outputs, dvclive's curves
_UMASK = os.umask(0)
os.umask(_UMASK)


def check_outputs(*files: str | Path, folders: tuple[str | Path, ...] = (), scratch: tuple[str | Path, ...] = (),
                  stage: str | None = None) -> None:
    """Refuse, before any work, outputs that cannot be written: a file path that is a folder, a folder path that is
    a file, a path below a file or in a folder this process cannot write (else one output of a stage could replace
    its old self before another failed), or, for `stage`, a folder holding another stage's outputs. `folders` are
    replaced whole, so they must not hold what this pipeline did not write; `scratch` folders are written into.
    With `stage`, in `one_commit`, the files and folders are that stage's outputs, put in place together."""
    everything = [Path(p).resolve() for p in (*files, *folders, *scratch)]
    twice = next((p for p in everything if everything.count(p) > 1), None)
    if twice is not None:
        raise InputError(f"output {twice} is given for two outputs: one would replace the other")
    for folder in folders:
        _check_replaceable(Path(folder))
        inside = next((p for p in everything if Path(folder).resolve() in p.parents), None)
        if inside is not None:
            raise InputError(f"output {inside} is inside {folder}, which is replaced whole: put it elsewhere")
    writable: set[Path] = set()
    for path, is_folder in [*((Path(f), False) for f in files), *((Path(d), True) for d in (*folders, *scratch))]:
        if path.exists() and path.is_dir() != is_folder:
            raise InputError(f"output {path} is a {'file' if is_folder else 'folder'}")
        nearest = next((p for p in path.parents if p.exists()), None)
        if nearest is not None and not nearest.is_dir():
            raise InputError(f"output {path}: {nearest} is a file")
        for folder in {nearest or Path.cwd(), *([path] if is_folder and path.exists() else [])} - writable:
            _check_writable(path, folder)
            writable.add(folder)
        if stage is not None:
            _check_not_another_stages(path if is_folder else path.parent, stage)
    if stage is not None and _commit is not None:
        _commit.outputs.update(Path(p).resolve() for p in (*files, *folders))


def _check_writable(output: Path, folder: Path) -> None:
    try:  # a real file, not os.access: root passes access() on read-only mounts and immutable folders
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(f"output {output}: cannot write in {folder} ({err.strerror})") from None


def _check_replaceable(folder: Path) -> None:
    here = Path.cwd().resolve()
    if folder.resolve() in (here, *here.parents):
        raise InputError(f"output {folder} holds the working folder: not replacing it")
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / m).is_file() for m in OWN_MARKERS):
        raise InputError(f"output {folder} holds files this pipeline did not write (no {MANIFEST}): not replacing "
                         "them; remove it or choose another folder")


def _check_not_another_stages(folder: Path, stage: str) -> None:
    try:
        owner = json.loads((folder / MANIFEST).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):  # none, or unreadable: nothing to protect from a mix-up
        return
    if owner not in (None, stage):
        raise InputError(f"output {folder} holds the `{owner}` stage's outputs: not overwriting them with "
                         f"`{stage}`'s (wrong --out?)")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds (a stage's output: when
    the stage succeeds, `one_commit`)."""
    path = Path(path)
    check_outputs(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _put_in_place(path, lambda: os.replace(tmp, path), lambda: tmp.unlink(missing_ok=True))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; put it in place of `path` only if the block succeeds (a
    stage's output: when the stage succeeds, `one_commit`)."""
    path = Path(path)
    check_outputs(folders=(path,))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _put_in_place(path, lambda: _swap_in(tmp, path), lambda: shutil.rmtree(tmp, ignore_errors=True))


def _swap_in(tmp: Path, path: Path) -> None:
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        if path.exists():
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:  # e.g. SIGTERM between the two renames: the earlier outputs go back in place
        if not path.exists() and (old / path.name).exists():
            os.replace(old / path.name, path)
        raise
    finally:
        if path.exists():  # never the only copy
            shutil.rmtree(old, ignore_errors=True)


class _Commit:
    """A stage's outputs (named by its `check_outputs` call) and the moves that put them in place."""

    def __init__(self):
        self.outputs: set[Path] = set()
        self.moves: list[tuple[Callable[[], None], Callable[[], None]]] = []  # (put in place, discard)


_commit: _Commit | None = None


@contextlib.contextmanager
def one_commit() -> Iterator[None]:
    """Put the outputs a stage names in its `check_outputs(..., stage=...)` call in place together, when the block
    succeeds, and none of them when it fails: a stage that cannot write its model leaves its curves and metrics as
    they were too, not the new ones beside the old model. (A kill during the renames at the end can still part
    them.) Other writes, e.g. resume checkpoints, happen at once."""
    global _commit
    outer, _commit = _commit, _Commit()
    try:
        yield
        for put, _ in _commit.moves:
            put()
    finally:
        for _, discard in _commit.moves:
            discard()
        _commit = outer


def remove_when_committed(path: str | Path) -> None:
    """Delete `path` (a resume checkpoint) after the stage's outputs are in place: at once outside `one_commit`."""
    remove = functools.partial(Path(path).unlink, missing_ok=True)
    if _commit is None:
        remove()
    else:
        _commit.moves.append((remove, lambda: None))


def _put_in_place(path: Path, put: Callable[[], None], discard: Callable[[], None]) -> None:
    if _commit is not None and path.resolve() in _commit.outputs:
        _commit.moves.append((put, discard))
        return
    try:
        put()
    finally:
        discard()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"corrupt JSON in {path}: {err}") from None


def load_npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"corrupt array {path}: {err}") from None


# A file's digest is the sha256 of the sha256 digests of its BLOCK-sized blocks (one block for small files):
# blocks hash in parallel threads (hashlib releases the GIL), so multi-GB feature caches verify at memory speed.
BLOCK = 16 << 20
DIGEST = "sha256 of the sha256 of each 16 MiB block"
_WORKERS = os.cpu_count() or 1


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="digest")


def _combine(block_digests) -> str:
    return hashlib.sha256(b"".join(block_digests)).hexdigest()


def save_npy(path: str | Path, array: np.ndarray) -> str:
    """Write `array` as .npy atomically; return the file's digest, hashed from memory while the file is written."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    head, body = header.getvalue(), memoryview(array.reshape(-1)).cast("B")
    first = BLOCK - len(head)
    blocks = [head + body[:first].tobytes()] + [body[at:at + BLOCK] for at in range(first, len(body), BLOCK)]
    digests = [_pool().submit(lambda b: hashlib.sha256(b).digest(), b) for b in blocks]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(body)
    return _combine(d.result() for d in digests)


def file_digest(path: str | Path) -> str:
    """The digest (see BLOCK) of a file, its blocks read and hashed in parallel."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = range(0, max(os.fstat(fd).st_size, 1), BLOCK)
        return _combine(_pool().map(lambda at: hashlib.sha256(os.pread(fd, BLOCK, at)).digest(), offsets))
    finally:
        os.close(fd)


def hash_obj(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (params, manifests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache  # once per process: every manifest asks
def code_version() -> str:
    """Package version plus the git commit of the working tree, or without git (a copied tree, a GPU machine) a
    digest of the library's and the stages' sources."""
    package = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=package).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if not commit:
        sources = sorted([*package.rglob("*.py"), *(package.parent / "stages").glob("*.py")])
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:10]
        commit = f"src.{digest}"
    return f"{__version__}+{commit}"


def environment() -> dict[str, str]:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "device": device, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # which card of several
            "cpu_threads": torch.get_num_threads()}


def write_manifest(out_dir: str | Path, stage: str, params: dict, inputs: dict[str, str],
                   files: dict[str, str] | None = None, extra: dict | None = None) -> dict:
    """Write `out_dir/manifest.json`: what made these outputs, from what, and the checksums of `files` (name:
    digest), by default of every file in `out_dir`."""
    if files is None:
        files = {p.name: file_digest(p) for p in sorted(Path(out_dir).iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "stage": stage,
        "params": params,
        "params_hash": hash_obj(params),
        "inputs": inputs,
        "files": files,
        "digest": DIGEST,
        "code_version": code_version(),
        "environment": environment(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: str | Path, stage: str) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{out_dir} has no {MANIFEST}: run the `{stage}` stage first")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not MANIFEST_KEYS <= manifest.keys() or not all(
            isinstance(manifest[k], dict) for k in ("params", "inputs", "files")):
        raise InputError(f"{path} is not a manifest of this pipeline (corrupt or hand-made)")
    if manifest.get("stage") != stage:
        raise InputError(f"{path} was written by stage {manifest.get('stage')!r}, expected {stage!r}")
    return manifest


def read_verified(out_dir: str | Path, stage: str, inputs: dict[str, str]) -> dict:
    """A stage's manifest, refused if its files changed since, or if it was made from other `inputs`."""
    manifest = read_manifest(out_dir, stage)
    for key, value in inputs.items():
        if manifest["inputs"].get(key) != value:
            raise InputError(f"{out_dir} was made from another {key}: rerun the {stage} stage")
    verify_files(out_dir, manifest)
    return manifest


def manifest_id(manifest: dict) -> str:
    """Identity of a stage's outputs: the hash of their checksums and params."""
    return hash_obj({"files": manifest["files"], "params_hash": manifest["params_hash"]})


def verify_files(out_dir: str | Path, manifest: dict) -> None:
    """Refuse outputs whose files are missing, truncated or changed since the manifest was written."""
    if manifest.get("digest") != DIGEST:  # not corruption: checksums of another kind cannot be compared
        raise InputError(f"{out_dir} was written by an older version of the pipeline (other checksums): rerun "
                         f"the `{manifest.get('stage')}` stage")
    for name, digest in manifest["files"].items():
        path = Path(out_dir) / name
        if not path.is_file():
            raise InputError(f"missing file: {path}")
        if file_digest(path) != digest:
            raise InputError(f"{path} does not match its manifest checksum (truncated or modified)")


def write_csv(path: str | Path, rows: list[dict], columns: list[str]) -> None:
    import csv

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
