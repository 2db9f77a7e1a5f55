"""Teacher features: every layer streamed one at a time (for scoring), or a few layers for the whole set (cache)."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import DeviceData
from pipeline.layers import LayerChain, layer_view
from pipeline.train import autocast

MAX_DIMS = 262_144  # the reference max-pools CNN maps with more entries than this per sample


def flatten_features(f: torch.Tensor, max_dims: int = MAX_DIMS) -> torch.Tensor:
    """(n, ...) -> (n, D) float32; CNN maps above `max_dims` entries are max-pooled first, as the reference does."""
    if f.dim() == 4 and f[0].numel() > max_dims:
        size = math.ceil(math.sqrt(f[0].numel() / max_dims))
        f = F.max_pool2d(f.float(), size)
    return f.reshape(len(f), -1).float()


@torch.no_grad()
def stream_layers(model: nn.Module, data: DeviceData, ids: torch.Tensor, batch_size: int,
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (layer, features of the samples `ids`) for every generalized layer, in depth order.

    Chain models run once: the activations of one layer are advanced to the next and the previous freed, so peak
    memory is about two layers' activations. timm models run a forward pass per layer. No bf16 autocast: the
    layer scores are measured on float32 features, as the reference's.
    """
    model.eval()
    view = layer_view(model)
    ids = ids.to(data.device)
    chunks = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    if not isinstance(view, LayerChain):
        for k in range(len(view)):
            yield k, torch.cat([view.collect(data.normalise(data.images[c]), [k])[0] for c in chunks])
        return
    acts = [data.normalise(data.images[c]) for c in chunks]
    for k in range(len(view)):
        acts = [view.advance(a, k - 1 if k else None, k) for a in acts]
        yield k, torch.cat(acts)


def features_and_logits(model: nn.Module, x: torch.Tensor, layers: list[int], view=None):
    """Features of `layers` and the logits, in one forward pass (`view`: the model's layer view, if made already)."""
    if not layers:
        return [], model(x)
    return (view or layer_view(model)).features_and_logits(x, layers)


@torch.no_grad()
def extract(model: nn.Module, data: DeviceData, layers: list[int], batch_size: int,
            sink: Callable[[int, list[torch.Tensor], torch.Tensor], None],
            on_batch: Callable[[int], None] | None = None) -> None:
    """Run the model over `data` in order, handing each batch to `sink(start, features of layers, logits)`."""
    model.eval()
    start, view = 0, layer_view(model)
    for ids, x, _ in data.batches(batch_size):
        with autocast(data.device):
            feats, logits = features_and_logits(model, x, layers, view)
        sink(start, feats, logits)
        start += len(ids)
        if on_batch:
            on_batch(len(ids))
