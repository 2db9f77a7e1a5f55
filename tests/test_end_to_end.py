"""`dvc repro` of the real dvc.yaml on a small slice of the real Fashion-MNIST, then `kd predict` on PNG files."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from dvc import api as dvc_api
from PIL import Image
from typer.testing import CliRunner

from pipeline.export import read_metadata
from pipeline.sources import locate_fashion_mnist
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "prepare": {"train_subset": 400, "test_subset": 100},
    "teacher": {"model": {"arch": "resnet34", "width": 0.0625}, "train": {"epochs": 1, "batch_size": 32}},
    "score": {"subset_a": 200, "subset_b_per_class": 10},
    "student": {"model": {"arch": "resnet9", "width": 0.0625}, "train": {"epochs": 2, "batch_size": 32}},
    "export": {"small_batch_images": 20},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SMALL)
    params["prepare"]["root"] = str(locate_fashion_mnist(None, repo / "download"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("pipeline", "stages"):  # code deps of the stages
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return repo


def test_repro_writes_every_stage_output(repo):
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"teacher", "ours", "ce"}
    details = json.loads((repo / "metrics/evaluate-details.json").read_text())
    runs = {r["run"]: r for r in details["runs"]}
    assert set(runs) == {"ours-s0", "ce-s0"}
    for name, run in runs.items():  # evaluate's probe number is the probe stage's own
        probe = json.loads((repo / f"metrics/probe-{name}.json").read_text())
        assert run["probe_top1"] == pytest.approx(probe["probe_test_acc"], abs=1e-6)
    for run in runs.values():  # evaluate's last-epoch number is the student stage's final test accuracy
        student = json.loads((repo / f"metrics/student-{run['run']}.json").read_text())
        assert run["top1"] == pytest.approx(student["test_acc"], abs=1e-6)
        assert run["best_epoch_top1"] == pytest.approx(student["best_test_acc"], abs=1e-6)
        assert sum(map(sum, run["confusion"])) == 100
        with open(repo / f"plots/test_acc/{run['run']}.csv") as f:  # its learning curve, for `dvc plots`
            curve = [(int(r["epoch"]), float(r["test_acc"])) for r in csv.DictReader(f)]
        assert [e for e, _ in curve] == list(range(1, student["epochs"] + 1))
        assert curve[-1][1] == pytest.approx(student["test_acc"]) and max(a for _, a in curve) == pytest.approx(
            student["best_test_acc"])
    assert "| ours | 1 |" in (repo / "reports/summary.md").read_text()
    export = json.loads((repo / "metrics/export.json").read_text())
    assert export["max_abs_diff"] <= 1e-4 and export["top1_agreement"] >= 0.999
    assert {bs: f["images"] for bs, f in export["by_batch_size"].items()} == {"1": 20, "7": 20, "256": 100}
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, capture_output=True, text=True, env=env)
    assert "up to date" in status.stdout
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=repo, capture_output=True,
                           text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    plotted = json.loads(shown.stdout)["data"]  # one learning-curve plot per run of the current methods x seeds
    assert {k for k in plotted if "test_acc" in k} == {"plots/test_acc/ours-s0.csv", "plots/test_acc/ce-s0.csv"}
    for run in ("ours-s0", "ce-s0"):  # each plot draws its own run's curve
        with open(repo / f"plots/test_acc/{run}.csv") as f:
            curve = [float(r["test_acc"]) for r in csv.DictReader(f)]
        values = plotted[f"plots/test_acc/{run}.csv"][0]["content"]["data"]["values"]
        assert [float(v["test_acc"]) for v in values] == curve


def test_a_bad_param_stops_dvc_before_any_stage_removes_its_outputs(repo):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def repro(*args):
        return subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)

    params = repo / "params.yaml"
    good = params.read_text()
    cache = sorted(p.name for p in (repo / "cache/teacher").iterdir())
    assert "\n  method: ours\n" in good
    params.write_text(good.replace("\n  method: ours\n", "\n  method: oursx\n"))  # cache and students depend on it
    try:
        result = repro()
    finally:
        params.write_text(good)
    assert result.returncode != 0 and "error: params: student.method: Input should be" in result.stderr
    assert sorted(p.name for p in (repo / "cache/teacher").iterdir()) == cache
    assert (repo / "runs/student-ours-s0/model.pt").is_file()
    assert repro("params").returncode == 0  # the check again: same output, so no stage below it reruns
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, env=env, capture_output=True,
                            text=True)
    assert "up to date" in status.stdout, status.stdout


def test_predict_on_png_files_equals_evaluate(repo, tmp_path):
    """Images at the model's 32x32 and raw 28x28 Fashion-MNIST ones (padded in predict as `prepare` padded them)."""
    test_images = np.load(repo / "data/prepared/test_images.npy")[:30]
    raw = test_images[:, 2:30, 2:30]  # what prepare's centred zero-padding 28 -> 32 started from
    assert not test_images[:, :2].any() and not test_images[:, 30:].any() and not test_images[:, :, 30:].any()
    for i, image in enumerate(test_images[:10]):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i:03d}.png")
    for i, image in enumerate(raw[10:20], start=10):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i:03d}.png")
    np.save(tmp_path / "020.npy", raw[20:, ..., 0])  # a stack of grey images without a channel axis
    (tmp_path / "zz_broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "zz_empty.npy").write_bytes(b"")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "zz_big.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--model", str(repo / "models/export/model.onnx"),
                                      "--out", str(tmp_path / "pred.json"), "--top-k", "2"])
    assert result.exit_code == 3, result.output  # something was skipped
    assert "skipped" in result.output and all(f"zz_{name}" in result.output
                                              for name in ("broken.png", "empty.npy", "big.png"))
    assert "size 40x40, larger than the model's 32x32" in result.output
    assert read_metadata(repo / "models/export/model.onnx")["resize_mode"] == "pad"  # as params.yaml prepared
    rows = json.loads((tmp_path / "pred.json").read_text())
    assert [Path(r["input"]).name for r in rows] == [f"{i:03d}.png" for i in range(20)] + \
        [f"020.npy[{i}]" for i in range(10)]
    with open(repo / "plots/confusion/ours-s0.csv") as f:
        evaluated = [row["predicted"] for row in csv.DictReader(f)][:30]
    assert [r["class"] for r in rows] == evaluated
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["class"] == r["class"] for r in rows)
    import onnxruntime as ort

    session = ort.InferenceSession(str(repo / "models/export/model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": test_images})[0].astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for row, p in zip(rows, probs):  # softmax of the model's logits, best first
        assert row["probability"] == pytest.approx(p.max(), abs=1e-6) and row["index"] == p.argmax()
        assert row["top_k"][1]["probability"] == pytest.approx(np.sort(p)[-2], abs=1e-6)


