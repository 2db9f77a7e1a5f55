"""Distillation losses, gradient isolation of the logit-free method, every method's training, the probe."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache import load_cache
from pipeline.config import METHOD_NAMES, load_params
from pipeline.data import load_prepared
from pipeline.distill import METHODS, Distiller, LossWeights
from pipeline.errors import InputError
from pipeline.layers import layer_shapes
from pipeline.losses import canonical
from pipeline.models import STANDARD_LAYERS, ModelSpec, build_model
from pipeline.probe import fit_probe, probe_student
from pipeline.student import build_distiller, load_student_dir, train_student
from pipeline.targets import CachedTargets, device_cache
from pipeline.teacher import device_splits, load_teacher
from tiny import fail_model_saves, run_stage, tiny_pipeline


def test_method_registry_matches_params_schema():
    assert tuple(METHODS) == METHOD_NAMES


# --- pairing, pooling and projector shapes (METHOD.md §2, CIFAR-100 examples) --------------------------

def _pairing(student_arch, teacher_arch, teacher_layers):
    student = build_model(ModelSpec(student_arch, 100))
    teacher_shapes = layer_shapes(build_model(ModelSpec(teacher_arch, 100)), (3, 32, 32))
    d = Distiller(student, "ours", STANDARD_LAYERS[student_arch], teacher_layers,
                  [layer_shapes(student, (3, 32, 32))[k] for k in STANDARD_LAYERS[student_arch]],
                  [teacher_shapes[k] for k in teacher_layers])
    convs = [(p.in_channels, p.out_channels, type(p).__name__, p.bias) for p in d.projectors]
    return d.plans, convs


def test_resnet34_to_resnet9_pairs():
    plans, convs = _pairing("resnet9", "resnet34", [12, 13, 14, 15])
    assert plans == [("student", (8, 8)), ("student", (8, 8)), ("student", (4, 4)), ("teacher", (4, 4))]
    assert convs == [(64, 256, "Conv2d", None), (128, 256, "Conv2d", None), (256, 512, "Conv2d", None),
                     (512, 512, "Conv2d", None)]


def test_resnet34_to_mobilenetv2_pairs():
    plans, convs = _pairing("mobilenetv2", "resnet34", [12, 13, 14, 15])
    assert plans == [("student", (8, 8)), ("teacher", (8, 8)), ("teacher", (4, 4)), ("teacher", (2, 2))]
    assert [c[:2] for c in convs] == [(24, 256), (32, 256), (96, 512), (320, 512)]


def test_vgg19_to_vgg11_pairs():
    plans, convs = _pairing("vgg11_bn", "vgg19_bn", [11, 12, 13, 15])
    assert plans == [("student", (4, 4)), ("student", (2, 2)), ("student", (2, 2)), ("teacher", (2, 2))]
    assert [c[:2] for c in convs] == [(128, 512), (256, 512), (512, 512), (512, 512)]


def test_vit_b_to_vit_ett_pairs():
    plans, convs = _pairing("vit_ett", "vit_b", [9, 10, 11, 12])
    assert plans == [("teacher", (65,))] * 4  # equal token counts: nothing pooled
    assert convs == [(192, 768, "Conv1d", None)] * 4


def test_mixed_token_and_map_layers_are_refused():
    with pytest.raises(InputError, match="token and map features do not mix"):
        _pairing("resnet9", "vit_b", [9, 10, 11, 12])


# --- loss values against hand computations -------------------------------------------------------------

def _tiny_distiller(method, teacher_shapes=((8, 8, 8), (8, 2, 2), (16, 4, 4), (32,)), **weights):
    torch.manual_seed(0)
    spec = ModelSpec("resnet9", num_classes=3, in_chans=1, image_size=8, width=0.0625)
    return build_distiller(spec, method, [1, 2, 3, 4], [0, 1, 2, 3], list(teacher_shapes),
                           LossWeights(**weights), batch_size=4, teacher=None)


def test_feature_loss_matches_hand_computation():
    d = _tiny_distiller("base_fkd_nokl")
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    t_feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 8, 2, 2), torch.randn(4, 16, 4, 4), torch.randn(4, 32)]
    s_feats = d.view.collect(x, [1, 2, 3, 4])  # (4,8,8), (8,4,4), (16,2,2), (32,1,1) per sample at width 1/16

    def by_hand(s, t, conv):
        w = conv.weight.flatten(1)  # (C_t, C_s)
        if t.dim() == 2:
            t = t[:, :, None, None]
        h, ht = s.shape[2:], t.shape[2:]
        if all(a <= b for a, b in zip(h, ht)):
            t = F.adaptive_avg_pool2d(t, h)
        else:
            s = F.adaptive_avg_pool2d(s, ht)
        proj = torch.einsum("oc,bchw->bohw", w, s)
        return ((proj - t) ** 2).sum() / t.numel()

    want = sum(by_hand(s, t, p) for s, t, p in zip(s_feats, t_feats, d.projectors)) / 4
    _, _, terms = d.losses(x, y, t_feats, None)
    assert terms["feature"].item() == pytest.approx(want.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(d.student(x), y).item(), rel=1e-6)
    # Base FKD+FC: each student layer against every teacher layer weighted 1/4 (the reference's FullyConnected
    # map), the layers' losses then averaged as L_FKD averages them: 1/16 of the 16 pairs' sum
    d = _tiny_distiller("base_fkd_all")
    s_feats = d.view.collect(x, [1, 2, 3, 4])
    pairs = [(s_feats[i], t_feats[j], d.projectors[4 * i + j]) for i in range(4) for j in range(4)]
    want = sum(sum(by_hand(*pairs[4 * i + j]) / 4 for j in range(4)) for i in range(4)) / 4
    _, _, terms = d.losses(x, y, t_feats, torch.zeros(4, 3))
    assert terms["feature"].item() == pytest.approx(want.item(), rel=1e-5)


def test_kl_terms_match_hand_computation():
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    t_logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-2.0, 3.0, 0.0], [1.0, 1.0, 1.5]])
    for method, standardize in (("vkd", False), ("vkd_std", True)):
        d = _tiny_distiller(method)
        _, logits, terms = d.losses(x, y, None, t_logits)
        s, t = logits.detach().double(), t_logits.double()
        if standardize:
            s = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)
            t = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-6)
        p_t, p_s = torch.softmax(t / 4, 1), torch.softmax(s / 4, 1)
        want = 16 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
        assert terms["kl"].item() == pytest.approx(want.item(), rel=1e-5)
        assert set(terms) == {"ce", "kl"}


def test_sp_uses_the_whole_similarity_matrix():
    d = _tiny_distiller("sp", teacher_shapes=((8, 8, 8), (8, 4, 4), (16, 2, 2), (32,)))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    t_feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 8, 4, 4), torch.randn(4, 16, 2, 2), torch.randn(4, 32)]
    _, _, terms = d.losses(x, y, t_feats, torch.zeros(4, 3))
    s_feats = d.view.collect(x, [1, 2, 3, 4])

    def sim(f):
        f = f.flatten(1)
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-4)
        return f @ f.T

    want = np.mean([((sim(s) - sim(t)) ** 2).mean().item() for s, t in zip(s_feats, t_feats)])
    assert terms["sp"].item() == pytest.approx(want, rel=1e-5)
    assert len(d.projectors) == 0


def test_relation_term_matches_hand_computation():
    d = _tiny_distiller("base_fkd_nokl", relation=0.5)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    t_feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 8, 2, 2), torch.randn(4, 16, 4, 4), torch.randn(4, 32)]
    _, _, terms = d.losses(x, y, t_feats, None)

    def sim(f):
        f = f.flatten(1)
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-4)
        return f @ f.T

    want = []
    for s, t, conv in zip(d.view.collect(x, [1, 2, 3, 4]), t_feats, d.projectors):
        t = t[:, :, None, None] if t.dim() == 2 else t
        if all(a <= b for a, b in zip(s.shape[2:], t.shape[2:])):
            t = F.adaptive_avg_pool2d(t, s.shape[2:])
        else:
            s = F.adaptive_avg_pool2d(s, t.shape[2:])
        proj = torch.einsum("oc,bchw->bohw", conv.weight.flatten(1), s)
        want.append(((sim(proj) - sim(t)) ** 2).mean().item())
    assert terms["relation"].item() == pytest.approx(0.5 * np.mean(want), rel=1e-5)


def test_all_pairs_and_semckd_shapes():
    all_pairs = _tiny_distiller("base_fkd_all")
    assert len(all_pairs.projectors) == 16 and all_pairs.pairs[5] == (1, 1)
    sem = _tiny_distiller("semckd")
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    t_feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 8, 2, 2), torch.randn(4, 16, 4, 4), torch.randn(4, 32)]
    total, _, terms = sem.losses(x, y, t_feats, torch.zeros(4, 3))
    assert set(terms) == {"ce", "kl", "feature"} and math.isfinite(total.item())
    # by hand: per sample, each student layer's squared errors against every teacher layer, weighted by the
    # softmax over teacher layers of its query . key, summed, averaged over samples and student layers
    s_feats = [canonical(f) for f in sem.view.collect(x, [1, 2, 3, 4])]
    t_feats = [canonical(t) for t in t_feats]
    want = 0.0
    for b in range(4):
        for i, s in enumerate(s_feats):
            q = sem.queries[i](s)[b]
            scores = torch.stack([q @ sem.keys[j](t)[b] for j, t in enumerate(t_feats)])
            weights = torch.softmax(scores, 0)
            for j, t in enumerate(t_feats):
                p = sem.pairs.index((i, j))
                err = ((sem._project(p, s)[b] - sem._target(p, t)[b]) ** 2).mean()
                want += weights[j] * err
    assert terms["feature"].item() == pytest.approx(want.item() / (4 * 4), rel=1e-5)


# --- gradient isolation: the logit-free backbone ---------------------------------------------------------

def _grads_from(d, term):
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    t_feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 8, 2, 2), torch.randn(4, 16, 4, 4), torch.randn(4, 32)]
    d.zero_grad(set_to_none=True)
    _, _, terms = d.losses(x, y, t_feats, torch.zeros(4, 3))
    terms[term].backward()
    head = {id(p) for p in d.student[-1].parameters()}
    backbone = [p.grad for p in d.student.parameters() if id(p) not in head]
    head_grads = [p.grad for p in d.student[-1].parameters()]
    return backbone, head_grads


def test_ours_backbone_gets_no_gradient_from_cross_entropy():
    backbone, head = _grads_from(_tiny_distiller("ours"), "ce")
    assert all(g is None or not g.any() for g in backbone)
    assert all(g is not None and g.abs().sum() > 0 for g in head)
    backbone, head = _grads_from(_tiny_distiller("ours"), "feature")
    assert any(g is not None and g.abs().sum() > 0 for g in backbone)
    assert all(g is None for g in head)  # and the head none from the feature loss


def test_similarity_and_kl_stay_float32_under_autocast():
    from pipeline.losses import kd_kl, similarity

    torch.manual_seed(0)
    f, s, t = torch.randn(8, 16, 4, 4).bfloat16(), torch.randn(8, 10).bfloat16(), torch.randn(8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on the GPU path, where a matmul would run in bf16
        sim, kl = similarity(f), kd_kl(s, t, 4.0, standardize=True)
    assert sim.dtype == torch.float32 and torch.allclose(sim, similarity(f.float()), atol=1e-6)
    assert kl.item() == pytest.approx(kd_kl(s.float(), t, 4.0, standardize=True).item(), rel=1e-6)


def test_the_optimisers_head_group_is_the_students_classifier_alone():
    from pipeline.config import RecipeParams
    from pipeline.train import make_optimizer

    d = _tiny_distiller("ours")
    backbone, head = make_optimizer(d, RecipeParams(lr=0.1, backbone_lr_scale=0.01)).param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in d.student[-1].parameters()} and head["lr"] == 0.1
    assert {id(p) for p in d.projectors.parameters()} <= {id(p) for p in backbone["params"]}  # at the backbone's lr


def test_ours_ce_backbone_does_get_cross_entropy_gradient():
    backbone, _ = _grads_from(_tiny_distiller("ours_ce"), "ce")
    assert sum(g.abs().sum().item() for g in backbone if g is not None) > 0


# --- training every method on a tiny real pipeline ----------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("pipe"))


def _train(pipe, method, epochs=4, watch_teacher=None, **kwargs):
    params = load_params(pipe / "params.yaml", [f"student.method={method}", f"student.train.epochs={epochs}",
                                                *[f"student.{k}={v}" for k, v in kwargs.items()]])
    data = load_prepared(pipe / "data")
    teacher, teacher_spec, teacher_id = load_teacher(pipe / "teacher", data)
    if watch_teacher:
        watch_teacher(teacher)
    selected = json.loads((pipe / "scores/selection.json").read_text())["layers"]
    layers = selected if METHODS[method].teacher_layers == "selected" else STANDARD_LAYERS["resnet34"]
    cache = load_cache(pipe / "cache", teacher_id, data.data_id, layers if METHODS[method].features else [])
    return train_student(data, params.student, 0, teacher, teacher_spec, selected, cache, None, "")


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_and_lowers_its_loss(pipe, method):
    distiller, summary, history = _train(pipe, method, epochs=8)  # (4: `ours`'s head still at chance)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(math.isfinite(v) for row in history for v in row.values())
    if METHODS[method].features and METHODS[method].features != "sp":
        assert history[-1]["loss_feature"] < history[0]["loss_feature"]
    assert summary["test_acc"] >= 0.6  # chance on 3 classes: 1/3


def test_simkd_leaves_the_borrowed_teacher_tail_as_the_teacher_has_it(pipe):
    from pipeline.layers import LayerChain

    distiller, _, _ = _train(pipe, "simkd", epochs=1)
    teacher, _, _ = load_teacher(pipe / "teacher", load_prepared(pipe / "data"))
    chain = LayerChain(teacher)
    fresh = nn.ModuleList(chain.modules[chain.ends[chain.index(distiller.teacher_layers[-1])] + 1:])
    trained = distiller.tail.state_dict()
    assert trained.keys() == fresh.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in fresh.state_dict().items())
    assert not any(p.requires_grad for p in distiller.tail.parameters())


def test_simkd_keeps_the_borrowed_teacher_tail_in_eval_mode():
    spec = ModelSpec("resnet9", num_classes=3, in_chans=1, image_size=8, width=0.0625)
    teacher = build_model(spec)
    shapes = layer_shapes(teacher, (1, 8, 8))
    distiller = build_distiller(spec, "simkd", [1, 2, 3, 4], [0, 1, 2, 3], [shapes[k] for k in range(4)],
                                LossWeights(), batch_size=4, teacher=teacher)
    assert any(isinstance(m, nn.BatchNorm2d) for m in distiller.tail.modules())  # a tail of whole blocks
    distiller.train()
    assert distiller.student.training and not any(m.training for m in distiller.tail.modules())


def test_simkd_projects_its_deepest_layer_once_a_step(pipe):
    from pipeline.features import features_and_logits

    distiller, _, _ = _train(pipe, "simkd", epochs=1)
    teacher, _, _ = load_teacher(pipe / "teacher", load_prepared(pipe / "data"))
    norms = [m for p in distiller.projectors for m in p.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [int(m.num_batches_tracked) for m in norms]
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    with torch.no_grad():
        feats, logits = features_and_logits(teacher.eval(), x, distiller.teacher_layers)
        distiller.train().losses(x, y, feats, logits)
    assert norms and [int(m.num_batches_tracked) - b for m, b in zip(norms, before)] == [1] * len(norms)


@pytest.mark.parametrize("mode", ["default", "cudagraphs"])
def test_compiled_training_step_matches_eager(pipe, mode):
    from torch._dynamo.utils import counters

    counters.clear()
    _, _, compiled = _train(pipe, "ours", epochs=2, **{"train.compile": mode})
    assert counters["stats"]["unique_graphs"] >= 1  # the step really ran through torch.compile
    if mode == "cudagraphs":  # through dynamo's cudagraphs backend, which runs a CPU step's kernels unrecorded
        assert counters["inductor"]["cudagraph_skips"] >= 1
    _, _, eager = _train(pipe, "ours", epochs=2)
    for a, b in zip(compiled, eager):
        assert a["loss_feature"] == pytest.approx(b["loss_feature"], rel=1e-4)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 48)


def test_compiled_semckd_loss_matches_eager_on_a_float16_cache():
    # inductor (CPU, torch 2.14) computed NaN for this loss when the cached float16 targets entered the graph
    torch.manual_seed(0)
    student, teacher = ModelSpec("resnet9", 10, 1, 32, 0.25), ModelSpec("resnet34", 10, 1, 32, 0.125)
    layers = [3, 7, 13, 16]
    shapes = [layer_shapes(build_model(teacher), (1, 32, 32))[k] for k in layers]
    rng = np.random.default_rng(0)
    cache = [np.abs(3 * rng.standard_normal((256, *s))).astype(np.float16) for s in shapes]
    targets = CachedTargets(layers, cache, rng.standard_normal((256, 10), np.float32), torch.device("cpu"))
    distiller = build_distiller(student, "semckd", [1, 2, 3, 4], layers, shapes, LossWeights(), 128, None)
    ids, x, y = torch.arange(128), torch.randn(128, 1, 32, 32), torch.randint(0, 10, (128,))
    feats, logits = targets(ids, x)
    eager = distiller.losses(x, y, feats, logits)[2]
    compiled = torch.compile(distiller.losses)(x, y, feats, logits)[2]
    for name, value in eager.items():
        assert compiled[name].item() == pytest.approx(value.item(), rel=1e-4), name


def test_augmented_training_runs_the_teacher_on_the_batches_the_student_sees(pipe):
    """With augment no cache holds the targets: the teacher runs live on each augmented batch of the student."""
    seen = {"teacher": [], "student": []}
    teacher_stem = []

    def record(module, args):  # the first convolutions of both networks take the (augmented) images
        if isinstance(module, nn.Conv2d) and module.in_channels == 1 and len(args[0]) == 16:
            seen["teacher" if module in teacher_stem else "student"].append(args[0].clone())

    def watch(teacher):
        teacher_stem.append(next(m for m in teacher.modules() if isinstance(m, nn.Conv2d)))

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        _, _, augmented = _train(pipe, "ours", epochs=2, watch_teacher=watch, **{"train.augment": "true"})
    finally:
        handle.remove()
    teacher_x, student_x = torch.cat(seen["teacher"]), torch.cat(seen["student"])
    train, _ = device_splits(load_prepared(pipe / "data"), torch.device("cpu"))
    assert len(teacher_x) == 2 * train.steps(16, drop_last=True) * 16
    assert torch.equal(teacher_x, student_x)
    plain = {img.numpy().tobytes() for _, x, _ in train.batches(len(train)) for img in x}
    assert sum(img.numpy().tobytes() in plain for img in teacher_x) < len(teacher_x) / 2  # crops and flips
    def losses(history):
        return [(row["train_loss"], row["loss_feature"], row["test_loss"]) for row in history]

    assert losses(_train(pipe, "ours", epochs=2, **{"train.augment": "true"})[2]) == losses(augmented)  # seeded
    assert losses(_train(pipe, "ours", epochs=2)[2])[0] != losses(augmented)[0]


def test_device_made_teacher_features_match_the_cache(pipe):
    from pipeline.student import layers_to_cache

    data = load_prepared(pipe / "data")
    teacher, _, teacher_id = load_teacher(pipe / "teacher", data)
    layers = json.loads((pipe / "scores/selection.json").read_text())["layers"]
    cached, cached_logits, manifest = load_cache(pipe / "cache", teacher_id, data.data_id, layers)
    feats, logits, extra = device_cache(teacher, data, layers, torch.device("cpu"), 1024, channel_stats=True)
    assert len(feats) == len(cached) == len(layers)
    for a, b in zip(feats, cached):
        assert a.dtype == torch.float16 and torch.allclose(a.float(), torch.from_numpy(np.array(b)).float(),
                                                           rtol=2e-3, atol=1e-3)
    assert torch.allclose(logits, torch.from_numpy(np.array(cached_logits)), atol=1e-4)
    assert extra["channel_stats"].keys() == {str(k) for k in layers}
    assert device_cache(teacher, data, layers, torch.device("cpu"), 1024, channel_stats=False)[2] == {
        "channel_stats": {}}  # only `align: standardize` needs them
    _, _, device_made = _train(pipe, "ours", epochs=2, teacher_features="device")
    _, _, from_cache = _train(pipe, "ours", epochs=2)
    for a, b in zip(device_made, from_cache):
        assert a["loss_feature"] == pytest.approx(b["loss_feature"], rel=1e-3)
    params = load_params(pipe / "params.yaml", ["student.teacher_features=device"])
    assert layers_to_cache(["ours", "base_fkd"], params.student, "resnet34", layers) == []
    with pytest.raises(InputError, match=r"^layer 18 out of range: the model has 18 generalized layers \(0..17\)$"):
        _train(pipe, "ours", epochs=1, teacher_features="device", teacher_layers="[0,1,18,30]")


def test_distribution_aware_alignment_standardizes_targets(pipe):
    data = load_prepared(pipe / "data")
    _, _, teacher_id = load_teacher(pipe / "teacher", data)
    feats, logits, manifest = load_cache(pipe / "cache", teacher_id, data.data_id, [3, 13])
    targets = CachedTargets([3, 13], feats, logits, torch.device("cpu"), manifest["channel_stats"])
    standardized, _ = targets(torch.arange(len(logits)), None)
    for f in standardized:
        assert f.mean((0, 2, 3)).abs().max() < 1e-2
        assert (f.std((0, 2, 3)) - 1).abs().max() < 1e-2
    _, _, aligned = _train(pipe, "ours", epochs=1, align="standardize", relation_weight=0.5)
    _, _, plain = _train(pipe, "ours", epochs=1, relation_weight=0.5)
    assert aligned[0]["loss_relation"] > 0
    # the same seed and batches: only the targets differ, standardized in one run
    assert aligned[0]["loss_feature"] != pytest.approx(plain[0]["loss_feature"], rel=1e-2)

    # the plain student of the same params (the stage passes it no cache) has no targets to align: it trains
    params = load_params(pipe / "params.yaml", ["student.method=ce", "student.train.epochs=1",
                                                "student.align=standardize"])
    teacher, spec, _ = load_teacher(pipe / "teacher", data)
    _, summary, _ = train_student(data, params.student, 0, teacher, spec, None, None, None, "")
    assert summary["epochs"] == 1


def test_simkd_student_exports_with_the_borrowed_teacher_classifier_inside(pipe, tmp_path):
    import onnxruntime as ort
    from typer.testing import CliRunner

    from stages.cli import app

    run = tmp_path / "runs/student-simkd-s0"
    result = run_stage(pipe, "student", "-S", "student.method=simkd", "--out", str(run), "--metrics",
                       str(tmp_path / "m.json"), "--live-dir", str(tmp_path / "l"), "--resume-dir", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    onnx_file = tmp_path / "export/m.onnx"
    result = CliRunner().invoke(app, ["export", "-p", str(pipe / "params.yaml"), "--data", str(pipe / "data"),
                                      "--runs", str(tmp_path / "runs"), "--out", str(onnx_file), "--metrics",
                                      str(tmp_path / "e.json"), "-S", "export.run=simkd-s0",
                                      "-S", "export.batch_sizes=[1,48]", "-S", "export.small_batch_images=5"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["method"] == "simkd"
    data = load_prepared(pipe / "data")
    logits = ort.InferenceSession(str(onnx_file)).run(["logits"], {"images": data.test_images})[0]
    accuracy = (logits.argmax(1) == data.test_labels).mean()  # the graph's, against the student stage's
    assert accuracy == pytest.approx(json.loads((tmp_path / "m.json").read_text())["test_acc"], abs=1e-6)


def test_student_stage_outputs_and_a_failed_run_keeping_them(pipe, tmp_path, monkeypatch):
    out = ["--out", str(tmp_path / "s"), "--metrics", str(tmp_path / "m.json"), "--live-dir", str(tmp_path / "l"),
           "--resume-dir", str(tmp_path / "r"), "-S", "student.train.resume_every_s=0"]  # a checkpoint every epoch
    result = run_stage(pipe, "student", *out)
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "r").iterdir()) == []  # the resume checkpoint goes once the outputs are in place
    metrics = json.loads((tmp_path / "m.json").read_text())
    selected = json.loads((pipe / "scores/selection.json").read_text())["layers"]
    assert metrics["method"] == "ours" and metrics["teacher_layers"] == selected
    assert metrics["student_layers"] == [1, 2, 3, 4]
    curves = (tmp_path / "l/plots/metrics/loss_feature.tsv").read_text().splitlines()
    assert len(curves) == 3
    distiller, _, _ = load_student_dir(tmp_path / "s", load_prepared(pipe / "data"))
    assert distiller.method == "ours" and distiller.teacher_layers == selected

    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "r" not in p.relative_to(tmp_path).parts}
    result = run_stage(pipe, "student", *out, "-S", "student.train.lr=1e30")
    assert result.exit_code == 1 and "non-finite training loss" in result.output
    assert {p: p.read_bytes() for p in kept} == kept  # model, metrics and curves of the good run

    fail_model_saves(monkeypatch, "unexpected pos 64 vs 0")  # trained, curves written: the model cannot be
    result = run_stage(pipe, "student", *out, "-S", "seed=1")
    assert result.exit_code == 1 and "model.pt failed: unexpected pos 64 vs 0" in result.output
    assert {p: p.read_bytes() for p in kept} == kept and len(list((tmp_path / "r").iterdir())) == 1  # to resume
    monkeypatch.undo()

    with torch.no_grad():  # a student whose weights went NaN gets no probe (it used to get a NaN one)
        next(distiller.parameters()).fill_(float("nan"))
    with pytest.raises(InputError, match="student's features are not finite"):
        probe_student(distiller, load_prepared(pipe / "data"), torch.device("cpu"), [0.0], 0.2, 0, 10)


@pytest.mark.parametrize("args, message", [
    (["-S", "student.train.batch_size=200"], "error: batch_size 200 exceeds the 96 training samples"),
    (["-S", "student.align=standardize", "-S", "student.train.augment=true"],
     "error: align: standardize needs the cache's channel statistics (turn augmentation off)"),
    (["--scores", "{tmp}/scores-k3"], "error: ours pairs layers one-to-one: 4 student layers vs 3 teacher layers"),
    (["--teacher", "{pipe}/data"], "was written by stage 'prepare', expected 'teacher'"),
    pytest.param(["-S", "student.device=cuda"], "error: device: cuda requested but no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")),
])
def test_a_student_stage_refused_its_inputs_exits_2_in_one_line_before_writing(pipe, tmp_path, args, message):
    if "{tmp}/scores-k3" in args:  # scores selecting three layers for a method that pairs four
        assert run_stage(pipe, "score", "--out", str(tmp_path / "scores-k3"), "-S", "score.k=3").exit_code == 0
    args = [a.format(tmp=tmp_path, pipe=pipe) for a in args]
    result = run_stage(pipe, "student", "--out", str(tmp_path / "s"), "--metrics", str(tmp_path / "m.json"),
                       "--live-dir", str(tmp_path / "l"), "--resume-dir", str(tmp_path / "r"), *args)
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output
    assert not any(p.exists() for p in (tmp_path / "s", tmp_path / "m.json", tmp_path / "l"))


def test_student_resume_after_kill_equals_uninterrupted(pipe):
    reference, _, ref_history = _train(pipe, "ours", epochs=3)

    class Killed(Exception):
        pass

    def kill(row):
        if row["epoch"] == 2:
            raise Killed

    params = load_params(pipe / "params.yaml", ["student.train.epochs=3", "student.train.resume_every_s=0"]).student
    data = load_prepared(pipe / "data")
    teacher, teacher_spec, teacher_id = load_teacher(pipe / "teacher", data)
    selected = json.loads((pipe / "scores/selection.json").read_text())["layers"]
    cache = load_cache(pipe / "cache", teacher_id, data.data_id, selected)
    ckpt = pipe / "resume-student.pt"
    with pytest.raises(Killed):
        train_student(data, params, 0, teacher, teacher_spec, selected, cache, ckpt, "k", on_epoch=kill)
    resumed, _, history = train_student(data, params, 0, teacher, teacher_spec, selected, cache, ckpt, "k")
    assert [r["test_acc"] for r in history] == [r["test_acc"] for r in ref_history]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# --- probe ------------------------------------------------------------------------------------------------

def test_probe_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    y = np.repeat(np.arange(4), 60)
    x = centres[y] + 1.5 * rng.normal(size=(len(y), 16))
    x_test_np = centres[np.repeat(np.arange(4), 50)] + 1.5 * rng.normal(size=(200, 16))
    y_test = np.repeat(np.arange(4), 50)
    probe, trials = fit_probe(torch.from_numpy(x), torch.from_numpy(y), 4, [1e-3, 1e-2, 1e-1], 0.2, 0, 500)
    assert probe.weight_decay == max(trials, key=lambda t: (t["holdout_acc"], t["weight_decay"]))["weight_decay"]
    from pipeline.sources import stratified_mask

    held = stratified_mask(y, 0.2, 0)  # each penalty's held-out accuracy, recomputed with scikit-learn
    mean, std = x[~held].mean(0), x[~held].std(0)
    for trial in trials:
        fitted = LogisticRegression(C=1 / ((~held).sum() * trial["weight_decay"]), max_iter=5000, tol=1e-10)
        fitted.fit((x[~held] - mean) / std, y[~held])
        want = fitted.score((x[held] - mean) / std, y[held])
        assert trial["holdout_acc"] == pytest.approx(want, abs=1.01 / held.sum())
    z = (x - probe.mean.numpy()) / probe.std.numpy()
    ref = LogisticRegression(C=1 / (len(y) * probe.weight_decay), max_iter=5000, tol=1e-10).fit(z, y)
    np.testing.assert_allclose(probe.weight.numpy(), ref.coef_.T, atol=2e-3)
    ours = (probe.logits(torch.from_numpy(x_test_np)).argmax(1).numpy() == y_test).mean()
    theirs = ref.score((x_test_np - probe.mean.numpy()) / probe.std.numpy(), y_test)
    assert abs(ours - theirs) <= 0.01


def test_probe_standardises_by_the_rows_each_fit_learns_from(monkeypatch):
    import pipeline.probe

    fitted_on, fit_logistic = [], pipeline.probe.fit_logistic

    def recording(x, *args):
        fitted_on.append(x)
        return fit_logistic(x, *args)

    monkeypatch.setattr(pipeline.probe, "fit_logistic", recording)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = torch.from_numpy(rng.normal(size=(3, 8))[y] + rng.normal(size=(120, 8)) * 3 + 5)
    fit_probe(x, torch.from_numpy(y), 3, [1e-2, 1e-1], 0.25, 0, 20)
    assert [len(x) for x in fitted_on] == [90, 90, 120]  # each penalty on the rows not held out, then the refit
    for rows in fitted_on:  # held-out rows do not leak into the standardisation of the rows fitted
        assert rows.mean(0).abs().max() < 1e-9 and (rows.std(0, unbiased=False) - 1).abs().max() < 1e-9


def test_probe_stage(pipe, tmp_path):
    assert run_stage(pipe, "student", "--out", str(pipe / "student"), "--metrics", str(tmp_path / "s.json"),
                     "--live-dir", str(tmp_path / "l")).exit_code == 0
    result = run_stage(pipe, "probe", "--student", str(pipe / "student"), "--out", str(tmp_path / "p"),
                       "--metrics", str(tmp_path / "p.json"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "p.json").read_text())
    student = json.loads((tmp_path / "s.json").read_text())
    assert metrics["head_test_acc"] == pytest.approx(student["test_acc"])
    assert metrics["layer"] == 4 and len(metrics["trials"]) == 4
    assert metrics["probe_test_acc"] > 0.5


def test_students_learn_from_their_train_subset_of_the_teachers_data(pipe, tmp_path):
    subset = ["-S", "student.train_subset=48"]  # of the 96 images the teacher and the scores saw
    assert run_stage(pipe, "cache", "--out", str(tmp_path / "cache"), *subset).exit_code == 0
    data = load_prepared(pipe / "data")
    _, _, teacher_id = load_teacher(pipe / "teacher", data)
    sub = data.train_subset(48)
    _, logits, manifest = load_cache(tmp_path / "cache", teacher_id, sub.data_id, [])
    _, whole, _ = load_cache(pipe / "cache", teacher_id, data.data_id, [])
    keep = [i for i, image in enumerate(data.train_images) if any((image == s).all() for s in sub.train_images)]
    assert manifest["num_samples"] == 48 and len(keep) == 48
    np.testing.assert_allclose(logits, whole[keep], atol=1e-4)  # row i: the subset's image i

    out = ["--out", str(tmp_path / "s"), "--metrics", str(tmp_path / "s.json"), "--live-dir", str(tmp_path / "l"),
           "--resume-dir", str(tmp_path / "r")]
    refused = run_stage(pipe, "student", *out, *subset)  # the whole split's cache: rows of other images
    assert refused.exit_code == 2 and "was made from another data" in refused.output
    assert not (tmp_path / "s").exists()
    result = run_stage(pipe, "student", *out, *subset, "--cache", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s.json").read_text())["train_images"] == 48
    result = run_stage(pipe, "probe", "--student", str(tmp_path / "s"), "--out", str(tmp_path / "p"),
                       "--metrics", str(tmp_path / "p.json"))  # no -S: the subset is the student's own
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p.json").read_text())["train_images"] == 48


def test_cache_holds_exactly_the_layers_the_methods_need():
    from pipeline.student import layers_to_cache

    params = load_params(None).student
    selected = [9, 10, 11, 12]
    assert layers_to_cache(["ours", "ce"], params, "resnet34", selected) == selected
    assert layers_to_cache(["ce", "vkd"], params, "resnet34", selected) == []
    assert layers_to_cache(["ours", "base_fkd", "sp"], params, "resnet34", selected) == \
        [3, 7, 9, 10, 11, 12, 13, 16]


def test_cache_too_big_for_memory_is_read_from_the_memory_map(pipe):
    data = load_prepared(pipe / "data")
    _, _, teacher_id = load_teacher(pipe / "teacher", data)
    feats, logits, _ = load_cache(pipe / "cache", teacher_id, data.data_id, [3, 13])
    resident = CachedTargets([3, 13], feats, logits, torch.device("cpu"))
    mapped = CachedTargets([3, 13], feats, logits, torch.device("cpu"), memory_share=0.0)
    assert resident.resident and not mapped.resident
    ids = torch.tensor([7, 0, 95, 7])
    for a, b in zip(resident(ids, None)[0] + [resident(ids, None)[1]], mapped(ids, None)[0] + [mapped(ids, None)[1]]):
        assert torch.equal(a, b)


def test_reference_peak_lr_is_the_reference_codes_per_student_and_method(pipe):
    from pipeline.student import peak_lr

    cases = {("ours", "resnet9"): 0.05, ("base_fkd", "mobilenetv2"): 0.05, ("ce", "resnet9"): 0.01,
             ("ours", "vgg11_bn"): 0.01, ("vkd", "vit_ett"): 0.01}
    for (method, arch), lr in cases.items():
        params = load_params(None, [f"student.method={method}", "student.peak_lr=reference", "student.train.lr=0.3"])
        assert peak_lr(params.student, arch) == lr
    assert peak_lr(load_params(None, ["student.train.lr=0.3"]).student, "resnet9") == 0.3
    _, _, reference = _train(pipe, "ours", epochs=1, peak_lr="reference", **{"train.lr": 0.01})
    _, _, explicit = _train(pipe, "ours", epochs=1, **{"train.lr": 0.05})
    _, _, lower = _train(pipe, "ours", epochs=1, **{"train.lr": 0.01})
    assert reference[0]["train_loss"] == explicit[0]["train_loss"] != lower[0]["train_loss"]


def test_loss_weights_come_from_their_own_params():
    from pipeline.student import loss_weights

    params = load_params(None, ["student.ce_weight=2", "student.kl_weight=3", "student.kl_tau=5",
                                "student.feature_weight=7", "student.relation_weight=11"])
    assert loss_weights(params.student) == LossWeights(ce=2, kl=3, tau=5, feature=7, relation=11)
    assert loss_weights(load_params(None, []).student) == LossWeights()  # the paper's: CE 1, KL 16 at tau 4
