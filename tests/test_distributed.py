"""torchrun with 2 CPU processes (gloo) trains like 1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tiny import write_prepared

PARAMS = {"teacher": {"model": {"arch": "vit_ett", "width": 0.0625},  # LayerNorm only: no per-rank statistics
                      "train": {"epochs": 2, "batch_size": 16, "lr": 0.003}, "device": "cpu"}}


def run(tmp_path, name, launcher):
    out = tmp_path / name
    cmd = [*launcher, "-m", "stages.cli", "teacher", "-p", str(tmp_path / "params.yaml"), "--data",
           str(tmp_path / "data"), "--out", str(out), "--metrics", str(out / "m.json"), "--live-dir",
           str(out / "live"), "--resume-dir", str(out / "resume")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads((out / "m.json").read_text()), result


def test_two_processes_match_one(tmp_path):
    write_prepared(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    single, _ = run(tmp_path, "single", [sys.executable])
    double, result = run(tmp_path, "double", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc-per-node", "2"])
    assert double["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    assert double["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4)
    assert double["test_acc"] == single["test_acc"]
    assert result.stderr.count("teacher epoch 2/2") == 1  # rank 0 alone reports


def test_sync_batchnorm_on_cpu_processes_is_refused(tmp_path):
    write_prepared(tmp_path / "data")
    params = {"teacher": {**PARAMS["teacher"], "model": {"arch": "resnet9", "width": 0.0625},
                          "train": {**PARAMS["teacher"]["train"], "sync_batchnorm": True}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(AssertionError, match="sync_batchnorm needs CUDA devices"):
        run(tmp_path, "double", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "2"])
    assert not (tmp_path / "double" / "model.pt").exists()
