"""The `kd teacher` command on a tiny prepared dataset written in the real output format."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.checkpoint import load_model, save_model
from pipeline.models import ModelSpec, build_model
from stages.cli import app
from tiny import fail_model_saves, write_prepared

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_prepared(tmp_path / "data")
    params = {"teacher": {"model": {"arch": "resnet9", "width": 0.0625},
                          "train": {"epochs": 3, "batch_size": 16, "lr": 0.01}, "device": "cpu"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run_teacher(*extra):
    return runner.invoke(app, ["teacher", "--data", "data", "--out", "teacher", "--metrics", "m.json",
                               "--live-dir", "live", *extra])


def test_trains_and_writes_checkpoint_metrics_curves(workdir):
    result = run_teacher("-S", "teacher.train.resume_every_s=0")  # a resume checkpoint after every epoch
    assert result.exit_code == 0, result.output
    model, spec, info = load_model(workdir / "teacher/model.pt")
    assert spec.arch == "resnet9" and spec.num_classes == 3 and spec.in_chans == 1 and spec.image_size == 8
    assert info["classes"] == ["c0", "c1", "c2"] and len(info["mean"]) == 1
    metrics = json.loads((workdir / "m.json").read_text())
    assert metrics["epochs"] == 3 and metrics["test_acc"] > 0.9
    assert 0 < metrics["setup_seconds"] < metrics["train_seconds"]  # the rest of the stage: start-up, saving
    manifest = json.loads((workdir / "teacher/manifest.json").read_text())
    best = max(manifest["history"], key=lambda r: r["test_acc"])
    assert (metrics["best_test_acc"], metrics["best_epoch"]) == (best["test_acc"], best["epoch"])
    assert [r["epoch"] for r in manifest["history"]] == [1, 2, 3]
    assert manifest["history"][-1]["test_acc"] == metrics["test_acc"]
    curve = (workdir / "live/plots/metrics/test_acc.tsv").read_text().splitlines()
    assert len(curve) == 4  # header + one row per epoch
    assert all(row["checkpoint_seconds"] > 0 for row in manifest["history"])
    assert (workdir / ".kd-resume").is_dir() and not any((workdir / ".kd-resume").iterdir())  # removed on success


def test_same_seed_same_result_on_cpu(workdir):
    assert run_teacher().exit_code == 0
    first = torch.load(workdir / "teacher/model.pt", weights_only=True)["state_dict"]
    assert run_teacher().exit_code == 0
    second = torch.load(workdir / "teacher/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_adopts_given_checkpoint_and_scores_it(workdir):
    first_run = run_teacher()
    assert first_run.exit_code == 0 and "epoch 1/3" in first_run.output
    trained = json.loads((workdir / "m.json").read_text())
    result = run_teacher("-S", "teacher.checkpoint=teacher/model.pt", "--out", "adopted")
    assert result.exit_code == 0, result.output
    adopted = json.loads((workdir / "m.json").read_text())
    assert adopted["test_acc"] == pytest.approx(trained["test_acc"])
    assert json.loads((workdir / "adopted/manifest.json").read_text())["history"] == []  # scored, not trained
    assert "epoch 1/3" not in result.output
    first, second = (torch.load(workdir / f"{d}/model.pt", weights_only=True)["state_dict"]
                     for d in ("teacher", "adopted"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_checkpoints_exit_2_and_keep_outputs(workdir):
    assert run_teacher().exit_code == 0
    before = (workdir / "teacher/model.pt").read_bytes()
    (workdir / "garbage.pt").write_bytes(b"not a checkpoint at all")
    result = run_teacher("-S", "teacher.checkpoint=garbage.pt")
    assert result.exit_code == 2 and "corrupt or unreadable checkpoint garbage.pt" in result.output

    wrong = build_model(ModelSpec("resnet9", num_classes=5, in_chans=1, image_size=8, width=0.0625))
    save_model(workdir / "wrong.pt", wrong, ModelSpec("resnet9", 5, 1, 8, 0.0625))
    result = run_teacher("-S", "teacher.checkpoint=wrong.pt")
    assert result.exit_code == 2 and "num_classes is 5, the prepared data needs 3" in result.output

    result = run_teacher("-S", "teacher.checkpoint=missing.pt")
    assert result.exit_code == 2 and "missing checkpoint: missing.pt" in result.output

    spec = {**ModelSpec("resnet9", 3, 1, 8, 0.0625).to_dict(), "num_classes": "ten"}
    torch.save({"format": "kd-model/1", "spec": spec, "state_dict": {}}, workdir / "typo.pt")
    result = run_teacher("-S", "teacher.checkpoint=typo.pt")
    assert result.exit_code == 2 and "typo.pt: malformed model description" in result.output

    nan = build_model(ModelSpec("resnet9", num_classes=3, in_chans=1, image_size=8, width=0.0625))
    with torch.no_grad():
        nan[-1].weight.fill_(float("nan"))  # the classifier
    save_model(workdir / "nan.pt", nan, ModelSpec("resnet9", 3, 1, 8, 0.0625))
    result = run_teacher("-S", "teacher.checkpoint=nan.pt")
    assert result.exit_code == 2 and result.output == (
        "error: nan.pt: the teacher's logits are not finite on the test split (NaN or inf weights?)\n")
    assert (workdir / "teacher/model.pt").read_bytes() == before


def test_an_unwritable_output_is_refused_before_training_and_keeps_the_earlier_ones(workdir):
    assert run_teacher().exit_code == 0
    before = (workdir / "teacher/model.pt").read_bytes()
    (workdir / "metrics_folder").mkdir()
    result = run_teacher("-S", "seed=1", "--metrics", "metrics_folder")
    assert result.exit_code == 2 and "output metrics_folder is a folder" in result.output
    assert "epoch" not in result.output  # refused before training
    assert (workdir / "teacher/model.pt").read_bytes() == before
    result = run_teacher("--out", "m.json/teacher")  # below a file
    assert result.exit_code == 2 and "output m.json/teacher: m.json is a file" in result.output


def test_modified_data_is_refused(workdir):
    with open(workdir / "data/train_labels.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    result = run_teacher()
    assert result.exit_code == 2
    assert "train_labels.npy does not match its manifest checksum" in result.output
    assert not (workdir / "teacher").exists()


def _edit_prepared(folder: Path, name: str, edit) -> None:
    """Change one of a prepared dataset's files and write its manifest again: consistent checksums, bad data."""
    import numpy as np

    from pipeline.io import write_manifest

    path = folder / name
    if name.endswith(".npy"):
        np.save(path, edit(np.load(path)))
    else:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    write_manifest(folder, "prepare", {"seed": 0}, inputs={})


