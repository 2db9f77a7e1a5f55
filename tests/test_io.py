"""File digests (sha256 over 16 MiB blocks, equal to the definition), manifests, checkpoints and atomic outputs."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.io import (BLOCK, atomic_dir, atomic_path, check_outputs, file_digest, read_verified, save_npy,
                         write_json, write_manifest)
from tiny import killed_at_rename


def block_sha256(data: bytes) -> str:
    """The digest's definition, written out plainly."""
    blocks = [data[i:i + BLOCK] for i in range(0, max(len(data), 1), BLOCK)]
    return hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blocks)).hexdigest()


@pytest.mark.parametrize("size", [0, 1000, BLOCK - 128, 2 * BLOCK + 12345])
def test_written_and_read_digests_equal_the_definition(tmp_path, size):
    array = np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8)
    digest = save_npy(tmp_path / "a.npy", array)
    data = (tmp_path / "a.npy").read_bytes()
    assert digest == file_digest(tmp_path / "a.npy") == block_sha256(data)
    assert np.array_equal(np.load(tmp_path / "a.npy"), array)


def test_a_flipped_byte_in_a_middle_block_is_refused(tmp_path):
    array = np.zeros(3 * BLOCK, dtype=np.uint8)
    files = {"a.npy": save_npy(tmp_path / "a.npy", array)}
    write_manifest(tmp_path, "cache", {}, inputs={}, files=files)
    read_verified(tmp_path, "cache", {})
    with open(tmp_path / "a.npy", "r+b") as f:
        f.seek(BLOCK + BLOCK // 2)
        f.write(b"\x01")
    with pytest.raises(InputError, match="does not match its manifest checksum"):
        read_verified(tmp_path, "cache", {})


def test_outputs_checksummed_by_an_older_version_are_refused_as_such_not_as_corrupt(tmp_path):
    import json

    files = {"a.npy": hashlib.sha256(b"whole file").hexdigest()}  # what a plain-sha256 manifest held
    write_manifest(tmp_path, "prepare", {}, inputs={}, files=files)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["digest"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"older version of the pipeline .*: rerun the `prepare` stage"):
        read_verified(tmp_path, "prepare", {})


def test_code_version_without_git_digests_the_sources(monkeypatch):
    import subprocess

    from pipeline import io

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    io.code_version.cache_clear()
    try:
        version = io.code_version()
        root = Path(io.__file__).parents[1]
        sources = sorted([*(root / "pipeline").rglob("*.py"), *(root / "stages").glob("*.py")])
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:10]
        assert version == f"{io.__version__}+src.{digest}"  # the library's and the stages' sources
    finally:
        io.code_version.cache_clear()


