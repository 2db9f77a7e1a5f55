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
           str(tmp_path / "data"), "--out", str(out), "--metrics", str(tmp_path / f"{name}.json"),
           "--live-dir", str(tmp_path / f"{name}-live"), "--resume-dir", str(tmp_path / f"{name}-resume")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text()), result


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


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process: DistributedDataParallel's checks without a launcher."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _distiller(method):
    import torch

    from pipeline.distill import LossWeights
    from pipeline.layers import layer_shapes
    from pipeline.models import ModelSpec, build_model
    from pipeline.student import build_distiller

    torch.manual_seed(0)
    teacher = build_model(ModelSpec("resnet34", 3, 1, 16, 0.0625))
    shapes = layer_shapes(teacher, (1, 16, 16))
    layers = [3, 7, 13, 16]
    return build_distiller(ModelSpec("resnet9", 3, 1, 16, 0.0625), method, [1, 2, 3, 4], layers,
                           [shapes[k] for k in layers], LossWeights(), 8, teacher), teacher, layers


def test_simkd_trains_under_distributed_data_parallel(one_rank_group):
    # SimKD's logits come from the teacher's tail: the student's own head, gradient-free, must not be a DDP parameter
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.features import features_and_logits

    distiller, teacher, layers = _distiller("simkd")
    model = DistributedDataParallel(distiller)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    with torch.no_grad():
        feats, logits = features_and_logits(teacher.eval(), x, layers)
    for _ in range(2):  # DDP refuses the second step when a parameter got no gradient in the first
        loss = model(x, y, feats, logits)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)


def test_sync_batchnorm_reaches_the_layers_a_student_runs():
    import torch

    from pipeline.distributed import sync_batchnorm_in_place

    distiller, _, _ = _distiller("ours")
    sync_batchnorm_in_place(distiller)
    run = [b for m in distiller.view.modules for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    assert run and all(isinstance(m, torch.nn.SyncBatchNorm) for m in run)
    assert len(run) == sum(isinstance(m, torch.nn.SyncBatchNorm) for m in distiller.modules())