@pytest.mark.parametrize("name, edit, problem", [
    ("train_labels.npy", lambda y: y + 1, "train_labels run from 1 to 3, outside the 3 classes"),
    ("test_labels.npy", lambda y: y - 1, "test_labels run from -1 to 1, outside the 3 classes"),
    ("test_labels.npy", lambda y: y[:-1], "test_labels are int64 (47,), not one integer per image (48)"),
    ("train_images.npy", lambda x: x.astype("float32"), "train_images are float32 (8, 8, 1), not uint8 images of"),
    ("test_images.npy", lambda x: x[:, :4], "test_images are uint8 (4, 8, 1), not uint8 images of (8, 8, 1)"),
    ("meta.json", lambda m: {**m, "std": [0.0]}, "meta.json's std [0.0] is not positive"),
    ("meta.json", lambda m: {**m, "classes": m["classes"][:2]}, "meta.json's image_shape, classes, mean and std"),
    ("meta.json", lambda m: {**m, "image_shape": 8}, "meta.json is malformed (TypeError"),
])
def test_a_prepared_dataset_that_is_not_what_prepare_writes_is_refused(workdir, name, edit, problem):
    _edit_prepared(workdir / "data", name, edit)
    result = run_teacher()
    assert result.exit_code == 2 and result.output.startswith("error: data is not a prepared dataset: " + problem)
    assert len(result.output.splitlines()) == 1 and not (workdir / "teacher").exists()


def test_nan_loss_exits_nonzero_with_one_line(workdir):
    result = run_teacher("-S", "teacher.train.lr=1e30")
    assert result.exit_code == 1
    assert result.output == "error: non-finite training loss (loss, ce); lower the learning rate\n"
    assert not (workdir / "teacher/model.pt").exists()


