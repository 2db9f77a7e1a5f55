"""`kd score` and `kd cache` on a tiny trained ResNet-34 teacher; streaming, selection, cache integrity."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cache import ChannelStats, load_cache, write_cache
from pipeline.data import DeviceData, load_prepared
from pipeline.errors import InputError
from pipeline.features import stream_layers
from pipeline.io import read_manifest
from pipeline.layers import layer_view
from pipeline.quality import select_layers
from pipeline.teacher import load_teacher
from stages.cli import app
from tiny import killed_at_rename, tiny_pipeline

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("shape, channel_dims", [((6, 5, 4, 4), (0, 2, 3)), ((6, 9, 5), (0, 1))])
def test_channel_stats_over_batches_equal_float64_over_the_whole(shape, channel_dims):
    """Maps: channels are dim 1; tokens (B, L, D): the last dim. Far-from-zero means test the cancellation in
    E[x^2] - E[x]^2 with float32 sums per batch."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 50
    stats = ChannelStats()
    for batch in whole.split(4):
        stats.update(batch.float())
    got = stats.result()
    np.testing.assert_allclose(got["mean"], whole.mean(channel_dims).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["std"], whole.std(channel_dims, unbiased=False).numpy(), rtol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("pipe"))


def score(root, *extra, out="scores"):
    return invoke("score", "-p", str(root / "params.yaml"), "--data", str(root / "data"),
                  "--teacher", str(root / "teacher"), "--out", str(root / out), *extra)


def cache(root, *extra, scores="scores", out="cache"):
    return invoke("cache", "-p", str(root / "params.yaml"), "--data", str(root / "data"),
                  "--teacher", str(root / "teacher"), "--scores", str(root / scores), "--out", str(root / out),
                  *extra)


def test_score_writes_table_and_selects_top_q(trained):
    result = score(trained)
    assert result.exit_code == 0, result.output
    rows = json.loads((trained / "scores/layers.json").read_text())
    assert [r["layer"] for r in rows] == list(range(18))
    assert rows[0]["shape"] == [4, 8, 8] and rows[17]["shape"] == [32]
    assert all(r["n_a"] == 48 and r["n_b"] == 30 for r in rows)
    for r in rows:
        assert r["Q"] == pytest.approx(r["S"] + np.sqrt(r["I"] * r["E"]))
    selection = json.loads((trained / "scores/selection.json").read_text())
    by_q = sorted(rows, key=lambda r: -r["Q"])  # the four layers of highest Q, in layer order
    assert selection["layers"] == sorted(r["layer"] for r in by_q[:4]) and selection["chosen_by"] == "top-4 by Q"
    csv = (trained / "scores/layers.csv").read_text().splitlines()
    assert csv[0].startswith("layer,S,I,E,Q") and len(csv) == 19


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_score_rows_are_the_quality_of_subsets_a_and_b(trained, mode):
    """Each layer's row recomputed apart from the stage's streaming: subsets A and B forwarded separately."""
    from pipeline.features import flatten_features
    from pipeline.quality import layer_quality
    from pipeline.scoring import scoring_subsets

    assert score(trained, "-S", f"score.mode={mode}", out=f"scores-{mode}").exit_code == 0
    rows = json.loads((trained / f"scores-{mode}/layers.json").read_text())
    data = load_prepared(trained / "data")
    teacher, _, _ = load_teacher(trained / "teacher", data)
    teacher.eval()
    train = DeviceData(data.train_images, data.train_labels, data.meta["mean"], data.meta["std"], torch.device("cpu"))
    a, b = scoring_subsets(data.train_labels, 48, 10, seed=0)  # the tiny params' sizes, the default seed

    def feats(ids, k):
        with torch.no_grad():
            return flatten_features(layer_view(teacher).collect(train.normalise(train.images[ids]), [k])[0])

    for k in (0, 9, 17):
        want = layer_quality(feats(a, k), train.labels[a], feats(b, k), train.labels[b], len(data.train_labels),
                             mode).to_dict()
        for key in ("S", "I", "E", "Q"):
            assert rows[k][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (k, key)


def test_scoring_subsets_are_class_balanced_draws_of_two_seeds():
    from pipeline.prepare import balanced_subset
    from pipeline.scoring import scoring_subsets

    labels = np.repeat(np.arange(4), [30, 25, 40, 12])
    a, b = scoring_subsets(labels, a_total=20, b_per_class=16, seed=0)
    assert np.bincount(labels[a]).tolist() == [5] * 4
    assert np.bincount(labels[b]).tolist() == [12] * 4  # the smallest class caps every class
    # the draws every recorded score was taken on: A from the seed, B from the next one
    assert a.tolist() == balanced_subset(labels, 20, seed=0).tolist()
    assert b.tolist() == balanced_subset(labels, 48, seed=1).tolist()


def test_score_criterion_and_override(trained):
    assert score(trained, "-S", "score.criterion=S", "-S", "score.k=3", out="by_s").exit_code == 0
    rows = json.loads((trained / "by_s/layers.json").read_text())
    assert json.loads((trained / "by_s/selection.json").read_text())["layers"] == select_layers(rows, "S", 3)
    result = score(trained, "-S", "score.layers=[9, 2, 5]", out="given")
    assert result.exit_code == 0, result.output
    assert json.loads((trained / "given/selection.json").read_text())["layers"] == [2, 5, 9]


@pytest.mark.parametrize("override, message", [
    ("score.layers=[0, 18]", "score.layers [18] out of range: the teacher has 18 layers"),
    ("score.layers=[]", "score.layers: List should have at least 1 item"),  # was: ours silently on standard layers
    ("score.k=19", "score.k is 19 but the teacher has only 18 layers"),
    ("score.subset_a=3", "subset A needs at least 2 samples per class: raise score.subset_a"),  # 3 classes
])
def test_bad_override_exits_2_before_work(trained, override, message):
    result = score(trained, "-S", override, out="bad")
    assert result.exit_code == 2
    assert message in result.output
    assert not (trained / "bad").exists()


def test_streaming_equals_direct_forward(trained):
    data = load_prepared(trained / "data")
    model, _, _ = load_teacher(trained / "teacher", data)
    split = DeviceData(data.train_images, data.train_labels, data.meta["mean"], data.meta["std"],
                       torch.device("cpu"))
    ids = torch.tensor([5, 0, 17, 33, 90])
    x = split.normalise(split.images[ids])
    view = layer_view(model)
    seen = []
    for k, feats in stream_layers(model, split, ids, batch_size=2):
        with torch.no_grad():
            assert torch.allclose(feats, view.collect(x, [k])[0], atol=1e-5), k
        seen.append(k)
    assert seen == list(range(18))


def test_cache_round_trip_and_refusals(trained):
    assert score(trained).exit_code == 0
    result = cache(trained)
    assert result.exit_code == 0, result.output
    data = load_prepared(trained / "data")
    model, _, teacher_id = load_teacher(trained / "teacher", data)
    selected = json.loads((trained / "scores/selection.json").read_text())["layers"]
    layers = sorted(set(selected) | {3, 7, 13, 16})  # plus ResNet-34's standard layers for the baselines
    cached, logits, manifest = load_cache(trained / "cache", teacher_id, data.data_id, layers)
    assert manifest["layers"] == layers
    split = DeviceData(data.train_images, data.train_labels, data.meta["mean"], data.meta["std"],
                       torch.device("cpu"))
    with torch.no_grad():
        x = split.normalise(split.images)
        fresh = layer_view(model).collect(x, layers)
        np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-5, atol=1e-5)
    for k, array, want in zip(layers, cached, fresh):
        assert array.dtype == np.float16 and array.shape == tuple(want.shape)
        np.testing.assert_allclose(array.astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)
        stats = manifest["channel_stats"][str(k)]
        np.testing.assert_allclose(stats["mean"], want.double().mean((0, 2, 3)).numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats["std"], want.double().std((0, 2, 3), unbiased=False).numpy(),
                                   rtol=1e-5, atol=1e-6)

    layers = selected
    with pytest.raises(InputError, match="made from another teacher"):
        load_cache(trained / "cache", "other", data.data_id, layers)
    with pytest.raises(InputError, match="made from another data"):
        load_cache(trained / "cache", teacher_id, "other", layers)
    missing = next(k for k in range(18) if k not in manifest["layers"])
    with pytest.raises(InputError, match=rf"not \[{missing}\]"):
        load_cache(trained / "cache", teacher_id, data.data_id, [missing])

    path = trained / "cache" / "logits.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(InputError, match="does not match its manifest checksum"):
        load_cache(trained / "cache", teacher_id, data.data_id, layers)


