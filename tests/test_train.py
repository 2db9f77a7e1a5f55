"""Training loop: exact resume, NaN guard, augmentation, optimiser recipes (CPU, tiny data)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import RecipeParams
from pipeline.data import Augment, DeviceData
from pipeline.errors import InputError, TrainingError
from pipeline.models import ModelSpec, build_model
from pipeline.train import (cross_entropy_step, evaluate, fit, make_optimizer, make_scheduler, predict_logits,
                            summarise)

CPU = torch.device("cpu")


def tiny_split(n=64, seed=0):
    """Two easily separable classes of 8x8 grey images: bright top half vs bright bottom half."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, size=(n, 8, 8, 1), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, :4] += 150 if y == 0 else 0
        images[i, 4:] += 150 if y == 1 else 0
    return DeviceData(images, labels, [0.4], [0.3], CPU)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelSpec("resnet9", num_classes=2, in_chans=1, image_size=8, width=0.0625))


RECIPE = RecipeParams(epochs=3, batch_size=16, lr=0.01, eval_batch_size=32, resume_every_s=0)


def test_fit_learns_separable_data():
    state = fit(tiny_model(), tiny_split(), tiny_split(seed=1), RECIPE.model_copy(update={"epochs": 6}), seed=0)
    assert [r["epoch"] for r in state.history] == [1, 2, 3, 4, 5, 6]
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert state.history[-1]["test_acc"] >= 0.9


def dropout_step(model, ids, x, y):
    """Randomness drawn inside the step, as a model's dropout draws it."""
    logits = F.dropout(model(x), 0.5, training=True)
    loss = F.cross_entropy(logits, y)
    return loss, logits, {"ce": loss}


@pytest.mark.parametrize("step_loss", [cross_entropy_step, dropout_step])
def test_resume_after_kill_equals_uninterrupted(tmp_path, step_loss):
    train, test = tiny_split(), tiny_split(seed=1)
    reference = tiny_model()
    ref_state = fit(reference, train, test, RECIPE, seed=3, step_loss=step_loss)

    class Killed(Exception):
        pass

    def kill_after_two(row):
        if row["epoch"] == 2:
            raise Killed

    ckpt = tmp_path / "resume.pt"
    with pytest.raises(Killed):
        fit(tiny_model(), train, test, RECIPE, seed=3, resume_path=ckpt, resume_key="k", on_epoch=kill_after_two,
            step_loss=step_loss)
    resumed = tiny_model(seed=99)  # different init and random state: everything must come from the checkpoint
    started = []
    state = fit(resumed, train, test, RECIPE, seed=3, resume_path=ckpt, resume_key="k",
                on_epoch_start=lambda epoch, steps: started.append(epoch), step_loss=step_loss)
    assert started == [2]
    assert [r["test_acc"] for r in state.history] == [r["test_acc"] for r in ref_state.history]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_each_epoch_shuffles_anew_by_seed():
    def epoch_orders(seed):
        seen = []

        def recording(model, ids, x, y):
            seen.extend(ids.tolist())
            return cross_entropy_step(model, ids, x, y)

        fit(tiny_model(), tiny_split(), tiny_split(seed=1), RECIPE, seed=seed, step_loss=recording)
        return [tuple(seen[e * 64:(e + 1) * 64]) for e in range(RECIPE.epochs)]

    orders = epoch_orders(0)
    assert all(sorted(order) == list(range(64)) for order in orders)  # 64 = 4 full batches of 16
    assert len(set(orders)) == RECIPE.epochs  # each epoch its own order
    assert orders == epoch_orders(0) and orders != epoch_orders(1)


def test_evaluation_scores_every_sample_whatever_the_batch_size():
    model, test = tiny_model(), tiny_split(n=10, seed=1)
    assert len(predict_logits(model, test, batch_size=4)) == 10  # batches of 4, 4 and 2
    assert evaluate(model, test, batch_size=4) == pytest.approx(evaluate(model, test, batch_size=10))


def test_summary_reports_the_last_epoch_and_keeps_the_best_apart():
    rows = [{"epoch": e, "test_acc": acc, "test_loss": 0.5, "train_loss": 0.4, "img_per_s": 100.0, "seconds": 1.0}
            for e, acc in ((1, 0.7), (2, 0.9), (3, 0.8))]
    summary = summarise(rows)
    assert (summary["test_acc"], summary["best_test_acc"], summary["best_epoch"], summary["epochs"]) == (0.8, 0.9, 2, 3)


def test_summary_times_evaluation_and_checkpoints_apart_from_training(tmp_path):
    train, test = tiny_split(), tiny_split(seed=1)
    plain = summarise(fit(tiny_model(), train, test, RECIPE, seed=0).history)
    resumable = summarise(fit(tiny_model(), train, test, RECIPE, seed=0, resume_path=tmp_path / "r.pt",
                              resume_key="k").history)
    assert plain["checkpoint_seconds"] == 0.0 < resumable["checkpoint_seconds"]
    for summary in (plain, resumable):
        assert 0 < summary["eval_seconds"] and 0 < summary["train_seconds"]
        assert summary["epochs"] == 3


def test_resume_points_are_spaced_in_time(tmp_path):
    train, test = tiny_split(), tiny_split(seed=1)
    saved_at = []

    def note_saves(row):
        if "checkpoint_seconds" in row:
            saved_at.append(row["epoch"])

    slow = RECIPE.model_copy(update={"resume_every_s": 3600.0})
    fit(tiny_model(), train, test, slow, seed=0, resume_path=tmp_path / "r.pt", resume_key="k", on_epoch=note_saves)
    assert saved_at == [] and not (tmp_path / "r.pt").exists()  # a crash would lose under an hour
    fit(tiny_model(), train, test, RECIPE, seed=0, resume_path=tmp_path / "r.pt", resume_key="k", on_epoch=note_saves)
    assert saved_at == [1, 2, 3]


