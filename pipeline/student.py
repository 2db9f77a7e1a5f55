"""Train a student with a distillation method; save and rebuild it (with projectors and any teacher tail)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pipeline import distributed
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import StudentParams
from pipeline.data import Prepared
from pipeline.distill import METHODS, Distiller, LossWeights
from pipeline.errors import InputError
from pipeline.io import manifest_id, read_manifest, read_verified
from pipeline.layers import LayerChain, layer_shapes, layer_view
from pipeline.models import STANDARD_LAYERS, ModelSpec, build_model
from pipeline.targets import make_targets, needs_teacher, target_source
from pipeline.teacher import device_splits, spec_for
from pipeline.train import fit, pick_device, prepare_model, summarise

FORMAT = "kd-student/1"


def resolve_layers(params: StudentParams, teacher_arch: str,
                   selected: list[int] | None) -> tuple[list[int], list[int]]:
    """(student layers, teacher layers) for the method: standard lists, the quality selection, or params."""
    method = METHODS[params.method]
    student = params.student_layers or STANDARD_LAYERS.get(params.model.arch)
    if student is None:
        raise InputError(f"no standard layers for student {params.model.arch}: set student.student_layers")
    if not method.features:
        return sorted(student), []
    teacher = params.teacher_layers
    if teacher is None and method.teacher_layers == "selected":
        if selected is None:
            raise InputError(f"method {params.method} needs the score stage's selection")
        teacher = selected
    teacher = teacher or STANDARD_LAYERS.get(teacher_arch)
    if teacher is None:
        raise InputError(f"no standard layers for teacher {teacher_arch}: set student.teacher_layers")
    return sorted(student), sorted(teacher)


def peak_lr(params: StudentParams, arch: str) -> float:
    """The learning rate `params.peak_lr` names; "reference" is the reference code's `LearningRate` AS CODED."""
    if params.peak_lr == "max_lr":
        return params.max_lr
    if params.peak_lr == "reference":
        return 0.05 if needs_teacher(params.method) and arch in ("resnet9", "mobilenetv2") else 0.01
    return params.train.lr


def layers_to_cache(methods: list[str], params: StudentParams, teacher_arch: str, selected: list[int]) -> list[int]:
    """Every teacher layer that one of `methods` distils from (the cache stage stores exactly these).

    Empty when the student makes its teacher features on the device itself (`teacher_features: device`).
    """
    if params.teacher_features == "device":
        return []
    layers = set()
    for method in methods:
        layers |= set(resolve_layers(params.model_copy(update={"method": method}), teacher_arch, selected)[1])
    return sorted(layers)


def build_distiller(student_spec: ModelSpec, method: str, student_layers: list[int], teacher_layers: list[int],
                    teacher_shapes: list[tuple], weights: LossWeights, batch_size: int,
                    teacher: nn.Module | None) -> Distiller:
    student = build_model(student_spec)
    if not isinstance(student, nn.Sequential):
        raise InputError("distilled students must be one of the paper's architectures (generalized layers)")
    shapes = layer_shapes(student, (student_spec.in_chans, student_spec.image_size, student_spec.image_size))
    view = LayerChain(student)
    student_shapes = [shapes[k] for k in sorted(view.index(k) for k in student_layers)]
    tail = None
    if METHODS[method].features == "simkd":
        if not isinstance(teacher, nn.Sequential):
            raise InputError("simkd needs a teacher from the paper's architectures")
        chain = LayerChain(teacher)
        tail = chain.modules[chain.ends[chain.index(teacher_layers[-1])] + 1:]
    distiller = Distiller(student, method, student_layers, teacher_layers, student_shapes, teacher_shapes,
                          weights, tail, batch_size)
    distiller.student_spec = student_spec
    return distiller


def loss_weights(params: StudentParams) -> LossWeights:
    return LossWeights(ce=params.ce_weight, kl=params.kl_weight, tau=params.kl_tau, feature=params.feature_weight,
                       relation=params.relation_weight)


def teacher_inputs(params: StudentParams, teacher_arch: str, teacher_id: str, data: Prepared, scores_dir: Path,
                   cache_dir: Path) -> tuple[list[int] | None, tuple | None]:
    """The earlier stages' outputs the method reads: the selected layers (where it distils them and
    `teacher_layers` does not name others) and the cache of the teacher layers it distils (none where the
    teacher runs in the student stage: `teacher_features: device`, or augmented images)."""
    from pipeline.cache import load_cache
    from pipeline.selection import load_selection

    selected = None
    if METHODS[params.method].teacher_layers == "selected" and params.teacher_layers is None:
        selected = load_selection(scores_dir, teacher_id)
    if target_source(params) != "cache":
        return selected, None
    _, teacher_layers = resolve_layers(params, teacher_arch, selected)
    return selected, load_cache(cache_dir, teacher_id, data.data_id, teacher_layers)


