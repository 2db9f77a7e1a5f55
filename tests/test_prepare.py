"""pipeline/prepare.py and the `kd prepare` stage, on a tiny Fashion-MNIST written as real idx files."""

import gzip
import json
import shutil
import struct

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.data import load_prepared
from pipeline.errors import InputError
from pipeline.prepare import balanced_subset, channel_stats, fit_channels, fit_size, transform
from pipeline.sources import FASHION_MNIST_CLASSES, RawData
from stages.cli import app
from test_io import block_sha256

runner = CliRunner()
ARRAY_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")


# --- balanced_subset -----------------------------------------------------------------------------


def uneven_labels():
    return np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [10, 7, 5]))


def test_balanced_subset_exact_counts():
    labels = uneven_labels()
    keep = balanced_subset(labels, 12, seed=0)
    assert np.bincount(labels[keep]).tolist() == [4, 4, 4]
    assert keep.tolist() == sorted(set(keep.tolist()))  # sorted, no repeats
    assert keep.min() >= 0 and keep.max() < len(labels)
    assert np.bincount(labels[balanced_subset(labels, 14, seed=0)]).tolist() == [4, 4, 4]  # size // classes each


def test_balanced_subset_seeded():
    labels = uneven_labels()
    np.testing.assert_array_equal(balanced_subset(labels, 9, seed=5), balanced_subset(labels, 9, seed=5))
    picks = {tuple(balanced_subset(labels, 9, seed=s)) for s in range(5)}
    assert len(picks) > 1  # the seed matters
    assert balanced_subset(labels, 15, seed=1).tolist() == sorted(balanced_subset(labels, 15, seed=1).tolist())


def test_balanced_subset_class_too_small():
    with pytest.raises(InputError, match="class 2 has 5 samples, the balanced subset needs 6"):
        balanced_subset(uneven_labels(), 18, seed=0)


def test_balanced_subset_smaller_than_class_count():
    with pytest.raises(InputError, match="subset of 5 is smaller than the 10 classes"):
        balanced_subset(np.repeat(np.arange(10), 5), 5, seed=0)


# --- fit_size / fit_channels / channel_stats --------------------------------------------------------


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_fit_size_pad_centres():
    images = random_images((3, 28, 28, 1)) | 1  # no zero pixel inside, so the border is all padding
    out = fit_size(images, 32, "pad")
    assert out.shape == (3, 32, 32, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 2:30, 2:30], images)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (out[:, border] == 0).all() and (out[:, ~border] > 0).all()
    odd = fit_size(random_images((1, 29, 27, 3)), 32, "pad")  # (32-29)//2 = 1 on top, (32-27)//2 = 2 left
    assert odd.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(odd[:, 1:30, 2:29], random_images((1, 29, 27, 3)))


def test_fit_size_same_size_and_too_big():
    images = random_images((2, 32, 32, 3))
    assert fit_size(images, 32, "pad") is images
    with pytest.raises(InputError, match="cannot pad 32x32 images to 28x28"):
        fit_size(images, 28, "pad")


def test_fit_size_resize():
    constant = np.full((2, 28, 28, 3), 77, np.uint8)
    for size in (32, 20):
        out = fit_size(constant, size, "resize")
        assert out.shape == (2, size, size, 3) and out.dtype == np.uint8
        assert set(np.unique(out)) == {77}
    halves = np.zeros((1, 28, 28, 1), np.uint8)
    halves[:, :, 14:] = 200
    out = fit_size(halves, 32, "resize")[0, :, :, 0]
    assert (out[:, :14] == 0).all() and (out[:, 18:] == 200).all()  # edge blurs, halves stay
    assert (np.diff(out.astype(int), axis=1) >= 0).all()  # monotone across the edge
    np.testing.assert_array_equal(out, out[:1].repeat(32, axis=0))  # rows unchanged by a horizontal edge


def test_fit_channels():
    grey = random_images((4, 8, 8, 1))
    rgb = fit_channels(grey, 3)
    assert rgb.shape == (4, 8, 8, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey[..., 0])
    assert fit_channels(grey, None) is grey and fit_channels(grey, 1) is grey
    primaries = np.array([[[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]]], np.uint8)
    luma = fit_channels(primaries, 1)
    assert luma.shape == (1, 1, 5, 1) and luma.dtype == np.uint8
    assert luma.ravel().tolist() == [76, 150, 29, 255, 0]  # round(255 * 0.299 / 0.587 / 0.114)
    colour = random_images((2, 16, 16, 3), seed=1)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in colour])
    assert np.abs(fit_channels(colour, 1)[..., 0].astype(int) - pil).max() <= 1  # as PIL's convert("L")
    with pytest.raises(InputError, match="cannot convert 4-channel images to 3 channels"):
        fit_channels(random_images((1, 4, 4, 4)), 3)


