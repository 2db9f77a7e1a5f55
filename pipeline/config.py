"""Typed params: one pydantic model per `params.yaml` section, unknown keys forbidden.

Kept free of torch so that commands can validate params (and print `--help`) instantly.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError,
                      field_validator)

from pipeline.errors import InputError


Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's seeding range
Device = Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: cuda when available")]


def _allows_bool(annotation) -> bool:
    return annotation is bool or any(_allows_bool(a) for a in get_args(annotation))


class Section(BaseModel):
    # no inf/NaN: they would fail only at training time, as a "non-finite loss"
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def no_boolean_for_a_number(cls, value, info):
        """Lax pydantic reads `epochs: true` as 1; strict mode would refuse `lr: 1e-3`, which YAML reads as a string."""
        annotation = cls.model_fields[info.field_name].annotation
        boolean = next((v for v in (value if isinstance(value, list) else [value]) if isinstance(v, bool)), None)
        if boolean is not None and not _allows_bool(annotation):  # (in a list too: `seeds: [true]` is no seed 1)
            raise ValueError(f"{str(boolean).lower()} (a boolean) is not valid here")
        return value

    def recorded(self) -> dict:
        """What a stage's manifest records of this section: what its outputs depend on."""
        return self.model_dump()


class PrepareParams(Section):
    source: Literal["fashion-mnist", "cifar10", "cifar100", "imagefolder"] = Field(
        "fashion-mnist", description="dataset to prepare")
    root: Optional[str] = Field(None, description="local copy (folder or .tar.gz); null: Debian package or download")
    cache_dir: str = Field("data/download", description="where downloads go when root is null")
    image_size: int = Field(32, ge=8, le=1024, description="square side of the prepared images")
    resize_mode: Literal["pad", "resize"] = Field("pad", description="fit images by centred zero-padding or resizing")
    channels: Optional[Literal[1, 3]] = Field(None, description="1 or 3 output channels; null keeps the source's")
    train_subset: Optional[PositiveInt] = Field(None, description="class-balanced training subset size; null: all")
    test_subset: Optional[PositiveInt] = Field(None, description="class-balanced test subset size; null: all")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="imagefolder without train/test folders: test share")

    def recorded(self) -> dict:
        """Where the data lie left out: moving them must not make every later stage run again."""
        return self.model_dump(exclude={"root", "cache_dir"})


PAPER_ARCHS = ("resnet9", "resnet34", "mobilenetv2", "vgg11_bn", "vgg19_bn", "vit_ett", "vit_b")


class ModelParams(Section):
    arch: str = Field(description=f"{', '.join(PAPER_ARCHS)} or timm:<name>")
    width: float = Field(1.0, gt=0, le=4, description="channel width multiplier (paper's models)")
    pretrained: bool = Field(False, description="start from pretrained weights (timm models, needs the hub)")
    timm_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")

    @field_validator("arch")
    @classmethod
    def known_arch(cls, arch: str) -> str:
        if arch not in PAPER_ARCHS and not (arch.startswith("timm:") and len(arch) > 5):
            raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(PAPER_ARCHS)} or timm:<name>")
        return arch


class RecipeParams(Section):
    recipe: Literal["adamw_onecycle", "sgd_multistep"] = Field(
        "adamw_onecycle", description="AdamW + OneCycle (paper, 50 epochs) or SGD + MultiStep (240 epochs)")
    epochs: PositiveInt = Field(50, description="training epochs")
    batch_size: PositiveInt = Field(128, description="global batch size")
    lr: float = Field(0.01, gt=0, description="peak learning rate (OneCycle max_lr or SGD initial lr)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW: 0.01 in the paper; SGD: 5e-4")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    milestones: list[PositiveInt] = Field([150, 180, 210], description="SGD: epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="SGD: lr factor at each milestone")
    backbone_lr_scale: float = Field(1.0, gt=0, le=1, description="lr factor for everything before the classifier")
    augment: bool = Field(False, description="per-image random crop (pad 4) and horizontal flip")
    eval_batch_size: PositiveInt = Field(1024, description="batch size for evaluation")
    sync_batchnorm: bool = Field(False, description="torchrun on GPUs: BatchNorm statistics over the global batch")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "cudagraphs"] = Field(
        "none", description="torch.compile the training step; reduce-overhead adds CUDA graphs (GPU); cudagraphs: "
        "CUDA graphs of the step's own kernels, no inductor code generation (a short warm-up)")
    resume_every_s: float = Field(60.0, ge=0, description="with --resume-dir: seconds of training between resume "
                                  "checkpoints (0: after every epoch)")


