"""A student batch's teacher targets (features of the distilled layers, logits): none, the teacher run online, or
rows of teacher features made once (the cache stage's files, or one pass on the device at start)."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.config import StudentParams
from pipeline.data import Prepared
from pipeline.distill import METHODS
from pipeline.errors import InputError
from pipeline.features import features_and_logits
from pipeline.layers import layer_view
from pipeline.train import autocast, prepare_model


def needs_teacher(method: str) -> bool:
    return bool(METHODS[method].kl or METHODS[method].features)


def target_source(params: StudentParams) -> str:
    """Where the student's teacher targets come from: none (plain cross-entropy), online (the teacher runs on each
    augmented batch), device (made once at start, kept on the device) or cache (the cache stage's files)."""
    if not needs_teacher(params.method):
        return "none"
    return "online" if params.train.augment else params.teacher_features


def no_targets(ids: torch.Tensor, x: torch.Tensor) -> tuple[None, None]:
    return None, None


class OnlineTargets:
    """The teacher run on each batch the student sees (augmented images have no cached features)."""

    def __init__(self, teacher: nn.Module, layers: list[int]):
        self.teacher, self.layers, self.view = teacher, layers, layer_view(teacher)  # the view once, not per batch

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        self.teacher.eval()
        with autocast(x.device):
            feats, logits = features_and_logits(self.teacher, x, self.layers, self.view)
        return [f.float() for f in feats], logits.float()


class CachedTargets:
    """Rows of teacher features and logits by sample id: gathered on the device when they fit in `memory_share` of
    its free memory, else read from the memory-mapped files per batch; standardised per channel when given the
    cache's `channel_stats` (`align: standardize`)."""

    def __init__(self, layers: list[int], feats: list, logits, device: torch.device,
                 channel_stats: dict | None = None, memory_share: float = 0.5):
        self.device = device
        if all(isinstance(a, torch.Tensor) and a.device == device for a in [*feats, logits]):
            self.resident, self.feats, self.logits = True, feats, logits  # made on the device already
        else:
            feats, logits = [_numpy(a) for a in feats], _numpy(logits)
            self.resident = _fits([*feats, logits], device, memory_share)
            if self.resident:  # the whole cache on the device: a batch is one gather there
                self.feats = [torch.from_numpy(np.array(a)).to(device) for a in feats]
                self.logits = torch.from_numpy(np.array(logits)).to(device)
            else:
                self.feats, self.logits = feats, logits
        self.stats = None
        if channel_stats is not None:
            self.stats = [(torch.tensor(channel_stats[str(k)]["mean"], device=device),
                           torch.tensor(channel_stats[str(k)]["std"], device=device).clamp_min(1e-6))
                          for k in layers]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.resident:
            feats, logits = [f[ids] for f in self.feats], self.logits[ids]
        else:
            rows = ids.cpu().numpy()
            feats = [torch.from_numpy(f[rows]).to(self.device, non_blocking=True) for f in self.feats]
            logits = torch.from_numpy(self.logits[rows]).to(self.device)
        if self.stats is not None:
            feats = [_standardize(f.float(), mean, std) for f, (mean, std) in zip(feats, self.stats)]
        # float32 before the (possibly compiled) student step: with the cache's float16 rows as graph inputs,
        # inductor computed NaN for SemCKD's loss (CPU, torch 2.14), casting inside the graph or not
        return [f.float() for f in feats], logits.float()


def make_targets(params: StudentParams, teacher: nn.Module, layers: list[int], data: Prepared, cache: tuple | None,
                 device: torch.device) -> Callable:
    """The student's targets, from where `target_source` says: `cache` is `load_cache`'s (features of `layers`, in
    that order, logits, manifest) where that is the cache stage's files."""
    source = target_source(params)
    standardize = params.align == "standardize" and source != "none"  # `ce` has no targets to align
    if standardize and source == "online":
        raise InputError("align: standardize needs the cache's channel statistics (turn augmentation off)")
    if source == "none":
        return no_targets
    if source == "online":
        return OnlineTargets(prepare_model(teacher, device), layers)
    if source == "device":
        cache = device_cache(teacher, data, layers, device, params.train.eval_batch_size, channel_stats=standardize)
    feats, logits, manifest = cache
    return CachedTargets(layers, feats, logits, device, manifest["channel_stats"] if standardize else None)


def device_cache(teacher: nn.Module, data: Prepared, layers: list[int], device: torch.device, batch_size: int,
                 channel_stats: bool) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """What `load_cache` returns, made by one pass of the teacher over the training split, kept on `device`."""
    from pipeline.cache import gather_features

    buffers, _, stats = gather_features(prepare_model(teacher, device), data, layers, device, batch_size,
                                        channel_stats=channel_stats)
    return [buffers[k] for k in sorted(layers)], buffers["logits"], {"channel_stats": stats}


def _numpy(a) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else a


def _fits(arrays: list[np.ndarray], device: torch.device, share: float) -> bool:
    """Whether the arrays take at most `share` of the device's free memory (of the host's RAM on a CPU)."""
    need = sum(a.nbytes for a in arrays)
    if device.type == "cuda":
        return need <= share * torch.cuda.mem_get_info(device)[0]
    return need <= share * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _standardize(f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    if f.dim() == 3:  # tokens: channels are the last dim
        return (f - mean) / std
    shape = (1, -1) + (1,) * (f.dim() - 2)
    return (f - mean.view(shape)) / std.view(shape)
