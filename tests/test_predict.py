"""Bringing deployment inputs to the model's size and layout, as the prepare stage brought the training images."""

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.export import gate_images
from pipeline.predict import fit_to_model, pick_providers, read_npy_images
from pipeline.prepare import fit_channels, fit_size


def _images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_smaller_images_are_padded_like_the_training_images():
    raw = _images(3, 28, 28, 1)
    fitted = fit_to_model(raw, (32, 32, 1), "pad")
    assert fitted.shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(fitted[:, 2:30, 2:30], raw)
    assert fitted.sum() == raw.sum()  # the border is zeros


def test_other_sizes_are_resized_like_the_training_images():
    big = _images(2, 40, 40, 3)
    fitted = fit_to_model(big, (32, 32, 3), "resize")
    np.testing.assert_array_equal(fitted, fit_size(big, 32, "resize"))
    assert fitted.shape == (2, 32, 32, 3) and abs(fitted.mean() - big.mean()) < 2


def test_images_that_cannot_be_brought_to_the_model_are_refused():
    same = _images(1, 32, 32, 1)
    assert fit_to_model(same, (32, 32, 1), None) is same
    with pytest.raises(ValueError, match="size 28x30, the model needs 32x32"):
        fit_to_model(_images(1, 30, 28, 1), (32, 32, 1), None)  # an ONNX file without resize_mode
    with pytest.raises(ValueError, match=r"size 48x40, larger than the model's 32x32 \(its training images were pad"):
        fit_to_model(_images(1, 40, 48, 1), (32, 32, 1), "pad")
    with pytest.raises(InputError, match="cannot convert 4-channel images to 1 channels"):
        fit_to_model(_images(1, 32, 32, 4), (32, 32, 1), "pad")


def test_colour_and_grey_are_converted_as_prepare_converts_them():
    rgb = _images(2, 28, 28, 3)
    grey = fit_to_model(rgb, (32, 32, 1), "pad")
    np.testing.assert_array_equal(grey[:, 2:30, 2:30], fit_channels(rgb, 1))
    assert grey.shape == (2, 32, 32, 1) and grey[:, 2:30, 2:30].std() > 10  # luma, not one channel of zeros
    np.testing.assert_array_equal(fit_to_model(grey, (32, 32, 3), "pad"), np.repeat(grey, 3, axis=-1))


@pytest.mark.parametrize("shape, expected", [
    ((28, 28), (1, 28, 28, 1)),
    ((28, 28, 1), (1, 28, 28, 1)),
    ((5, 28, 28), (5, 28, 28, 1)),
    ((5, 28, 28, 1), (5, 28, 28, 1)),
    ((32, 32, 3), (1, 32, 32, 3)),  # one colour image, also for a grey model (converted later, not 32 stripes)
    ((4, 32, 32, 3), (4, 32, 32, 3)),
])
def test_npy_arrays_are_read_as_stacks_of_images(tmp_path, shape, expected):
    array = np.arange(np.prod(shape), dtype=np.int64).astype(np.uint8).reshape(shape)
    np.save(tmp_path / "a.npy", array)
    loaded = read_npy_images(tmp_path / "a.npy")
    assert loaded.shape == expected and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded.reshape(-1), array.reshape(-1))


def test_npy_arrays_of_other_types_or_ranks_are_refused(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="dtype float32, the model needs uint8"):
        read_npy_images(tmp_path / "f.npy")
    np.save(tmp_path / "e.npy", np.zeros((1, 0, 0, 1), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(1, 0, 0, 1\): not an image or a stack of images"):
        read_npy_images(tmp_path / "e.npy")
    np.save(tmp_path / "r.npy", np.zeros((2, 2, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 2, 32, 32, 1\): not an image or a stack of images"):
        read_npy_images(tmp_path / "r.npy")


def test_providers_are_chosen_from_what_onnxruntime_has(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert pick_providers("auto") == pick_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(InputError, match="provider cuda requested, but this onnxruntime has no CUDAExecutionProvider"):
        pick_providers("cuda")
    with pytest.raises(InputError, match="provider must be auto, cuda or cpu, not 'gpu'"):
        pick_providers("gpu")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert pick_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("cpu") == ["CPUExecutionProvider"]


def test_the_export_gate_checks_every_image_at_its_largest_batch_size_and_some_at_the_others():
    gated = gate_images(np.arange(10), [1, 7, 4], small_batch_images=3)
    assert {bs: images.tolist() for bs, images in gated.items()} == {1: [0, 1, 2], 7: list(range(10)), 4: [0, 1, 2]}