@pytest.mark.parametrize("chunk", [8192, 5, 1])
def test_channel_stats_match_numpy(chunk):
    images = random_images((37, 8, 8, 3), seed=2)
    images[..., 2] = np.where(images[..., 2] > 30, 255, images[..., 2])  # a skewed channel
    mean, std = channel_stats(images, chunk=chunk)
    x = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=0, atol=1e-9)
    assert isinstance(mean, list) and len(mean) == 3 and all(isinstance(v, float) for v in mean + std)


def test_channel_stats_grey_known_values():
    images = np.zeros((2, 2, 2, 1), np.uint8)
    images[0] = 255  # half the pixels 1.0, half 0.0
    mean, std = channel_stats(images)
    assert mean == [0.5] and std == [0.5]
    images[..., 0] = 77  # a constant channel: normalised to zeros, not NaN
    assert channel_stats(images) == ([77 / 255], [1.0])


# --- transform ---------------------------------------------------------------------------------


def raw_data(n_train=40, n_test=20, classes=4, size=28, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return RawData(rng.integers(0, 256, (n_train, size, size, channels), dtype=np.uint8),
                   np.arange(n_train) % classes,
                   rng.integers(0, 256, (n_test, size, size, channels), dtype=np.uint8),
                   np.arange(n_test) % classes, classes=[f"k{i}" for i in range(classes)])


def test_transform_subset_pad_channels():
    raw = raw_data()
    out = transform(raw, 32, "pad", 3, train_subset=8, test_subset=None, seed=0)
    assert out.train_images.shape == (8, 32, 32, 3) and out.test_images.shape == (20, 32, 32, 3)
    assert np.bincount(out.train_labels).tolist() == [2, 2, 2, 2]
    keep = balanced_subset(raw.train_labels, 8, seed=0)
    np.testing.assert_array_equal(out.train_images[:, 2:30, 2:30, 1], raw.train_images[keep, ..., 0])
    np.testing.assert_array_equal(out.test_images[:, 2:30, 2:30, 0], raw.test_images[..., 0])
    np.testing.assert_array_equal(out.test_labels, raw.test_labels)
    assert out.classes == raw.classes
    same = transform(raw, 32, "pad", 3, train_subset=40, test_subset=100, seed=0)  # subset >= n keeps all
    assert len(same.train_labels) == 40 and len(same.test_labels) == 20


def test_a_students_train_subset_is_the_subset_prepare_would_keep():
    from pipeline.data import Prepared

    raw = raw_data(n_train=60)
    whole = transform(raw, 32, "pad", None, None, None, seed=3)
    data = Prepared(whole.train_images, whole.train_labels, whole.test_images, whole.test_labels, {}, "d", seed=3)
    sub, kept = data.train_subset(20), transform(raw, 32, "pad", None, train_subset=20, test_subset=None, seed=3)
    np.testing.assert_array_equal(sub.train_images, kept.train_images)
    np.testing.assert_array_equal(sub.train_labels, kept.train_labels)
    assert sub.test_images is data.test_images and sub.data_id not in ("d", data.train_subset(12).data_id)
    assert data.train_subset(None) is data and data.train_subset(60) is data


def test_transform_class_missing_from_a_split():
    raw = raw_data()
    raw.test_labels = np.where(raw.test_labels == 2, 1, raw.test_labels)
    with pytest.raises(InputError, match=r"test split has no samples of class\(es\) \[2\]"):
        transform(raw, 32, "pad", None, None, None, seed=0)
    raw = raw_data()
    raw.train_labels = raw.train_labels % 2
    with pytest.raises(InputError, match=r"train split has no samples of class\(es\) \[2, 3\]"):
        transform(raw, 32, "pad", None, None, None, seed=0)


def test_transform_needs_two_classes():
    raw = raw_data(classes=1)
    with pytest.raises(InputError, match="need at least 2 classes, found 1"):
        transform(raw, 32, "pad", None, None, None, seed=0)


def test_transform_label_out_of_range():
    raw = raw_data()
    raw.train_labels = raw.train_labels.copy()
    raw.train_labels[0] = 12  # e.g. a stray byte in an idx labels file
    with pytest.raises(InputError, match=r"train labels span \d+\.\.12"):
        transform(raw, 32, "pad", None, None, None, seed=0)


# --- the `kd prepare` stage ----------------------------------------------------------------------


def write_idx_gz(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST (4 train and 2 test images per class) and a params file pointing at it."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    src = {"train": rng.integers(1, 256, (40, 28, 28), dtype=np.uint8), "train_labels": np.arange(40) % 10,
           "test": rng.integers(1, 256, (20, 28, 28), dtype=np.uint8), "test_labels": (np.arange(20) * 3) % 10}
    src["train"][:, 0, 0] = np.arange(40)  # pixel (0, 0) tells which source image a prepared one came from
    write_idx_gz(root / "train-images-idx3-ubyte.gz", src["train"])
    write_idx_gz(root / "train-labels-idx1-ubyte.gz", src["train_labels"])
    write_idx_gz(root / "t10k-images-idx3-ubyte.gz", src["test"])
    write_idx_gz(root / "t10k-labels-idx1-ubyte.gz", src["test_labels"])
    params = {"seed": 0, "prepare": {"source": "fashion-mnist", "root": str(root), "image_size": 32,
                                     "resize_mode": "pad", "channels": None, "train_subset": 20,
                                     "test_subset": None}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path, src


def run_prepare(out, *extra):
    return runner.invoke(app, ["prepare", "-p", "params.yaml", "--out", str(out), *extra])


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_stage_writes_arrays_meta_manifest(workdir):
    tmp, src = workdir
    result = run_prepare("prep")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ("prepared fashion-mnist: 20 train / 20 test images, 32x32x1, 10 classes "
                                     "-> prep")
    out = tmp / "prep"
    assert sorted(p.name for p in out.iterdir()) == sorted([*ARRAY_FILES, "meta.json", "manifest.json"])
    train, train_labels = np.load(out / "train_images.npy"), np.load(out / "train_labels.npy")
    test, test_labels = np.load(out / "test_images.npy"), np.load(out / "test_labels.npy")
    assert train.shape == (20, 32, 32, 1) and train.dtype == np.uint8 and train_labels.dtype == np.int64
    # the balanced subset: 2 distinct source images per class, in source order, each padded to 32x32
    ids = train[:, 2, 2, 0].astype(int)
    assert len(set(ids)) == 20 and ids.tolist() == sorted(ids)
    np.testing.assert_array_equal(train[:, 2:30, 2:30, 0], src["train"][ids])
    np.testing.assert_array_equal(train_labels, src["train_labels"][ids])
    assert np.bincount(train_labels, minlength=10).tolist() == [2] * 10
    assert (train[:, :2] == 0).all() and (train[:, 30:] == 0).all() and (train[:, :, :2] == 0).all()
    np.testing.assert_array_equal(test[:, 2:30, 2:30, 0], src["test"])  # test_subset null: all, in order
    np.testing.assert_array_equal(test_labels, src["test_labels"])

    meta = json.loads((out / "meta.json").read_text())
    x = train.astype(np.float64) / 255.0
    assert meta["classes"] == list(FASHION_MNIST_CLASSES) and meta["num_classes"] == 10
    assert meta["image_shape"] == [32, 32, 1] and meta["num_train"] == 20 and meta["num_test"] == 20
    assert meta["train_class_counts"] == [2] * 10
    np.testing.assert_allclose(meta["mean"], [x.mean()], rtol=0, atol=1e-12)
    np.testing.assert_allclose(meta["std"], [x.std()], rtol=0, atol=1e-12)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "prepare" and manifest["inputs"] == {"source": "fashion-mnist"}
    assert set(manifest["files"]) == {*ARRAY_FILES, "meta.json"}
    for name, digest in manifest["files"].items():
        assert digest == block_sha256((out / name).read_bytes()), name
    assert manifest["params"]["seed"] == 0 and manifest["params"]["train_subset"] == 20
    assert manifest["params"]["image_size"] == 32 and "root" not in manifest["params"]
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_prepare_stage_is_deterministic_and_seeded(workdir):
    tmp, _ = workdir
    assert run_prepare("a").exit_code == 0
    assert run_prepare("b").exit_code == 0
    a, b = snapshot(tmp / "a"), snapshot(tmp / "b")
    for name in (*ARRAY_FILES, "meta.json"):
        assert a[name] == b[name], name
    assert a["manifest.json"] == b["manifest.json"]
    shutil.copytree(tmp / "fmnist", tmp / "moved")  # the same data elsewhere: the same outputs, so nothing reruns
    assert run_prepare("moved-out", "-S", f"prepare.root={tmp / 'moved'}").exit_code == 0
    assert snapshot(tmp / "moved-out") == a
    assert run_prepare("c", "-S", "seed=1").exit_code == 0
    assert np.load(tmp / "c" / "train_images.npy").tobytes() != np.load(tmp / "a" / "train_images.npy").tobytes()
    assert json.loads((tmp / "c" / "manifest.json").read_text())["params"]["seed"] == 1


def test_prepare_stage_overrides_channels_and_resize(workdir):
    tmp, src = workdir
    result = run_prepare("rgb", "-S", "prepare.channels=3", "-S", "prepare.resize_mode=resize",
                         "-S", "prepare.image_size=16", "-S", "prepare.train_subset=null")
    assert result.exit_code == 0, result.output
    train = np.load(tmp / "rgb" / "train_images.npy")
    assert train.shape == (40, 16, 16, 3)
    np.testing.assert_array_equal(train[..., 0], train[..., 2])
    meta = json.loads((tmp / "rgb" / "meta.json").read_text())
    assert meta["image_shape"] == [16, 16, 3] and len(meta["mean"]) == 3 and meta["train_class_counts"] == [4] * 10


def test_load_prepared_round_trip(workdir):
    tmp, _ = workdir
    assert run_prepare("prep").exit_code == 0
    prepared = load_prepared(tmp / "prep")
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(prepared, name), np.load(tmp / "prep" / f"{name}.npy"))
    assert prepared.meta == json.loads((tmp / "prep" / "meta.json").read_text())
    assert prepared.num_classes == 10 and prepared.image_shape == (32, 32, 1)
    assert len(prepared.data_id) == 16 and int(prepared.data_id, 16) >= 0
    assert load_prepared(str(tmp / "prep")).data_id == prepared.data_id
    assert run_prepare("other", "-S", "seed=1").exit_code == 0
    assert load_prepared(tmp / "other").data_id != prepared.data_id


@pytest.mark.parametrize("name", ["train_labels.npy", "test_images.npy"])
def test_load_prepared_refuses_truncated_array(workdir, name):
    tmp, _ = workdir
    assert run_prepare("prep").exit_code == 0
    path = tmp / "prep" / name
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        load_prepared(tmp / "prep")


def test_load_prepared_refuses_missing_manifest_or_file(workdir):
    tmp, _ = workdir
    assert run_prepare("prep").exit_code == 0
    (tmp / "prep" / "meta.json").unlink()
    with pytest.raises(InputError, match=r"missing file: .*meta\.json"):
        load_prepared(tmp / "prep")
    (tmp / "prep" / "manifest.json").unlink()
    with pytest.raises(InputError, match="run the `prepare` stage first"):
        load_prepared(tmp / "prep")


@pytest.mark.parametrize("extra, message", [
    (["-S", "prepare.bogus=1"], "params: prepare.bogus: unknown key"),
    (["-S", "prepare.root=missing-folder"], "Fashion-MNIST folder not found: missing-folder"),
    (["-S", "prepare.image_size=16"], "cannot pad 28x28 images to 16x16"),  # fails after reading the source
    (["-S", "prepare.train_subset=39", "-S", "seed=2"], None),  # sanity: a good run changes the folder
], ids=["bad-key", "missing-root", "bad-size", "good-run"])
def test_failing_run_leaves_earlier_output_untouched(workdir, extra, message):
    tmp, _ = workdir
    assert run_prepare("prep").exit_code == 0
    before = snapshot(tmp / "prep")
    result = run_prepare("prep", *extra)
    if message is None:
        assert result.exit_code == 0, result.output
        assert snapshot(tmp / "prep")["train_images.npy"] != before["train_images.npy"]
        return
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert snapshot(tmp / "prep") == before  # byte-identical, no stray temporary files


def test_failing_first_run_writes_nothing(workdir):
    tmp, _ = workdir
    result = run_prepare("fresh", "-S", "prepare.root=nowhere")
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert not (tmp / "fresh").exists()
