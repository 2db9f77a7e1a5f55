"""Score every generalized layer of a trained teacher on the training split, one layer in memory at a time."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.data import DeviceData, Prepared
from pipeline.errors import InputError
from pipeline.features import flatten_features, stream_layers
from pipeline.prepare import balanced_subset
from pipeline.quality import layer_quality


def scoring_subsets(labels: np.ndarray, a_total: int, b_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced index sets: A with a_total // C per class, B with min(b_per_class, smallest class) per class."""
    counts = np.bincount(labels)
    a = balanced_subset(labels, min(a_total, len(labels)), seed)
    b = balanced_subset(labels, min(b_per_class, int(counts[counts > 0].min())) * int((counts > 0).sum()), seed + 1)
    return a, b


def score_layers(model: nn.Module, data: Prepared, device: torch.device, mode: str, a_total: int,
                 b_per_class: int, seed: int, batch_size: int, dtype: torch.dtype,
                 on_layer: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per generalized layer: S, I, E, Q, sqrt(I·E), feature shape and subset sizes."""
    a, b = scoring_subsets(data.train_labels, a_total, b_per_class, seed)
    if min(np.bincount(data.train_labels[a])) < 2:
        raise InputError("subset A needs at least 2 samples per class: raise score.subset_a")
    union = np.union1d(a, b)
    pos_a, pos_b = np.searchsorted(union, a), np.searchsorted(union, b)
    train = DeviceData(data.train_images, data.train_labels, data.meta["mean"], data.meta["std"], device)
    labels = train.labels[torch.from_numpy(union).to(device)]
    pos_a, pos_b = torch.from_numpy(pos_a).to(device), torch.from_numpy(pos_b).to(device)
    rows = []
    for k, feats in stream_layers(model, train, torch.from_numpy(union), batch_size):
        shape = list(feats.shape[1:])
        flat = flatten_features(feats)
        del feats
        quality = layer_quality(flat[pos_a], labels[pos_a], flat[pos_b], labels[pos_b],
                                n_train=len(data.train_labels), mode=mode, dtype=dtype)
        row = {"layer": k, "shape": shape, "dims": flat.shape[1], "n_a": len(a), "n_b": len(b),
               **quality.to_dict()}
        del flat
        rows.append(row)
        if on_layer:
            on_layer(row)
    return rows