class TeacherModelParams(ModelParams):
    arch: str = Field("resnet34", description=ModelParams.model_fields["arch"].description)


class TeacherParams(Section):
    model: TeacherModelParams = TeacherModelParams()
    train: RecipeParams = RecipeParams()
    checkpoint: Optional[str] = Field(None, description="load this teacher checkpoint instead of training one")
    device: Device = "auto"


class ScoreParams(Section):
    mode: Literal["reference", "corrected"] = Field(
        "reference", description="reference: the paper's code AS CODED; corrected: its quirks fixed")
    subset_a: PositiveInt = Field(5000, description="class-balanced subset A size (cosines, norms, distances)")
    subset_b_per_class: int = Field(500, ge=2, description="subset B samples per class (class spectra); the "
                                            "reference took 50 for TinyImageNet CNN teachers (a 10 % feature pool)")
    criterion: Literal["Q", "S", "I", "E", "sqrtIE"] = Field("Q", description="rank layers by this score")
    k: PositiveInt = Field(4, description="layers to select: the number of distilled student layers")
    layers: Optional[list[NonNegativeInt]] = Field(None, min_length=1, description="explicit teacher layers, overriding the "
                                                   "selection (numbered from 0, as in the scores' layers.csv)")
    dtype: Literal["float64", "float32"] = Field("float64", description="precision of Gram and spectra")
    batch_size: PositiveInt = Field(500, description="teacher forward batch size")
    device: Device = "auto"


class CacheParams(Section):
    batch_size: PositiveInt = Field(500, description="teacher forward batch size")
    device: Device = "auto"


METHOD_NAMES = ("ce", "vkd", "vkd_std", "base_fkd", "base_fkd_nokl", "base_fkd_all", "stl_seplin", "ours",
                "ours_ce", "ours_kl", "sp", "simkd", "semckd")


class StudentModelParams(ModelParams):
    arch: str = Field("resnet9", description=ModelParams.model_fields["arch"].description)


class StudentRecipeParams(RecipeParams):
    lr: float = Field(0.05, gt=0, description=RecipeParams.model_fields["lr"].description)


class StudentParams(Section):
    method: Literal[METHOD_NAMES] = Field("ours", description="loss composition, see `pipeline/distill.py` METHODS")
    model: StudentModelParams = StudentModelParams()
    train: StudentRecipeParams = StudentRecipeParams()
    peak_lr: Literal["lr", "reference", "max_lr"] = Field(
        "lr", description="peak learning rate: train.lr; reference: what the reference code ran for this student and "
                          "method (0.05 for ResNet-9/MobileNetV2 KD students, else 0.01; plain `ce` students 0.01); "
                          "or max_lr (the reference configs' MaxLR field, printed but never used by its optimizer)")
    max_lr: float = Field(0.0075, gt=0, description="peak when peak_lr is max_lr (the reference's MaxLR: "
                         "0.0075 for ResNet/MobileNetV2 students, 0.005 VGG, 0.001 ViT_ETT)")
    student_layers: Optional[list[NonNegativeInt]] = Field(
        None, description="distilled student layers (numbered from 0); null: standard list")
    teacher_layers: Optional[list[NonNegativeInt]] = Field(
        None, description="null: selected by `score` for ours*, the teacher's standard list for the baselines")
    ce_weight: float = Field(1.0, ge=0, description="cross-entropy weight")
    kl_weight: float = Field(16.0, ge=0, description="KL weight (tau^2 in the paper)")
    kl_tau: float = Field(4.0, gt=0, description="KL temperature")
    feature_weight: float = Field(1.0, ge=0, description="feature-loss weight")
    align: Literal["none", "standardize"] = Field(
        "none", description="beyond the paper: standardize teacher targets per channel with cached statistics")
    relation_weight: float = Field(0.0, ge=0, description="beyond the paper: batch-similarity matching term")
    train_subset: Optional[PositiveInt] = Field(
        None, description="class-balanced training images the student and its probe learn from, drawn from "
                          "the prepared ones (with `prepare.train_subset` null: the same ones it would keep); the "
                          "teacher and its layer scores see all. null: all")
    teacher_features: Literal["cache", "device"] = Field(
        "cache", description="cache: the cache stage's files; device: the teacher runs over the training split once "
                             "at start and its features stay on the device (no disk; with augment: every batch)")
    device: Device = "auto"


