"""torchrun support: the process group from the environment; each rank trains on its slice of the global batch.

Launch any training stage as `torchrun --nproc-per-node N -m stages.cli teacher ...` (multi-node through
torchrun's rendezvous options). `batch_size` stays the GLOBAL batch and `lr` applies to it unchanged, so N
processes follow the same optimisation as one process with that batch, up to BatchNorm: its statistics are per
process unless `train.sync_batchnorm` is on, and the terms computed across a batch (`sp`, `relation_weight`)
compare the samples of each process's share of it. Rank 0 alone logs and writes outputs.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.errors import InputError


def init_from_env() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def sync_batchnorm_in_place(model: torch.nn.Module) -> None:
    """BatchNorm layers replaced by SyncBatchNorm, also in the layer chains that run a Distiller's student."""
    from pipeline.layers import LayerChain

    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the children of model's modules
    for module in model.modules():
        if isinstance(getattr(module, "view", None), LayerChain):  # its list still holds the old layers
            module.view = LayerChain(module.view.model)


def wrap(model: torch.nn.Module, sync_batchnorm: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around `model` when running under torchrun, else `model` itself.

    With `sync_batchnorm`, `model`'s BatchNorm layers are replaced in place by SyncBatchNorm (GPUs only in torch).
    """
    if rank_and_world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = next(model.parameters()).is_cuda
    if sync_batchnorm:
        if not on_gpu:
            raise InputError("train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
        sync_batchnorm_in_place(model)
    return DistributedDataParallel(model, device_ids=[local_rank()] if on_gpu else None)