def test_resume_ignores_checkpoint_of_other_run(tmp_path):
    train, test = tiny_split(), tiny_split(seed=1)
    ckpt = tmp_path / "resume.pt"
    fit(tiny_model(), train, test, RECIPE, seed=0, resume_path=ckpt, resume_key="old")
    started = []
    fit(tiny_model(), train, test, RECIPE, seed=0, resume_path=ckpt, resume_key="new",
        on_epoch_start=lambda epoch, steps: started.append(epoch))
    assert started == [0, 1, 2]


def test_an_unusable_resume_checkpoint_of_this_training_is_named_with_what_to_do(tmp_path):
    train, test = tiny_split(), tiny_split(seed=1)
    ckpt = tmp_path / "resume.pt"
    ckpt.write_bytes(b"cut short")
    with pytest.raises(InputError, match=rf"^corrupt or unreadable checkpoint {ckpt}: .*: delete the resume "
                                         rf"checkpoint {ckpt} to train from the start$"):
        fit(tiny_model(), train, test, RECIPE, seed=0, resume_path=ckpt, resume_key="k")
    fit(tiny_model(), train, test, RECIPE.model_copy(update={"epochs": 1}), seed=0, resume_path=ckpt.with_name("ok.pt"),
        resume_key="k")
    saved = torch.load(ckpt.with_name("ok.pt"), weights_only=True)
    saved["model"] = build_model(ModelSpec("resnet9", num_classes=5, in_chans=1, image_size=8,
                                           width=0.0625)).state_dict()  # e.g. the model's code changed since
    torch.save(saved, ckpt)
    with pytest.raises(InputError, match=rf"^{ckpt} does not fit this training \(RuntimeError: Error\(s\) in "
                                         rf"loading state_dict for Sequential:\): delete the resume checkpoint"):
        fit(tiny_model(), train, test, RECIPE, seed=0, resume_path=ckpt, resume_key="k")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "resume.pt"

    def poison(row):
        if row["epoch"] == 1:
            with torch.no_grad():
                model[0].weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match="non-finite training loss"):
        fit(model, tiny_split(), tiny_split(seed=1), RECIPE, seed=0, resume_path=ckpt, resume_key="k",
            on_epoch=poison)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_augment_is_per_image_and_seeded():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6).repeat(32, 1, 1, 1)
    aug = Augment(padding=2, flip=True)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.shape == x.shape
    # identical inputs get different crops/flips: not one transform for the whole batch
    evens = a[0::2]
    assert len({tuple(img.flatten().tolist()) for img in evens}) > 1
    # every output is a shifted (and possibly flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x[:1], (2, 2, 2, 2))[0, 0]
    windows = {tuple(padded[i:i + 6, j:j + 6].flatten().tolist()) for i in range(5) for j in range(5)}
    windows |= {tuple(padded[i:i + 6, j:j + 6].flip(1).flatten().tolist()) for i in range(5) for j in range(5)}
    assert all(tuple(img[0].flatten().tolist()) in windows for img in evens)


def test_augment_crops_shift_rows_and_columns_independently():
    x = torch.arange(36, dtype=torch.float32).view(1, 1, 6, 6).repeat(256, 1, 1, 1)
    crops = Augment(padding=2, flip=False)(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x[:1], (2, 2, 2, 2))[0, 0]
    offset = {tuple(padded[i:i + 6, j:j + 6].flatten().tolist()): (i, j) for i in range(5) for j in range(5)}
    assert {offset[tuple(img[0].flatten().tolist())] for img in crops} == set(offset.values())  # all 25 shifts


def test_backbone_lr_scale_and_recipes():
    model = tiny_model()
    recipe = RECIPE.model_copy(update={"backbone_lr_scale": 0.01, "lr": 0.1})
    opt = make_optimizer(model, recipe)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.1])
    head = {id(p) for p in model[-1].parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == head
    assert opt.param_groups[0]["weight_decay"] == 0.01

    sgd = RECIPE.model_copy(update={"recipe": "sgd_multistep", "lr": 0.05, "weight_decay": 5e-4,
                                    "milestones": [2, 3], "epochs": 4})
    opt = make_optimizer(model, sgd)
    sched = make_scheduler(opt, sgd, steps_per_epoch=10)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005])


def test_sgd_multistep_steps_once_per_epoch_inside_fit():
    """Milestones count epochs: the weights move in epochs 1-2 and (gamma ~0 after milestone 2) stop in epoch 3."""
    sgd = RECIPE.model_copy(update={"recipe": "sgd_multistep", "lr": 0.05, "milestones": [2], "gamma": 1e-30})
    model, after = tiny_model(), []
    fit(model, tiny_split(), tiny_split(seed=1), sgd, seed=0,
        on_epoch=lambda row: after.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()])))
    moved = [(b - a).abs().max().item() for a, b in zip(after, after[1:])]
    assert moved[0] > 1e-3 and moved[1] < 1e-20, moved  # stepped per batch, it would stop inside epoch 1


def test_onecycle_peaks_at_lr_and_ends_near_zero():
    model = tiny_model()
    opt = make_optimizer(model, RECIPE)
    sched = make_scheduler(opt, RECIPE, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01 / 25)
    assert max(lrs) == pytest.approx(0.01, rel=1e-3) and lrs.index(max(lrs)) == 8  # step 0.3 * 30 - 1
    assert lrs[-1] < 1e-4