def train_student(data: Prepared, params: StudentParams, seed: int, teacher: nn.Module, teacher_spec: ModelSpec,
                  selected: list[int] | None, cache: tuple | None, resume_path: Path | None, resume_key: str,
                  **callbacks) -> tuple[Distiller, dict, list[dict]]:
    """Train with `params.method`; `cache` is (features, logits, manifest) from `load_cache` where the targets come
    from the cache stage (`target_source`), else None.

    The summary's `setup_seconds`: building the model, making teacher features, moving the data to the device.
    """
    start = time.perf_counter()
    if METHODS[params.method].features == "semckd" and distributed.rank_and_world()[1] > 1:
        raise InputError("semckd's attention layers are sized by the whole batch: train it in one process, "
                         "not under torchrun")
    device = pick_device(params.device)
    spec = spec_for(params.model, data)
    student_layers, teacher_layers = resolve_layers(params, teacher_spec.arch, selected)
    shape = (teacher_spec.in_chans, teacher_spec.image_size, teacher_spec.image_size)
    all_shapes, teacher_view = layer_shapes(teacher, shape), layer_view(teacher)
    teacher_shapes = [all_shapes[teacher_view.index(k)] for k in teacher_layers]  # index: one line if out of range
    torch.manual_seed(seed)
    distiller = build_distiller(spec, params.method, student_layers, teacher_layers, teacher_shapes,
                                loss_weights(params), params.train.batch_size, teacher)
    distiller = prepare_model(distiller, device)
    targets = make_targets(params, teacher, teacher_layers, data, cache, device)

    def step_loss(model, ids, x, y):  # model: the Distiller, or DistributedDataParallel around it
        t_feats, t_logits = targets(ids, x)
        return model(x, y, t_feats, t_logits)

    recipe = params.train.model_copy(update={"lr": peak_lr(params, spec.arch)})
    train, test = device_splits(data, device)
    setup_seconds = time.perf_counter() - start
    state = fit(distiller, train, test, recipe, seed, resume_path, resume_key, step_loss=step_loss, **callbacks)
    return distiller, {**summarise(state.history), "setup_seconds": setup_seconds}, state.history


def save_student(path: str | Path, distiller: Distiller, teacher_spec: ModelSpec, **info) -> None:
    save_checkpoint(path, FORMAT, distiller, spec=distiller.student_spec.to_dict(), method=distiller.method,
                    student_layers=distiller.student_layers, teacher_layers=distiller.teacher_layers,
                    teacher_shapes=[list(s) for s in distiller.teacher_shapes], weights=asdict(distiller.weights),
                    batch_size=distiller.batch_size, teacher_spec=teacher_spec.to_dict(), **info)


def load_student(path: str | Path) -> tuple[Distiller, ModelSpec, dict]:
    """Rebuild a saved student (eval mode, CPU) with its projectors and teacher tail."""
    ckpt = load_checkpoint(path, FORMAT, "student")
    try:
        spec = ModelSpec(**ckpt["spec"])
        teacher = None
        if METHODS[ckpt["method"]].features == "simkd":
            teacher = build_model(ModelSpec(**{**ckpt["teacher_spec"], "pretrained": False}))
        distiller = build_distiller(spec, ckpt["method"], ckpt["student_layers"], ckpt["teacher_layers"],
                                    [tuple(s) for s in ckpt["teacher_shapes"]], LossWeights(**ckpt["weights"]),
                                    ckpt["batch_size"], teacher)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: malformed student description ({type(err).__name__}: {err})") from None
    try:
        distiller.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise InputError(f"{path}: weights do not fit: {str(err).splitlines()[0]}") from None
    info = {k: v for k, v in ckpt.items() if k not in ("state_dict", "format")}
    return distiller.eval(), spec, info


def training_data(student_dir: str | Path, data: Prepared) -> Prepared:
    """The training images the student of `student_dir` learned from: its `train_subset` of `data`."""
    return data.train_subset(read_manifest(student_dir, "student")["params"].get("train_subset"))


def load_student_dir(student_dir: str | Path, data: Prepared,
                     teacher_id: str | None = None) -> tuple[Distiller, ModelSpec, str]:
    """The `student` stage's model, refused if its files changed or it was trained on other data (or from another
    teacher than `teacher_id`); with its id."""
    made_from = {"data": data.data_id, **({"teacher": teacher_id} if teacher_id else {})}
    manifest = read_verified(student_dir, "student", made_from)
    distiller, spec, _ = load_student(Path(student_dir) / "model.pt")
    return distiller, spec, manifest_id(manifest)
