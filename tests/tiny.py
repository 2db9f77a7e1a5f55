"""Tiny real-format pipeline outputs for stage tests (a prepared dataset as `kd prepare` writes it)."""

import numpy as np

from pipeline.io import write_manifest
from pipeline.prepare import save_prepared
from pipeline.sources import RawData


def write_prepared(folder, n_train=96, n_test=48, classes=3, seed=0, side=8):
    """Grey side x side images; class y lights up column band y, so small models learn it in a few steps."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n) % classes
        images = rng.integers(0, 50, size=(n, side, side, 1), dtype=np.uint8)
        for i, y in enumerate(labels):
            images[i, :, 2 * y:2 * y + 3] += 180
        return images, labels.astype(np.int64)

    raw = RawData(*split(n_train), *split(n_test), classes=[f"c{i}" for i in range(classes)])
    _, files = save_prepared(raw, folder)
    write_manifest(folder, "prepare", {"seed": seed}, inputs={}, files=files)