@pytest.mark.parametrize("content", [b"\xe0\x00binary", b"[1, 2]", b'{"stage": "prepare", "params": {}}'])
def test_corrupt_manifests_are_refused_in_one_line(tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(InputError, match="corrupt JSON|not a manifest of this pipeline") as err:
        read_verified(tmp_path, "prepare", {})
    assert "\n" not in str(err.value)


SPEC = {"arch": "resnet9", "num_classes": 3, "in_chans": 1, "image_size": 8, "width": 0.0625}


@pytest.mark.parametrize("checkpoint, message", [
    ({"format": "kd-model/1"}, r"malformed model description \(KeyError"),
    ({"format": "kd-model/1", "spec": {"arch": "resnet9", "bogus": 1}, "state_dict": {}},
     r"malformed model description \(TypeError"),
    ({"format": "kd-model/1", "spec": SPEC, "state_dict": [1, 2]}, r"weights do not fit resnet9: "),
    ("another width", r"weights do not fit resnet9: Error\(s\) in loading state_dict"),
])
def test_malformed_model_checkpoints_are_refused_in_one_line(tmp_path, checkpoint, message):
    from pipeline.checkpoint import load_model, save_model, save_torch
    from pipeline.models import ModelSpec, build_model

    if checkpoint == "another width":  # weights of a model twice as wide as its description says
        save_model(tmp_path / "model.pt", build_model(ModelSpec(**{**SPEC, "width": 0.125})), ModelSpec(**SPEC))
    else:
        save_torch(tmp_path / "model.pt", checkpoint)
    with pytest.raises(InputError, match=f"model.pt: {message}") as err:
        load_model(tmp_path / "model.pt")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("checkpoint, message", [
    ({"format": "kd-student/1", "spec": SPEC}, r"malformed student description \(KeyError: 'method'\)"),
    ({"format": "kd-student/1", "spec": SPEC, "method": "oracle"}, r"malformed student description \(KeyError"),
    ({"format": "kd-student/1", "spec": {**SPEC, "bogus": 1}}, r"malformed student description \(TypeError"),
])
def test_malformed_student_checkpoints_are_refused_in_one_line(tmp_path, checkpoint, message):
    from pipeline.checkpoint import save_torch
    from pipeline.student import load_student

    save_torch(tmp_path / "model.pt", checkpoint)
    with pytest.raises(InputError, match=f"model.pt: {message}") as err:
        load_student(tmp_path / "model.pt")
    assert "\n" not in str(err.value)


class _RunsCode:
    """Unpickled, it would call os.makedirs: what a crafted checkpoint could do with plain pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    import torch

    from pipeline.checkpoint import load_model

    torch.save({"format": "kd-model/1", "spec": SPEC, "state_dict": _RunsCode(str(tmp_path / "ran"))},
               tmp_path / "model.pt")
    with pytest.raises(InputError, match=r"^corrupt or unreadable checkpoint .*model.pt: UnpicklingError$"):
        load_model(tmp_path / "model.pt")
    assert not (tmp_path / "ran").exists()


def test_outputs_get_the_permissions_of_the_umask_not_of_temporary_files(tmp_path, monkeypatch):
    import pipeline.io

    monkeypatch.setattr(pipeline.io, "_UMASK", 0o022)  # as read from the process when the module loads
    write_json(tmp_path / "m.json", {})
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644  # mkstemp's would be 0600
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700


def test_a_checkpoint_of_another_kind_is_refused_by_name(tmp_path):
    import torch

    from pipeline.checkpoint import load_checkpoint, load_model, save_checkpoint
    from pipeline.student import load_student

    save_checkpoint(tmp_path / "probe.pt", "kd-probe/1", torch.nn.Linear(2, 3), layer=4)
    probe = load_checkpoint(tmp_path / "probe.pt", "kd-probe/1", "probe")
    assert probe["layer"] == 4 and probe["state_dict"]["weight"].shape == (3, 2)
    with pytest.raises(InputError, match="probe.pt is not a model checkpoint of this pipeline"):
        load_model(tmp_path / "probe.pt")
    with pytest.raises(InputError, match="probe.pt is not a student checkpoint of this pipeline"):
        load_student(tmp_path / "probe.pt")


def test_an_output_onto_a_folder_is_refused_and_the_folder_kept(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        write_json(tmp_path / "out", {})
    assert (tmp_path / "out").is_dir()


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("midway")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_folder_output_replaces_only_a_folder_this_pipeline_wrote(tmp_path, monkeypatch):
    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for check in (lambda: check_outputs(folders=(mine,)), lambda: atomic_dir(mine).__enter__()):
        with pytest.raises(InputError, match="docs holds files this pipeline did not write"):
            check()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and sorted(tmp_path.iterdir()) == [mine]
    with pytest.raises(InputError, match=r"output .*/m.json is given for two outputs"):
        check_outputs(tmp_path / "m.json", tmp_path / "x/../m.json")
    with pytest.raises(InputError, match=r"output .*out/live is inside .*out, which is replaced whole"):
        check_outputs(tmp_path / "m.json", folders=(tmp_path / "out", tmp_path / "out/live"))
    monkeypatch.chdir(mine)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="holds the working folder"):
        check_outputs(folders=(tmp_path,))
    for marker in ("manifest.json", "metrics.json"):  # a stage's outputs, dvclive's curves
        ours = tmp_path / f"out-{marker}"
        ours.mkdir()
        (ours / marker).write_text("{}")
        with atomic_dir(ours) as tmp:
            (tmp / "new").write_text("new")
        assert [p.name for p in ours.iterdir()] == ["new"]


def test_a_folder_swap_stopped_between_its_renames_puts_the_earlier_outputs_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("earlier")
    killed_at_rename(monkeypatch, 2)  # once the earlier folder is moved aside
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "manifest.json").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "manifest.json").read_text() == "earlier"
