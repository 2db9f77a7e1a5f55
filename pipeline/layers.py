"""Generalized layers (METHOD.md §4): a model as a chain cut after every non-linearity, blocks counted whole.

`layer_view(model)` gives one interface for both kinds of model:
- the paper's models (flat `nn.Sequential` chains): layer k = output of the k-th ReLU / ReLU6 / LeakyReLU /
  Flatten / residual, inverted-residual or transformer block;
- timm models: layer k = the k-th entry of timm's `feature_info` (its intermediate-feature API).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import InputError

_GEN_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Flatten)


def is_gen_layer(module: nn.Module) -> bool:
    return isinstance(module, _GEN_TYPES) or getattr(module, "is_gen_layer", False)


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """A model's classifier: timm's `get_classifier()`, else its chain from the first Linear on."""
    if hasattr(model, "get_classifier"):
        return [model.get_classifier()]
    chain = linearize(model)
    first = next((i for i, m in enumerate(chain) if isinstance(m, nn.Linear)), len(chain))
    return chain[first:]


def linearize(module: nn.Module) -> list[nn.Module]:
    """Flatten containers and custom modules (that are not generalized layers) into execution order."""
    out = []
    for child in module.children():
        is_container = isinstance(child, (nn.Sequential, nn.ModuleList))
        is_custom = not type(child).__module__.startswith("torch.")
        if (is_container or is_custom) and not is_gen_layer(child) and any(True for _ in child.children()):
            out += linearize(child)
        else:
            out.append(child)
    return out


class LayerChain:
    """Run a flat chain model up to a layer, collect several layers in one pass, or run the rest of it."""

    def __init__(self, model: nn.Sequential):
        self.model = model
        self.modules = linearize(model)
        self.ends = [i for i, m in enumerate(self.modules) if is_gen_layer(m)]

    def __len__(self) -> int:
        return len(self.ends)

    def index(self, k: int) -> int:
        n = len(self)
        if not -n <= k < n:
            raise InputError(f"layer {k} out of range: the model has {n} generalized layers (0..{n - 1})")
        return k % n

    def collect(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Outputs of `layers` (any order, duplicates allowed), stopping after the deepest one."""
        wanted = [self.index(k) for k in layers]
        stop = self.ends[max(wanted)]
        positions = {self.ends[k]: k for k in wanted}
        found = {}
        for i, module in enumerate(self.modules[:stop + 1]):
            x = module(x)
            if i in positions:
                found[positions[i]] = x
        return [found[k] for k in wanted]

    def advance(self, x: torch.Tensor, after: int | None, to: int) -> torch.Tensor:
        """Output of layer `to` given the output of layer `after` (None: given the model input)."""
        start = 0 if after is None else self.ends[self.index(after)] + 1
        for module in self.modules[start:self.ends[self.index(to)] + 1]:
            x = module(x)
        return x

    def head(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """The rest of the model applied to the output of layer k."""
        for module in self.modules[self.ends[self.index(k)] + 1:]:
            z = module(z)
        return z

    def features_and_logits(self, x: torch.Tensor, layers: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Outputs of `layers` and the logits, from one forward pass."""
        feats = self.collect(x, layers)
        deepest = max(range(len(layers)), key=lambda i: self.index(layers[i]))
        return feats, self.head(feats[deepest], layers[deepest])


class TimmChain:
    """timm models through `forward_intermediates`; layer k is `feature_info[k]`."""

    def __init__(self, model: nn.Module):
        if not hasattr(model, "forward_intermediates"):
            raise InputError(f"timm model {type(model).__name__} has no forward_intermediates (feature API)")
        self.model = model
        self.info = list(model.feature_info)

    def __len__(self) -> int:
        return len(self.info)

    def index(self, k: int) -> int:
        n = len(self)
        if not -n <= k < n:
            raise InputError(f"layer {k} out of range: the model has {n} feature layers (0..{n - 1})")
        return k % n

    def collect(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        wanted, unique = self._indices(layers)
        feats = self.model.forward_intermediates(x, indices=unique, intermediates_only=True)
        return [dict(zip(unique, feats))[k] for k in wanted]

    def features_and_logits(self, x: torch.Tensor, layers: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Outputs of `layers` and the logits, from one forward pass (timm's final features through its head)."""
        wanted, unique = self._indices(layers)
        final, feats = self.model.forward_intermediates(x, indices=unique)
        return [dict(zip(unique, feats))[k] for k in wanted], self.model.forward_head(final)

    def _indices(self, layers: list[int]) -> tuple[list[int], list[int]]:
        """The layers asked for, as indices in their order, and each once in depth order (timm's `indices`)."""
        wanted = [self.index(k) for k in layers]
        return wanted, sorted(set(wanted))


def layer_view(model: nn.Module) -> LayerChain | TimmChain:
    return LayerChain(model) if isinstance(model, nn.Sequential) else TimmChain(model)


@torch.no_grad()
def layer_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[int, ...]]:
    """Per-sample output shape of every generalized layer for a (C, H, W) input, in eval mode."""
    view = layer_view(model)
    was_training = model.training
    model.eval()
    try:
        feats = view.collect(torch.zeros(1, *input_shape), list(range(len(view))))
    finally:
        model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]
