"""Build a model from a serialisable spec: the paper's architectures, or any timm model as `timm:<name>`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from pipeline.config import PAPER_ARCHS
from pipeline.errors import InputError

# METHOD.md §4: the "standard" distilled layers of each architecture (stage ends for CNNs).
STANDARD_LAYERS = {
    "resnet9": [1, 2, 3, 4], "resnet34": [3, 7, 13, 16], "mobilenetv2": [3, 6, 13, 17],
    "vgg11_bn": [1, 3, 5, 7], "vgg19_bn": [3, 7, 11, 15], "vit_ett": [1, 3, 5, 7], "vit_b": [2, 4, 8, 10],
}


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    num_classes: int
    in_chans: int = 3
    image_size: int = 32
    width: float = 1.0
    pretrained: bool = False
    timm_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_timm(self) -> bool:
        return self.arch.startswith("timm:")


def build_model(spec: ModelSpec) -> nn.Module:
    if spec.is_timm:
        return _build_timm(spec)
    if spec.arch not in PAPER_ARCHS:
        raise InputError(f"unknown arch {spec.arch!r}: choose one of {', '.join(PAPER_ARCHS)} or timm:<name>")
    if spec.pretrained:
        raise InputError(f"no pretrained weights for {spec.arch}: use a timm model (e.g. timm:resnet34) to fine-tune")
    from pipeline.models import mobilenetv2, resnet, vgg, vit

    args = (spec.num_classes, spec.in_chans)
    if spec.arch == "resnet9":
        return resnet.resnet([1, 1, 1, 1], *args, spec.image_size, spec.width)
    if spec.arch == "resnet34":
        return resnet.resnet([3, 4, 6, 3], *args, spec.image_size, spec.width)
    if spec.arch == "mobilenetv2":
        return mobilenetv2.mobilenetv2(*args, spec.image_size, spec.width)
    if spec.arch.startswith("vgg"):
        return vgg.vgg(spec.arch, *args, spec.width)
    return vit.vit(spec.arch, *args, spec.image_size, spec.width)


def _build_timm(spec: ModelSpec) -> nn.Module:
    import timm

    name = spec.arch.removeprefix("timm:")
    if not timm.is_model(name):
        raise InputError(f"unknown timm model {name!r}")
    try:
        return timm.create_model(name, pretrained=spec.pretrained, num_classes=spec.num_classes,
                                 in_chans=spec.in_chans, **spec.timm_kwargs)
    except TypeError as err:
        raise InputError(f"timm model {name!r} rejected its arguments: {err}") from None
    except Exception as err:  # hub errors come in many types (offline, 404, SSL)
        if not spec.pretrained:
            raise
        raise InputError(f"cannot fetch pretrained weights for timm:{name} ({type(err).__name__}); "
                         "set pretrained: false or make the Hugging Face hub reachable") from None
