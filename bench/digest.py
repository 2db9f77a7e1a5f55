"""Benchmark: the block-parallel file digest vs one plain sha256 stream, writing and verifying, in one run.

    python bench/digest.py --gb 2 [--dir /tmp]

Write: `pipeline.io.save_npy` (blocks hashed on a thread pool while numpy writes) vs numpy writing through a plain
sha256 wrapper. Verify: `pipeline.io.file_digest` (blocks read and hashed in parallel) vs a plain sha256 read.
The file is in the page cache for the verify figures, as it is when a stage reads what the previous one wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.io import file_digest, save_npy


class PlainHashingWriter:
    def __init__(self, f):
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)


def plain_save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(PlainHashingWriter(f), array)


def plain_digest(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="where the files go (e.g. /dev/shm to leave the disk out)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    array = np.random.default_rng(0).standard_normal(int(args.gb * 2**30) // 2, dtype=np.float32).astype(np.float16)
    gb = array.nbytes / 1e9
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plain, blocks = Path(tmp) / "plain.npy", Path(tmp) / "blocks.npy"
        write, read = {}, {}
        for _ in range(args.repeats):  # alternate; keep each side's best (disk write-back makes single runs noisy)
            for side, path, save, digest in (("plain", plain, plain_save, plain_digest),
                                             ("blocks", blocks, save_npy, file_digest)):
                write[side] = min(write.get(side, float("inf")), timed(save, path, array))
                read[side] = min(read.get(side, float("inf")), timed(digest, path))
    print(f"{os.cpu_count()} CPUs, {gb:.2f} GB float16 array in {args.dir or tempfile.gettempdir()}, "
          f"best of {args.repeats}")
    print("| step | one sha256 stream | 16 MiB blocks in parallel | ratio |\n|---|---|---|---|")
    for step, times in (("write + digest", write), ("verify (read + digest)", read)):
        print(f"| {step} | {gb / times['plain']:.2f} GB/s | {gb / times['blocks']:.2f} GB/s | "
              f"{times['plain'] / times['blocks']:.2f}x |")


if __name__ == "__main__":
    main()
