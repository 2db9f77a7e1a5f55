"""Readers of the raw dataset formats, on tiny datasets written in the real on-disk layouts."""

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import InputError
from pipeline.sources import (
    FASHION_MNIST_CLASSES,
    read_cifar,
    read_fashion_mnist,
    read_idx,
    read_image_folder,
    read_source,
    stratified_mask,
)

# --- MNIST idx ---------------------------------------------------------------------------------


def idx_bytes(array, type_code=0x08, byteorder=">"):
    """An idx file: 0x00 0x00 <type> <ndim>, big-endian uint32 dims, then the row-major body."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f"{byteorder}{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path, data, gz=True):
    if not isinstance(data, bytes):
        data = idx_bytes(data)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fmnist_arrays(seed=0, n_train=30, n_test=20):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    return train, (np.arange(n_train) * 7) % 10, test, (np.arange(n_test) * 3) % 10


def write_fmnist(root, arrays, gz=True):
    root.mkdir(parents=True, exist_ok=True)
    train, train_labels, test, test_labels = arrays
    write_idx(root / "train-images-idx3-ubyte", train, gz)
    write_idx(root / "train-labels-idx1-ubyte", train_labels, gz)
    write_idx(root / "t10k-images-idx3-ubyte", test, gz)
    write_idx(root / "t10k-labels-idx1-ubyte", test_labels, gz)
    return root


@pytest.fixture
def fmnist(tmp_path):
    arrays = fmnist_arrays()
    return write_fmnist(tmp_path / "fmnist", arrays), arrays


def check_fmnist(raw, arrays):
    train, train_labels, test, test_labels = arrays
    assert raw.train_images.shape == (30, 28, 28, 1) and raw.test_images.shape == (20, 28, 28, 1)
    assert raw.train_images.dtype == np.uint8 and raw.test_images.dtype == np.uint8
    np.testing.assert_array_equal(raw.train_images[..., 0], train)
    np.testing.assert_array_equal(raw.test_images[..., 0], test)
    assert raw.train_labels.dtype == np.int64 and raw.test_labels.dtype == np.int64
    np.testing.assert_array_equal(raw.train_labels, train_labels)
    np.testing.assert_array_equal(raw.test_labels, test_labels)
    assert raw.classes == list(FASHION_MNIST_CLASSES)
    assert len(raw.classes) == 10 and raw.classes[0] == "T-shirt/top" and raw.classes[9] == "Ankle boot"


def test_fashion_mnist_gzipped_idx_exact_arrays(fmnist):
    root, arrays = fmnist
    check_fmnist(read_fashion_mnist(root), arrays)


def test_fashion_mnist_uncompressed_idx(tmp_path):
    arrays = fmnist_arrays(seed=1)
    root = write_fmnist(tmp_path / "raw", arrays, gz=False)
    assert not list(root.glob("*.gz"))
    check_fmnist(read_fashion_mnist(str(root)), arrays)


def test_read_idx_big_endian_dims_and_row_major_body(tmp_path):
    array = np.arange(2 * 3 * 300, dtype=np.int64).reshape(2, 3, 300) % 251  # dims > 255 need all 4 bytes
    path = write_idx(tmp_path / "x-idx3-ubyte", array)
    out = read_idx(path)
    assert out.shape == (2, 3, 300) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)
    assert out[1, 2, 299] == (2 * 3 * 300 - 1) % 251


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        read_fashion_mnist(tmp_path / "nope")
    assert "nope" in str(err.value)


def test_missing_idx_file_is_named(fmnist):
    root, _ = fmnist
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte"):
        read_fashion_mnist(root)


@pytest.mark.parametrize("header", [b"\x08\x03\x00\x00", b"\x00\x00\x0d\x03", b"\x00\x01\x08\x03"],
                         ids=["swapped-bytes", "float-type", "nonzero-prefix"])
def test_wrong_magic(fmnist, header):
    root, (train, *_) = fmnist
    write_idx(root / "train-images-idx3-ubyte", header + idx_bytes(train)[4:])
    with pytest.raises(InputError, match="not an unsigned-byte idx file") as err:
        read_fashion_mnist(root)
    assert "train-images-idx3-ubyte" in str(err.value)


def test_header_body_size_mismatch(fmnist):
    root, (train, *_) = fmnist
    write_idx(root / "train-images-idx3-ubyte", idx_bytes(train)[:-1])
    with pytest.raises(InputError, match=r"holds 23519 values, its header says \(30, 28, 28\)"):
        read_fashion_mnist(root)


def test_little_endian_header_is_a_size_mismatch(fmnist):
    root, (_, _, test, _) = fmnist
    write_idx(root / "t10k-images-idx3-ubyte", idx_bytes(test, byteorder="<"))
    with pytest.raises(InputError, match="header says"):
        read_fashion_mnist(root)


def test_images_labels_count_mismatch(fmnist):
    root, (_, train_labels, _, _) = fmnist
    write_idx(root / "train-labels-idx1-ubyte", train_labels[:-1])
    with pytest.raises(InputError, match=r"train images \(30, 28, 28\) do not match labels \(29,\)"):
        read_fashion_mnist(root)


def test_images_file_in_place_of_labels_is_refused(fmnist):
    root, (_, train_labels, _, _) = fmnist
    write_idx(root / "t10k-images-idx3-ubyte", train_labels)  # 1-d where images belong
    with pytest.raises(InputError, match="test images"):
        read_fashion_mnist(root)


def test_not_gzip_and_truncated_gzip(fmnist):
    root, (train, *_) = fmnist
    (root / "train-images-idx3-ubyte.gz").write_bytes(idx_bytes(train))  # plain bytes named .gz
    with pytest.raises(InputError, match="cannot read idx file"):
        read_fashion_mnist(root)
    packed = gzip.compress(idx_bytes(train))
    (root / "train-images-idx3-ubyte.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputError, match="cannot read idx file"):
        read_fashion_mnist(root)


def test_truncated_idx_header(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 30))  # says 3 dims, holds 1
    with pytest.raises(InputError, match="idx header is truncated"):
        read_idx(path)


def test_idx_header_too_big_to_multiply_is_refused(tmp_path):
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 4194304, 4194304, 4194304))  # 2**66 wraps to 0
    with pytest.raises(InputError, match="holds 0 values, its header says"):
        read_idx(path)


def test_corrupt_gzip_body(tmp_path):
    packed = bytearray(gzip.compress(idx_bytes(np.arange(3000) % 256)))
    for i in range(12, 40):
        packed[i] ^= 0xFF
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(InputError, match="cannot read idx file"):
        read_idx(path)


def test_labels_file_with_images_layout_is_refused(fmnist):
    root, (train, *_) = fmnist
    write_idx(root / "train-labels-idx1-ubyte", train)  # idx3 of 30 images where 30 labels belong
    with pytest.raises(InputError, match=r"train images \(30, 28, 28\) do not match labels \(30, 28, 28\)"):
        read_fashion_mnist(root)


# --- CIFAR python pickles ------------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(parent, seed=0, per_batch=4, n_test=6):
    """torchvision's cifar-10-batches-py layout; returns the rows and labels written, in file order."""
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for k in range(1, 6):
        data, y = cifar_rows(rng, per_batch), [(k + 3 * i) % 10 for i in range(per_batch)]
        dump(folder / f"data_batch_{k}", {b"batch_label": f"training batch {k} of 5".encode(),
                                          b"labels": y, b"data": data, b"filenames": [b"x.png"] * per_batch})
        rows.append(data)
        labels += y
    test, test_y = cifar_rows(rng, n_test), [(2 * i + 1) % 10 for i in range(n_test)]
    dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_y, b"data": test})
    dump(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                   b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    return folder, np.concatenate(rows), np.array(labels), test, np.array(test_y)


def write_cifar100(parent, seed=0, n_train=12, n_test=5):
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = cifar_rows(rng, n_train), cifar_rows(rng, n_test)
    fine, fine_test = [(13 * i) % 100 for i in range(n_train)], [(31 * i + 5) % 100 for i in range(n_test)]
    dump(folder / "train", {b"data": train, b"fine_labels": fine, b"coarse_labels": [i % 20 for i in fine]})
    dump(folder / "test", {b"data": test, b"fine_labels": fine_test,
                           b"coarse_labels": [i % 20 for i in fine_test]})
    dump(folder / "meta", {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
                           b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return folder, train, np.array(fine), test, np.array(fine_test)


def check_pixels(images, rows):
    """images[i, y, x, c] must be rows[i, c*1024 + y*32 + x]: the row holds the R, G, B planes in turn."""
    assert images.shape == (len(rows), 32, 32, 3) and images.dtype == np.uint8
    for i in range(len(rows)):
        for y, x, c in [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 31, 0), (31, 0, 2), (5, 17, 1), (31, 31, 2), (17, 5, 0)]:
            assert images[i, y, x, c] == rows[i, c * 1024 + y * 32 + x], (i, y, x, c)
    # the red plane of image 0 is the first 1024 bytes of its row, row-major
    np.testing.assert_array_equal(images[0, :, :, 0].ravel(), rows[0, :1024])
    np.testing.assert_array_equal(images[0, :, :, 2].ravel(), rows[0, 2048:])


def test_cifar10_folder(tmp_path):
    folder, rows, labels, test_rows, test_labels = write_cifar10(tmp_path)
    for root in (tmp_path, folder):  # the parent of cifar-10-batches-py or the folder itself
        raw = read_cifar(root, "cifar10")
        check_pixels(raw.train_images, rows)
        check_pixels(raw.test_images, test_rows)
        assert raw.train_labels.dtype == np.int64
        np.testing.assert_array_equal(raw.train_labels, labels)  # data_batch_1..5 in order
        np.testing.assert_array_equal(raw.test_labels, test_labels)
        assert raw.classes == CIFAR10_NAMES


def test_cifar100_fine_labels(tmp_path):
    _, rows, fine, test_rows, fine_test = write_cifar100(tmp_path)
    raw = read_cifar(tmp_path, "cifar100")
    check_pixels(raw.train_images, rows)
    check_pixels(raw.test_images, test_rows)
    np.testing.assert_array_equal(raw.train_labels, fine)
    np.testing.assert_array_equal(raw.test_labels, fine_test)
    assert raw.train_labels.max() > 19  # fine, not coarse labels
    assert len(raw.classes) == 100 and raw.classes[0] == "fine00" and raw.classes[99] == "fine99"


def make_archive(src_parent, folder_name, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_parent / folder_name, arcname=folder_name)
    return archive


def test_cifar10_from_tar_gz(tmp_path):
    _, rows, labels, test_rows, test_labels = write_cifar10(tmp_path / "src")
    archive = make_archive(tmp_path / "src", "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    raw = read_cifar(archive, "cifar10")
    check_pixels(raw.train_images, rows)
    check_pixels(raw.test_images, test_rows)
    np.testing.assert_array_equal(raw.train_labels, labels)
    np.testing.assert_array_equal(raw.test_labels, test_labels)
    assert raw.classes == CIFAR10_NAMES
    (extracted,) = tmp_path.glob("cifar-10-python_extracted_*")
    made = extracted.stat().st_mtime_ns, extracted.stat().st_ino
    again = read_cifar(str(archive), "cifar10")  # second read reuses the extraction
    np.testing.assert_array_equal(again.train_images, raw.train_images)
    assert list(tmp_path.glob("cifar-10-python_extracted_*")) == [extracted]
    assert (extracted.stat().st_mtime_ns, extracted.stat().st_ino) == made


def test_cifar100_from_tgz(tmp_path):
    _, rows, fine, _, _ = write_cifar100(tmp_path / "src")
    archive = make_archive(tmp_path / "src", "cifar-100-python", tmp_path / "cifar-100-python.tgz")
    raw = read_cifar(archive, "cifar100")
    check_pixels(raw.train_images, rows)
    np.testing.assert_array_equal(raw.train_labels, fine)


def test_cifar_corrupt_pickle_is_named(tmp_path):
    folder, *_ = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"this is not a pickle at all")
    with pytest.raises(InputError, match="corrupt CIFAR pickle .*data_batch_3"):
        read_cifar(tmp_path, "cifar10")
    full = (folder / "test_batch").read_bytes()
    (folder / "data_batch_3").write_bytes(full[: len(full) // 2])  # truncated download
    with pytest.raises(InputError, match="corrupt CIFAR pickle .*data_batch_3"):
        read_cifar(tmp_path, "cifar10")


@pytest.mark.parametrize("call, name", [("makedirs", r"os\.makedirs"),
                                        ("save", r"numpy\.save")])  # numpy's module, not one of its array types
def test_a_cifar_pickle_calling_code_is_refused_without_calling_it(tmp_path, call, name):
    import os

    folder, *_ = write_cifar10(tmp_path)
    made = tmp_path / "made-by-the-pickle.npy"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(made),)) if call == "makedirs" else (np.save, (str(made), np.zeros(1)))

    dump(folder / "data_batch_2", {b"data": Payload(), b"labels": [0]})
    with pytest.raises(InputError, match=rf"corrupt CIFAR pickle .*data_batch_2: UnpicklingError: {name} is "
                                         r"not allowed in a CIFAR pickle"):
        read_cifar(tmp_path, "cifar10")
    assert not made.exists()


def test_cifar_pickle_corrupt_in_its_frame_length_is_named(tmp_path):
    folder, *_ = write_cifar10(tmp_path)
    path = folder / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, f, protocol=4)
    data = bytearray(path.read_bytes())
    data[3:11] = b"\xff" * 8  # protocol 4's FRAME length: OverflowError or MemoryError, not an UnpicklingError
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt CIFAR pickle .*data_batch_1"):
        read_cifar(tmp_path, "cifar10")


@pytest.mark.parametrize("meta", [[1, 2], {b"names": []}])
def test_cifar_meta_without_class_names_is_named(tmp_path, meta):
    folder, *_ = write_cifar10(tmp_path)
    dump(folder / "batches.meta", meta)
    with pytest.raises(InputError, match="batches.meta is not a CIFAR meta file"):
        read_cifar(tmp_path, "cifar10")


def test_a_replaced_cifar_archive_is_extracted_anew(tmp_path):
    _, rows_a, *_ = write_cifar10(tmp_path / "a", seed=0)
    _, rows_b, *_ = write_cifar10(tmp_path / "b", seed=1)
    archive = tmp_path / "cifar-10-python.tar.gz"
    first = read_cifar(make_archive(tmp_path / "a", "cifar-10-batches-py", archive), "cifar10")
    second = read_cifar(make_archive(tmp_path / "b", "cifar-10-batches-py", archive), "cifar10")
    check_pixels(first.train_images, rows_a)
    check_pixels(second.train_images, rows_b)  # the new archive's images, not the old extraction's


def test_two_runs_extracting_one_archive_at_once_both_read_it(tmp_path, monkeypatch):
    _, rows, *_ = write_cifar10(tmp_path / "src")
    archive = make_archive(tmp_path / "src", "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    extractall = tarfile.TarFile.extractall

    def another_run_finishing_first(tar, path, **kwargs):
        extractall(tar, path, **kwargs)
        target = Path(path).with_name(Path(path).name[1:].rsplit(".", 1)[0])  # .<target>.<random> -> <target>
        if not target.exists():
            extractall(tar, target, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", another_run_finishing_first)
    check_pixels(read_cifar(archive, "cifar10").train_images, rows)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial extraction left


def test_cifar_missing_file(tmp_path):
    folder, *_ = write_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(InputError, match="missing CIFAR file: .*test_batch"):
        read_cifar(tmp_path, "cifar10")


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(InputError, match="cifar100 folder not found"):
        read_cifar(tmp_path, "cifar100")


def test_cifar_rows_of_wrong_width(tmp_path):
    folder, *_ = write_cifar10(tmp_path)
    dump(folder / "data_batch_2", {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(InputError, match=r"data_batch_2: data \(4, 3000\) is not N x 3072"):
        read_cifar(tmp_path, "cifar10")
    dump(folder / "data_batch_2", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(InputError, match="one label per row"):
        read_cifar(tmp_path, "cifar10")


def test_cifar_archive_that_is_not_a_tar(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b but not really gzip")
    with pytest.raises(InputError, match="cannot extract"):
        read_cifar(archive, "cifar10")


def test_cifar_batch_without_data_key(tmp_path):
    folder, *_ = write_cifar10(tmp_path)
    dump(folder / "data_batch_1", {b"labels": [0, 1, 2, 3]})
    with pytest.raises(InputError, match="data_batch_1 is not a CIFAR batch .needs keys data and labels."):
        read_cifar(tmp_path, "cifar10")


def test_cifar_archive_fixed_after_a_truncated_download(tmp_path):
    write_cifar10(tmp_path / "src", per_batch=40)
    archive = make_archive(tmp_path / "src", "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    good = archive.read_bytes()
    archive.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="cannot extract"):
        read_cifar(archive, "cifar10")
    archive.write_bytes(good)  # the download is redone
    assert len(read_cifar(archive, "cifar10").train_labels) == 200


# --- image folders ---------------------------------------------------------------------------------


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def tagged_image(tag, size=32, rng=None):
    """An RGB image whose pixel (0, 0) holds `tag` in every channel; the rest is random."""
    rng = rng or np.random.default_rng(tag)
    image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    image[0, 0] = tag
    return image


CLASSES = ["cat", "dog", "frog"]


def write_split_folders(root, n_train=3, n_test=2):
    written = {"train": [], "test": []}
    tag = 1
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(CLASSES):
            for i in range(n):
                image = tagged_image(tag)
                write_png(root / split / name / f"img{i:02d}.png", image)
                written[split].append((image, label))
                tag += 1
    return written


def test_image_folder_train_test(tmp_path):
    written = write_split_folders(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored
    (tmp_path / "train" / ".cache").mkdir()  # hidden folders are not classes
    (tmp_path / "test" / ".cache").mkdir()
    raw = read_image_folder(tmp_path, 32, 3, 0.2, seed=0)
    assert raw.classes == CLASSES
    for split in ("train", "test"):
        images, labels = getattr(raw, f"{split}_images"), getattr(raw, f"{split}_labels")
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, np.stack([im for im, _ in written[split]]))  # PNG is lossless
        np.testing.assert_array_equal(labels, [y for _, y in written[split]])
    assert raw.train_images.shape == (9, 32, 32, 3) and raw.test_images.shape == (6, 32, 32, 3)


def test_image_folder_grey_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    grey = {name: rng.integers(0, 256, size=(32, 32), dtype=np.uint8) for name in CLASSES}
    for split in ("train", "test"):
        for name in CLASSES:
            write_png(tmp_path / split / name / "a.png", grey[name])
            write_png(tmp_path / split / name / "b.png", np.full((40, 40, 3), 90 + CLASSES.index(name), np.uint8))
    raw = read_image_folder(tmp_path, 32, 1, 0.2, seed=0)
    assert raw.train_images.shape == (6, 32, 32, 1)
    np.testing.assert_array_equal(raw.train_images[0, ..., 0], grey["cat"])  # grey PNG read exactly
    np.testing.assert_array_equal(raw.train_images[2, ..., 0], grey["dog"])
    assert set(np.unique(raw.train_images[1])) == {90}  # 40x40 constant resized to 32x32 stays constant
    assert set(np.unique(raw.test_images[5])) == {92}
    rgb = read_image_folder(tmp_path, 32, 3, 0.2, seed=0)  # grey image repeated into 3 channels
    for c in range(3):
        np.testing.assert_array_equal(rgb.train_images[0, ..., c], grey["cat"])


def test_image_folder_pads_in_pad_mode_and_refuses_larger_images(tmp_path):
    for split in ("train", "test"):
        for name in CLASSES:
            write_png(tmp_path / split / name / "a.png", np.full((20, 20, 3), 200, np.uint8))
    raw = read_image_folder(tmp_path, 32, 3, 0.2, seed=0, resize_mode="pad")
    image = raw.train_images[0]
    assert (image[6:26, 6:26] == 200).all() and image.sum() == 200 * 20 * 20 * 3  # centred, zero border
    write_png(tmp_path / "train" / "dog" / "big.png", np.zeros((40, 20, 3), np.uint8))
    with pytest.raises(InputError, match=r"big.png: cannot pad 40x20 images to 32x32"):
        read_image_folder(tmp_path, 32, 3, 0.2, seed=0, resize_mode="pad")


def test_image_folder_16_bit_grey_keeps_its_top_8_bits(tmp_path):
    deep = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0..65472
    for split in ("train", "test"):
        for name in CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(deep).save(tmp_path / split / name / "a.png")
    raw = read_image_folder(tmp_path, 32, 1, 0.2, seed=0)
    np.testing.assert_array_equal(raw.train_images[0, ..., 0], (deep >> 8).astype(np.uint8))


def write_flat(root, per_class=5):
    tag = 1
    for name in CLASSES:
        for i in range(per_class):
            write_png(root / name / f"{i}.png", tagged_image(tag))
            tag += 1
    return tag - 1


def test_image_folder_seeded_stratified_split(tmp_path):
    total = write_flat(tmp_path, per_class=5)
    a = read_image_folder(tmp_path, 32, 3, test_fraction=0.4, seed=3)
    b = read_image_folder(tmp_path, 32, 3, test_fraction=0.4, seed=3)
    c = read_image_folder(tmp_path, 32, 3, test_fraction=0.4, seed=4)
    assert a.classes == CLASSES
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert np.bincount(a.test_labels).tolist() == [2, 2, 2]  # round(0.4 * 5) of every class
    assert np.bincount(a.train_labels).tolist() == [3, 3, 3]
    train_tags, test_tags = a.train_images[:, 0, 0, 0].tolist(), a.test_images[:, 0, 0, 0].tolist()
    assert sorted(train_tags + test_tags) == list(range(1, total + 1))  # a partition of all images
    for tags, labels in ((train_tags, a.train_labels), (test_tags, a.test_labels)):
        assert [(t - 1) // 5 for t in tags] == labels.tolist()  # each image keeps its class
    assert c.test_images[:, 0, 0, 0].tolist() != test_tags  # another seed, another split


def test_stratified_mask_counts():
    labels = np.repeat([0, 1, 2, 3], [2, 3, 10, 100])
    mask = stratified_mask(labels, 0.2, seed=0)
    counts = [int(mask[labels == c].sum()) for c in range(4)]
    assert counts == [1, 1, 2, 20]  # at least one, never all, else round(0.2 * n)
    np.testing.assert_array_equal(mask, stratified_mask(labels, 0.2, seed=0))
    assert stratified_mask(np.array([0, 0, 1, 1]), 0.99, seed=0).tolist().count(True) == 2  # never all


def test_image_folder_empty_class(tmp_path):
    write_split_folders(tmp_path)
    for p in (tmp_path / "test" / "dog").iterdir():
        p.unlink()
    with pytest.raises(InputError, match=r"class folder .*test/dog has no images"):
        read_image_folder(tmp_path, 32, 3, 0.2, seed=0)


def test_image_folder_unreadable_image_is_named(tmp_path):
    write_split_folders(tmp_path)
    (tmp_path / "train" / "frog" / "broken.png").write_bytes(b"\x89PNG garbage, not an image")
    with pytest.raises(InputError, match=r"image .*frog/broken\.png: unreadable"):
        read_image_folder(tmp_path, 32, 3, 0.2, seed=0)


def test_image_folder_image_with_a_bad_header_is_named(tmp_path):
    write_split_folders(tmp_path)
    (tmp_path / "train" / "dog" / "bad.ppm").write_bytes(b"P6\n20 20\n2x5\n")  # PIL: ValueError
    with pytest.raises(InputError, match=r"image .*bad\.ppm: unreadable"):
        read_image_folder(tmp_path, 32, 3, 0.2, seed=0)


def test_image_folder_truncated_png_is_named(tmp_path):
    write_flat(tmp_path, per_class=2)
    path = tmp_path / "dog" / "1.png"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(InputError, match=r"image .*dog/1\.png: unreadable"):
        read_image_folder(tmp_path, 32, 3, 0.5, seed=0)


def test_image_folder_class_mismatch(tmp_path):
    write_split_folders(tmp_path)
    (tmp_path / "test" / "frog").rename(tmp_path / "test" / "toad")
    with pytest.raises(InputError, match="train classes .*differ from test classes"):
        read_image_folder(tmp_path, 32, 3, 0.2, seed=0)


def test_image_folder_class_with_one_image(tmp_path):
    write_flat(tmp_path, per_class=3)
    for p in sorted((tmp_path / "frog").iterdir())[1:]:
        p.unlink()
    with pytest.raises(InputError, match="class 2 has 1 image"):
        read_image_folder(tmp_path, 32, 3, 0.2, seed=0)


def test_image_folder_missing_or_without_classes(tmp_path):
    with pytest.raises(InputError, match="image folder not found"):
        read_image_folder(tmp_path / "nope", 32, 3, 0.2, seed=0)
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(InputError, match="no class sub-folders"):
        read_image_folder(tmp_path, 32, 3, 0.2, seed=0)


# --- read_source dispatch ----------------------------------------------------------------------------


def test_read_source_dispatch(tmp_path, fmnist):
    root, arrays = fmnist
    check_fmnist(read_source("fashion-mnist", str(root), str(tmp_path / "cache"), 32, None, 0.2, 0), arrays)
    assert not (tmp_path / "cache").exists()  # a given root downloads nothing

    _, rows, labels, _, _ = write_cifar10(tmp_path / "c10")
    raw = read_source("cifar10", str(tmp_path / "c10"), "unused", 32, None, 0.2, 0)
    check_pixels(raw.train_images, rows)
    np.testing.assert_array_equal(raw.train_labels, labels)

    _, _, fine, _, _ = write_cifar100(tmp_path / "c100")
    raw = read_source("cifar100", str(tmp_path / "c100"), "unused", 32, None, 0.2, 0)
    np.testing.assert_array_equal(raw.train_labels, fine)

    write_flat(tmp_path / "folder", per_class=4)
    raw = read_source("imagefolder", str(tmp_path / "folder"), "unused", 16, None, 0.25, 0)
    assert raw.train_images.shape == (9, 16, 16, 3)  # channels None -> RGB; resized to image_size
    assert raw.test_images.shape == (3, 16, 16, 3) and raw.classes == CLASSES
    grey = read_source("imagefolder", str(tmp_path / "folder"), "unused", 16, 1, 0.25, 0)
    assert grey.train_images.shape == (9, 16, 16, 1)
    np.testing.assert_array_equal(grey.test_labels, raw.test_labels)  # same seed, same split


def test_read_source_errors(tmp_path):
    with pytest.raises(InputError, match="prepare.root must name the image folder"):
        read_source("imagefolder", None, str(tmp_path), 32, None, 0.2, 0)
    with pytest.raises(InputError, match="unknown source 'svhn'"):
        read_source("svhn", str(tmp_path), str(tmp_path), 32, None, 0.2, 0)
    with pytest.raises(InputError, match="Fashion-MNIST folder not found"):
        read_source("fashion-mnist", str(tmp_path / "missing"), str(tmp_path), 32, None, 0.2, 0)