def test_predict_refuses_files_that_are_not_our_models(repo, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    result = CliRunner().invoke(app, ["predict", str(repo / "plots"), "--model", str(tmp_path / "junk.onnx")])
    assert result.exit_code == 2 and "is not an ONNX model" in result.output
    import onnx

    onnx.save_model(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(tmp_path / "other.onnx"))
    result = CliRunner().invoke(app, ["predict", str(repo / "plots"), "--model", str(tmp_path / "other.onnx")])
    assert result.exit_code == 2 and "not exported by this pipeline" in result.output
    result = CliRunner().invoke(app, ["predict", str(repo / "plots"), "--model", str(repo / "models/export/model.onnx"),
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and f"output {tmp_path} is a folder" in result.output
    for name, edit, message in (
            ("no-classes", lambda meta: meta.pop("classes"), "damaged metadata (KeyError: 'classes')"),
            ("bad-json", lambda meta: meta.update(classes="[a"), "damaged metadata (JSONDecodeError"),
            ("2d", lambda meta: meta.update(image_shape="[32, 32]"), "damaged metadata (image_shape [32, 32], not"),
            ("two-classes", lambda meta: meta.update(classes='["a", "b"]'), "metadata names 2 classes"),
            ("other-size", lambda meta: meta.update(image_shape="[28, 28, 1]"), "metadata says images of [28,"),
            ("zoom", lambda meta: meta.update(resize_mode="zoom"), "damaged metadata (resize_mode 'zoom', not pad")):
        path = _with_metadata(repo / "models/export/model.onnx", tmp_path / f"{name}.onnx", edit)
        result = CliRunner().invoke(app, ["predict", str(repo / "plots"), "--model", str(path)])
        assert result.exit_code == 2 and result.output.startswith(f"error: {path}: ") and message in result.output
        assert result.output.count("\n") == 1, result.output
    proto = onnx.load(str(repo / "models/export/model.onnx"))  # our metadata, a graph onnxruntime cannot load
    proto.graph.node[0].op_type = "NoSuchOp"
    onnx.save_model(proto, str(tmp_path / "bad-op.onnx"))
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "one/a.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "one"), "--model", str(tmp_path / "bad-op.onnx")])
    assert result.exit_code == 2 and result.output.startswith(f"error: {tmp_path / 'bad-op.onnx'}: onnxruntime "
                                                              "cannot load it") and result.output.count("\n") == 1
    (tmp_path / "big").mkdir()  # every input skipped: an earlier --out is left as it was
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big/a.png")
    (tmp_path / "earlier.csv").write_text("earlier")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "big"), "--model",
                                      str(repo / "models/export/model.onnx"), "--out", str(tmp_path / "earlier.csv")])
    assert result.exit_code == 3 and "0 predicted, 1 skipped" in result.output
    assert (tmp_path / "earlier.csv").read_text() == "earlier"
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "empty"), "--model",
                                      str(repo / "models/export/model.onnx")])
    assert result.exit_code == 2 and f"no images found in {tmp_path / 'empty'}" in result.output
    result = CliRunner().invoke(app, ["predict", str(repo / "plots"), "--model", str(repo / "models/export/model.onnx"),
                                      "--out", str(tmp_path / "p.txt")])
    assert result.exit_code == 2 and "write .csv or .json" in result.output and not (tmp_path / "p.txt").exists()