def test_a_killed_cache_leaves_no_partial_file_and_nothing_the_student_accepts(trained, tmp_path, monkeypatch):
    import os

    data = load_prepared(trained / "data")
    model, _, teacher_id = load_teacher(trained / "teacher", data)

    def kill(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # while gathering: nothing is written yet
        write_cache(model, data, [3, 7], torch.device("cpu"), 40, tmp_path / "c", on_batch=kill)
    assert not (tmp_path / "c").exists() or list((tmp_path / "c").iterdir()) == []

    renames = killed_at_rename(monkeypatch, 2)  # once the second file is written, before it is in place
    with pytest.raises(KeyboardInterrupt):
        write_cache(model, data, [3, 7], torch.device("cpu"), 40, tmp_path / "c")
    monkeypatch.undo()
    left = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert left == [os.path.basename(renames[0])]  # the one complete file, no temporary of the second
    assert len(np.load(tmp_path / "c" / left[0])) == len(data.train_labels)
    with pytest.raises(InputError, match="has no manifest.json: run the `cache` stage first"):
        load_cache(tmp_path / "c", teacher_id, data.data_id, [3, 7])


def test_a_cache_stage_failing_midway_leaves_the_earlier_cache_whole(trained, monkeypatch):
    import pipeline.cache

    assert score(trained).exit_code == 0 and cache(trained, out="cache_f").exit_code == 0
    def files():  # inodes too: a file rewritten with the same bytes was still replaced
        return {p.name: (p.read_bytes(), p.stat().st_ino) for p in (trained / "cache_f").iterdir()}

    earlier = files()
    written, save = [], pipeline.cache.save_npy

    def disk_full_at_second_file(path, array):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        return save(path, array)

    monkeypatch.setattr(pipeline.cache, "save_npy", disk_full_at_second_file)
    result = cache(trained, "-S", "cache.batch_size=7", out="cache_f")
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert written and files() == earlier
    assert not [p for p in trained.iterdir() if p.name.startswith(".cache_f")]  # no temporary left beside it
    data = load_prepared(trained / "data")
    _, _, teacher_id = load_teacher(trained / "teacher", data)
    layers = read_manifest(trained / "cache_f", "cache")["layers"]
    assert load_cache(trained / "cache_f", teacher_id, data.data_id, layers)[2]["params"]["batch_size"] != 7


def test_cache_refuses_scores_of_another_teacher(trained):
    assert score(trained, out="scores_old").exit_code == 0
    manifest = read_manifest(trained / "scores_old", "score")
    manifest["inputs"]["teacher"] = "0" * 16
    (trained / "scores_old/manifest.json").write_text(json.dumps(manifest))
    result = cache(trained, scores="scores_old", out="cache_old")
    assert result.exit_code == 2 and "was made from another teacher" in result.output