def test_a_failed_run_keeps_the_last_good_runs_curves(workdir):
    assert run_teacher().exit_code == 0
    before = {p.relative_to(workdir): p.read_bytes() for p in (workdir / "live").rglob("*") if p.is_file()}
    assert workdir / "live/plots/metrics/test_acc.tsv" in {workdir / p for p in before}
    assert run_teacher("-S", "teacher.train.lr=1e30").exit_code == 1
    after = {p.relative_to(workdir): p.read_bytes() for p in (workdir / "live").rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in workdir.iterdir() if p.name.startswith(".live")) == []


def test_a_run_failing_to_write_its_model_keeps_all_the_earlier_outputs(workdir, monkeypatch):
    assert run_teacher().exit_code == 0
    earlier = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "data" not in p.parts}
    fail_model_saves(monkeypatch, "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore")
    result = run_teacher("-S", "seed=1")  # trained; its curves done before its model is written
    assert result.exit_code == 1 and result.output.splitlines()[-1].startswith("error: writing ")
    assert result.output.splitlines()[-1].endswith("model.pt failed: [enforce fail at inline_container.cc:664] . "
                                                   "unexpected pos 64 vs 0")
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "data" not in p.parts} == earlier


def test_outputs_onto_another_stages_folder_or_an_unwritable_one_are_refused_before_training(workdir, monkeypatch):
    manifest = (workdir / "data/manifest.json").read_bytes()
    result = runner.invoke(app, ["teacher", "--data", "data", "--out", "data", "--metrics", "m.json"])
    assert result.exit_code == 2 and result.output.strip() == (
        "error: output data holds the `prepare` stage's outputs: not overwriting them with `teacher`'s (wrong --out?)")
    assert (workdir / "data/manifest.json").read_bytes() == manifest and not (workdir / "data/model.pt").exists()
    result = runner.invoke(app, ["teacher", "--data", "data", "--metrics", "data/m.json"])  # a file output too
    assert result.exit_code == 2 and "output data holds the `prepare` stage's outputs" in result.output
    assert not (workdir / "data/m.json").exists()

    import tempfile

    real = tempfile.TemporaryFile
    (workdir / "locked").mkdir()

    def refuse_locked(*args, dir=None, **kwargs):  # the system's answer in a read-only folder (root passes chmod)
        if dir is not None and dir.name == "locked":
            raise PermissionError(1, "Operation not permitted")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse_locked)
    result = run_teacher("--metrics", "locked/m.json")
    assert result.exit_code == 2 and result.output.strip() == (
        "error: output locked/m.json: cannot write in locked (Operation not permitted)")
    assert not (workdir / "teacher").exists() and not (workdir / "live").exists()


def test_a_command_gives_back_the_signal_handlers_it_found():
    import signal

    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    assert runner.invoke(app, ["params"]).exit_code == 0
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == before


def test_a_stage_stopped_by_sigterm_keeps_the_earlier_outputs_and_resumes_when_run_again(workdir):
    import os
    import signal
    import subprocess
    import sys
    import time

    assert run_teacher("-S", "teacher.train.epochs=1").exit_code == 0
    earlier = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "data" not in p.parts}
    sets = ["-S", "teacher.train.epochs=150", "-S", "teacher.train.resume_every_s=0"]
    cmd = [sys.executable, "-m", "stages.cli", "teacher", "--data", "data", "--out", "teacher", "--metrics", "m.json",
           "--live-dir", "live", *sets]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(workdir.glob(".kd-resume/teacher-*.pt")):  # training, past its first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert proc.stdout.read().splitlines()[-1] == "error: stopped by SIGTERM: the earlier outputs are kept"
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".") and p.name != ".kd-resume"] == []
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and "data" not in p.parts
            and ".kd-resume" not in p.parts} == earlier

    (checkpoint,) = workdir.glob(".kd-resume/teacher-*.pt")
    done = torch.load(checkpoint, weights_only=True)["history"]  # the epochs it finished, timings included
    assert 1 <= len(done) < 150

    def history():
        return json.loads((workdir / "teacher/manifest.json").read_text())["history"]

    assert run_teacher(*sets, "-S", "teacher.train.lr=0.02").exit_code == 0  # other params: trained from the start
    assert len(history()) == 150 and history()[0]["seconds"] != done[0]["seconds"] and checkpoint.is_file()
    assert run_teacher(*sets).exit_code == 0  # the killed run's params: it goes on from its checkpoint
    assert history()[:len(done)] == done and len(history()) == 150
    assert not checkpoint.exists()