def _with_metadata(source, path, edit):
    """A copy of the exported model with its metadata changed by `edit(dict)`."""
    import onnx

    proto = onnx.load(str(source))
    meta = {p.key: p.value for p in proto.metadata_props}
    edit(meta)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))
    return path


def test_failed_parity_gate_leaves_no_file(repo, tmp_path):
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(app, ["export", "-p", str(repo / "params.yaml"), "--data", str(repo / "data/prepared"),
                                      "--runs", str(repo / "runs"), "--out", str(out), "--metrics",
                                      str(tmp_path / "e.json"), "-S", "export.atol=1e-12",
                                      "-S", "export.small_batch_images=5"])
    assert result.exit_code == 1
    assert "ONNX parity gate failed" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_with_the_probe_head_folds_its_standardisation_into_the_graph(repo, tmp_path):
    import torch

    from pipeline.data import DeviceData, load_prepared
    from pipeline.export import Deployable
    from pipeline.io import manifest_id, read_manifest
    from pipeline.probe import load_probe, pooled_features
    from pipeline.student import load_student_dir

    data = load_prepared(repo / "data/prepared")
    distiller, _, _ = load_student_dir(repo / "runs/student-ours-s0", data)
    probe = load_probe(repo / "runs/probe-ours-s0", read_manifest(repo / "runs/student-ours-s0", "student"))
    images = data.test_images[:50]
    test = DeviceData(images, data.test_labels[:50], data.meta["mean"], data.meta["std"], torch.device("cpu"))
    want = probe.logits(pooled_features(distiller, test, 64)[0])
    with torch.no_grad():
        got = Deployable(distiller, data.meta["mean"], data.meta["std"], probe)(torch.from_numpy(images))
    assert torch.allclose(got.double(), want, atol=1e-4)

    args = ["export", "-p", str(repo / "params.yaml"), "--data", str(repo / "data/prepared"), "--runs",
            str(repo / "runs"), "--out", str(tmp_path / "export/m.onnx"), "--metrics", str(tmp_path / "e.json"),
            "-S", "export.head=probe"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["head"] == "probe"
    made_from = read_manifest(tmp_path / "export", "export")["inputs"]  # which student and probe the file holds
    assert made_from["student"] == manifest_id(read_manifest(repo / "runs/student-ours-s0", "student"))
    assert made_from["probe"] == manifest_id(read_manifest(repo / "runs/probe-ours-s0", "probe"))
    other = tmp_path / "runs"  # the probe of another student is refused
    shutil.copytree(repo / "runs", other)
    shutil.rmtree(other / "probe-ours-s0")
    shutil.copytree(other / "probe-ce-s0", other / "probe-ours-s0")
    result = CliRunner().invoke(app, [*args[:6], str(other), *args[7:]])
    assert result.exit_code == 2 and "made from another student" in result.output


def test_evaluate_and_export_refuse_unwritable_outputs_before_any_work(repo, tmp_path):
    (tmp_path / "e.json").write_text("earlier")
    (tmp_path / "e-details.json").mkdir()
    result = CliRunner().invoke(app, ["evaluate", "-p", str(repo / "params.yaml"), "--data",
                                      str(repo / "data/prepared"), "--teacher", str(repo / "models/teacher"),
                                      "--runs", str(repo / "runs"), "--metrics", str(tmp_path / "e.json"),
                                      "--report", str(tmp_path / "s.md"), "--plots", str(tmp_path / "p")])
    assert result.exit_code == 2 and "e-details.json is a folder" in result.output
    assert (tmp_path / "e.json").read_text() == "earlier" and not (tmp_path / "s.md").exists()
    (tmp_path / "x").mkdir()
    (tmp_path / "x/manifest.json").mkdir()
    result = CliRunner().invoke(app, ["export", "-p", str(repo / "params.yaml"), "--data", str(repo / "data/prepared"),
                                      "--runs", str(repo / "runs"), "--out", str(tmp_path / "x/m.onnx"),
                                      "--metrics", str(tmp_path / "e.json")])
    assert result.exit_code == 2 and "manifest.json is a folder" in result.output
    assert (tmp_path / "e.json").read_text() == "earlier" and not (tmp_path / "x/m.onnx").exists()
    (tmp_path / "x/manifest.json").rmdir()
    (tmp_path / "x/teacher.json").write_text("another stage's")  # e.g. `--out metrics/model.onnx`
    result = CliRunner().invoke(app, ["export", "-p", str(repo / "params.yaml"), "--data", str(repo / "data/prepared"),
                                      "--runs", str(repo / "runs"), "--out", str(tmp_path / "x/m.onnx"),
                                      "--metrics", str(tmp_path / "x/e.json")])  # its own metrics may lie there
    assert result.exit_code == 2 and result.output == (
        f"error: output folder {tmp_path / 'x'} holds other files (teacher.json): export into a folder of its own\n")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["teacher.json"]


def test_parity_gate_passes_equal_logits_and_fails_nan_ones(repo):
    import onnxruntime as ort

    from pipeline.errors import ParityError
    from pipeline.export import parity_gate

    images = np.load(repo / "data/prepared/test_images.npy")[:8]
    path = repo / "models/export/model.onnx"
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    passed = parity_gate(path, logits, images, 4, 1e-4, min_agreement=1.0)  # every image must agree: they do
    assert passed["top1_agreement"] == 1.0 and passed["max_abs_diff"] < 1e-5 and passed["images"] == 8
    with pytest.raises(ParityError, match="max \\|logit diff\\| nan"):  # NaN > atol is False: it once passed
        parity_gate(repo / "models/export/model.onnx", np.full((8, 10), np.nan, np.float32), images, 4, 1e-4,
                    min_agreement=0.0)  # the logit check alone


def test_evaluate_refuses_a_run_under_another_runs_name(repo, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(repo / "runs", runs)
    shutil.rmtree(runs / "student-ce-s0")
    shutil.copytree(runs / "student-ours-s0", runs / "student-ce-s0")
    result = CliRunner().invoke(app, ["evaluate", "-p", str(repo / "params.yaml"), "--data",
                                      str(repo / "data/prepared"), "--teacher", str(repo / "models/teacher"),
                                      "--runs", str(runs), "--metrics", str(tmp_path / "e.json"),
                                      "--report", str(tmp_path / "s.md"), "--plots", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert "student-ce-s0 holds the student of method ours, seed 0" in result.output
    assert not (tmp_path / "e.json").exists()


def test_evaluate_refuses_students_of_another_teacher(repo, tmp_path):
    other = tmp_path / "teacher"  # the same weights adopted by another teacher stage: another teacher id
    result = CliRunner().invoke(app, ["teacher", "-p", str(repo / "params.yaml"), "--data", str(repo / "data/prepared"),
                                      "-S", f"teacher.checkpoint={repo / 'models/teacher/model.pt'}", "--out",
                                      str(other), "--metrics", str(tmp_path / "t.json"), "--live-dir",
                                      str(tmp_path / "live"), "--resume-dir", str(tmp_path / "resume")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["evaluate", "-p", str(repo / "params.yaml"), "--data",
                                      str(repo / "data/prepared"), "--teacher", str(other),
                                      "--runs", str(repo / "runs"), "--metrics", str(tmp_path / "e.json"),
                                      "--report", str(tmp_path / "s.md"), "--plots", str(tmp_path / "p")])
    assert result.exit_code == 2 and result.output == (
        f"error: {repo / 'runs/student-ours-s0'} was made from another teacher: rerun the student stage\n")
    assert not (tmp_path / "e.json").exists()


def test_evaluate_reads_only_the_runs_of_the_current_matrix(repo, tmp_path):
    stale = repo / "runs/student-vkd-s5"
    shutil.copytree(repo / "runs/student-ours-s0", stale)
    try:
        result = CliRunner().invoke(app, ["evaluate", "-p", str(repo / "params.yaml"), "--data",
                                          str(repo / "data/prepared"), "--teacher", str(repo / "models/teacher"),
                                          "--runs", str(repo / "runs"), "--metrics", str(tmp_path / "e.json"),
                                          "--report", str(tmp_path / "s.md"), "--plots", str(tmp_path / "p")])
    finally:
        shutil.rmtree(stale)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert set(metrics) == {"teacher", "ours", "ce"}
    assert result.stdout.splitlines()[-1] == (  # one line; the table is the report's (make run prints it)
        f"evaluated teacher {metrics['teacher']['top1']:.2%}, ce {metrics['ce']['last_epoch_top1']:.2%}, "
        f"ours {metrics['ours']['last_epoch_top1']:.2%} (last epoch, mean over seeds) -> {tmp_path / 's.md'}")


def test_evaluate_reports_the_best_epoch_apart_from_the_last(repo, tmp_path):
    run = tmp_path / "runs/student-ours-s0"
    shutil.copytree(repo / "runs/student-ours-s0", run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["history"][0]["test_acc"] = 0.995  # an early epoch beats the last (history is in no checksummed file)
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["evaluate", "-p", str(repo / "params.yaml"), "-S", "methods=[ours]", "--data",
                                      str(repo / "data/prepared"), "--teacher", str(repo / "models/teacher"),
                                      "--runs", str(tmp_path / "runs"), "--metrics", str(tmp_path / "e.json"),
                                      "--report", str(tmp_path / "s.md"), "--plots", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "e.json").read_text())["ours"]
    assert ours["best_epoch_top1"] == 0.995 and ours["last_epoch_top1"] == pytest.approx(
        manifest["history"][-1]["test_acc"], abs=1e-6)


# README's recipe for one queue worker per GPU, on two GPUs: dvc numbers its workers and `-j k` starts only the
# missing ones, so the k-th is started, with its GPU, once the others have registered
PER_GPU_WORKERS = """for gpu in 0 1; do
  CUDA_VISIBLE_DEVICES=$gpu dvc queue start -j $((gpu + 1))
  until dvc queue status | awk -v n=$((gpu + 1)) '/^Worker status/ {exit ($3 + $5 < n)}'; do sleep 1; done
done"""


def test_queued_experiments_run_at_once_one_worker_per_gpu(repo):
    """`dvc exp run --queue` + README's worker per GPU: a seeds x methods sweep on top of the committed pipeline."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}  # two workers on two cores, as the README says

    def dvc(*args, timeout=120):
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)  # dvc.lock and the uncached metrics, as users do
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=repo, check=True)
    dvc("exp", "run", "--queue", "-n", "seed1-ours", "-S", "seeds=[1]", "-S", "methods=[ours]")
    dvc("exp", "run", "--queue", "-n", "seed1-ce", "-S", "seeds=[1]", "-S", "methods=[ce]")
    assert PER_GPU_WORKERS.replace("in 0 1;", "in 0 1 2 3;") in (ROOT / "README.md").read_text()
    subprocess.run(["bash", "-ec", PER_GPU_WORKERS], cwd=repo, env=env, check=True, timeout=120)
    deadline, most_running = time.monotonic() + 600, 0
    while "Queued" in (status := dvc("queue", "status")) or "Running" in status:
        assert time.monotonic() < deadline, status
        most_running = max(most_running, status.count("Running"))
        time.sleep(2)
    assert status.count("Success") == 2, status + dvc("queue", "logs", "seed1-ce")
    assert most_running == 2, "the two experiments never ran at the same time"
    log = dvc("queue", "logs", "seed1-ours")
    for stage in ("prepare", "teacher", "score"):  # the sweep reuses the committed teacher and its scores
        assert f"Stage '{stage}' didn't change" in log, log
    baseline = next(row for row in json.loads(dvc("exp", "show", "--json")) if row["rev"] != "workspace")
    rows, devices = {row["name"]: row for row in baseline["experiments"]}, {}
    for name, method in (("seed1-ours", "ours"), ("seed1-ce", "ce")):
        data = rows[name]["revs"][0]["data"]
        metrics = data["metrics"]["metrics/evaluate.json"]["data"]
        assert set(metrics) == {"teacher", method}, metrics
        assert 0.1 < metrics[method]["last_epoch_top1"] <= 1
        assert data["params"]["params.yaml"]["data"]["seeds"] == [1]
        manifest = dvc_api.read(f"runs/student-{method}-s1/manifest.json", repo=str(repo),
                                rev=rows[name]["revs"][0]["rev"])
        devices[name] = json.loads(manifest)["environment"]["cuda_visible_devices"]
    assert sorted(devices.values()) == ["0", "1"], devices  # each ran on its own worker's GPU
    # the sweep ran in temporary copies: the workspace still holds the baseline's outputs
    assert set(json.loads((repo / "metrics/evaluate.json").read_text())) == {"teacher", "ours", "ce"}
