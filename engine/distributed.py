"""torch.distributed for the engine: process group, collectives it uses, SyncBatchNorm.

Under torchrun (WORLD_SIZE > 1) the default process group is initialised from the
environment: NCCL on CUDA, gloo on CPU. The engine's collectives are few and per epoch
(metric sums, BatchNorm buffers, rank 0's decisions), never per step, except what DDP and
`--sync-bn` do themselves. `--sync-bn` uses torch's SyncBatchNorm, whose forward synchronises
the host once per BatchNorm layer per step (it indexes with a boolean mask): it is CUDA only
and costs that sync; without it BatchNorm statistics are per rank, as in the report.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from loaders.base import dist_rank_world

_OWN_PROCESS_GROUP = False


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world); initialises the default process group under torchrun."""
    global _OWN_PROCESS_GROUP
    if launched_world() > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _OWN_PROCESS_GROUP = True
    return dist_rank_world()


def shutdown() -> None:
    """Destroy the process group if this module created it."""
    global _OWN_PROCESS_GROUP
    if _OWN_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_PROCESS_GROUP = False


def from_rank0(obj, world: int):
    """rank 0's `obj` on every rank (a decision one rank must make for all)."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: int) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sync_buffers(model: nn.Module) -> None:
    """rank 0's buffers (BatchNorm statistics) on every rank: each rank's last forward
    updated its own, DDP would broadcast rank 0's at the next forward; doing it at the epoch
    end makes every rank evaluate and save the same model."""
    for buf in model.buffers():
        dist.broadcast(buf, 0)


class _SyncBNSiLU(nn.SyncBatchNorm):
    """SyncBatchNorm followed by SiLU: what a BNSiLU module becomes under --sync-bn (same
    parameter and buffer names, so checkpoints load either way)."""

    def forward(self, x):
        return F.silu(super().forward(x))


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm that keeps the fused BN+SiLU modules' SiLU."""
    if isinstance(module, kernels.BatchNormSiLU2d):
        new = _SyncBNSiLU(module.num_features, module.eps, module.momentum, module.affine,
                          module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(module.parameters()).device)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