class ProbeParams(Section):
    weight_decays: list[NonNegativeFloat] = Field([0.0, 1e-4, 1e-3, 1e-2], min_length=1,
                                                  description="L2 penalties tried on held-out data")
    holdout: float = Field(0.1, gt=0, lt=1, description="share of the training split held out to pick the penalty")
    max_iter: PositiveInt = Field(200, description="L-BFGS iterations")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="the student's forward pass (auto: cuda when "
                                                   "available); the fits run on the CPU")


class EvaluateParams(Section):
    device: Device = "auto"


class ExportParams(Section):
    run: Optional[str] = Field(None, description="student run to export (runs/student-<run>, e.g. ours-s0); "
                                                 "null: the first of `methods` with the first of `seeds`")
    head: Literal["student", "probe"] = Field("student", description="the head trained with the student or the probe")
    opset: int = Field(18, ge=18, le=23, description="ONNX opset, pinned (torch's exporter writes 18 and up)")
    batch_sizes: list[PositiveInt] = Field([1, 7, 256], min_length=1,
                                           description="parity-gate batch sizes (1, odd, large)")
    small_batch_images: PositiveInt = Field(500, description="test images checked at each batch size but the "
                                                             "largest, which checks them all")
    atol: float = Field(1e-4, gt=0, description="max |onnxruntime - torch| logit difference (float32)")
    min_agreement: float = Field(0.999, gt=0, le=1, description="min top-1 agreement onnxruntime vs torch")


class Params(Section):
    seed: Seed = Field(0, description="seed for subsets, initialisation, shuffling and augmentation")
    seeds: list[Seed] = Field([0], min_length=1, description="student seeds (dvc.yaml's matrix expands them)")
    methods: list[Literal[METHOD_NAMES]] = Field(["ours", "ce"], min_length=1,
                                                 description="student methods trained by `dvc repro`")
    prepare: PrepareParams = PrepareParams()
    teacher: TeacherParams = TeacherParams()
    score: ScoreParams = ScoreParams()
    cache: CacheParams = CacheParams()
    student: StudentParams = StudentParams()
    probe: ProbeParams = ProbeParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()

    @field_validator("seeds", "methods")
    @classmethod
    def each_once(cls, runs: list) -> list:
        repeated = sorted({str(r) for r in runs if runs.count(r) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed twice: each run is trained once")
        return runs

    def recorded_for(self, stage: str) -> dict:
        """A stage's manifest `params`: the seed and the stage's section."""
        return {"seed": self.seed, **getattr(self, stage).recorded()}


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    if "" in key.split("."):
        raise InputError(f"override {key!r}: an empty part in the dotted key")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"override {key}: {part} is not a section")
    node[leaf] = value


def _one_line(err: ValidationError) -> str:
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a typo explains the rest
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "params"
    what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"params: {where}: {what}{more}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be given again
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # yaml refuses it below, in its own words
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(problem=f"key {key!r} given twice",
                                                        problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path):
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise InputError(f"params file {path} is not UTF-8 text") from None
    except (RecursionError, ValueError) as err:  # nested thousands deep; an integer of thousands of digits
        raise InputError(f"params file {path} cannot be read: {type(err).__name__}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"params file {path} is not valid YAML{where}: {what}") from None


def load_params(path: str | Path | None, overrides: list[str] = ()) -> Params:
    """Read params.yaml (or defaults when path is None), apply `key.sub=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"params file not found: {path}")
        tree = _read_yaml(path)
        tree = {} if tree is None else tree  # an empty file: the defaults
        if not isinstance(tree, dict):
            raise InputError(f"params file {path} must hold a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError, ValueError):
            raise InputError(f"override {item!r}: the value is not valid YAML") from None
        _set_dotted(tree, key.strip(), value)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise InputError(_one_line(err)) from None
