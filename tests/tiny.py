"""Tiny real-format pipeline outputs for stage tests (a prepared dataset as `kd prepare` writes it)."""

from pathlib import Path

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


TINY_PARAMS = {
    "methods": ["ours", "ce", "base_fkd"],  # the cache then holds the selected and the standard teacher layers
    "teacher": {"model": {"arch": "resnet34", "width": 0.0625},
                "train": {"epochs": 1, "batch_size": 16}, "device": "cpu"},
    "score": {"subset_a": 48, "subset_b_per_class": 10, "batch_size": 40, "device": "cpu"},
    "cache": {"batch_size": 40, "device": "cpu"},
    "student": {"model": {"arch": "resnet9", "width": 0.0625},
                "train": {"epochs": 2, "batch_size": 16, "lr": 0.01}, "device": "cpu"},
    "probe": {"device": "cpu", "holdout": 0.25},
}


def run_stage(root, stage, *args):
    """Run `kd <stage>` with the tiny params and the standard folder names under `root`."""
    from typer.testing import CliRunner

    from stages.cli import app

    folders = {"data": "--data", "teacher": "--teacher", "scores": "--scores", "cache": "--cache"}
    wanted = {"teacher": ["data"], "score": ["data", "teacher"], "cache": ["data", "teacher", "scores"],
              "student": ["data", "teacher", "scores", "cache"]}[stage] if stage != "probe" else ["data"]
    opts = [x for name in wanted for x in (folders[name], str(root / name))]
    return CliRunner().invoke(app, [stage, "-p", str(root / "params.yaml"), *opts, *args])


def tiny_pipeline(root):
    """prepare (written directly), teacher, score and cache of a 3-class 8x8 dataset under `root`."""
    import yaml

    write_prepared(root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    for stage, extra in (("teacher", ["--out", str(root / "teacher"), "--metrics", str(root / "m.json"),
                                      "--live-dir", str(root / "live"), "--resume-dir", str(root / "resume")]),
                         ("score", ["--out", str(root / "scores")]),
                         ("cache", ["--out", str(root / "cache")])):
        result = run_stage(root, stage, *extra)
        assert result.exit_code == 0, result.output
    return root


def killed_at_rename(monkeypatch, n: int) -> list:
    """os.replace killed (KeyboardInterrupt) at its n-th call, before that rename; returns the destinations asked."""
    import os

    renames, rename = [], os.replace

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == n:
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return renames


def fail_model_saves(monkeypatch, message: str) -> None:
    """torch.save raising `message` as torch's writer does on a full disk, for the stages' model.pt files only."""
    import torch

    real = torch.save

    def save(obj, path, *args, **kwargs):
        if Path(path).name.startswith(".model.pt"):
            raise RuntimeError(message)
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
