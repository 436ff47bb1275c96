"""The Loader protocol every loader implements, epoch sharding, and the loader registry.

Protocol: iterating yields `(images, labels)` on the target device; images float NCHW in
channels_last memory, normalised with the spec's mean/std, in the engine's dtype; labels
int64. `len()` is batches per epoch (per rank). `set_epoch(n)` selects epoch n's order.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from loaders.common import ConfigError

# name -> "module:Class"; imported lazily so a machine without DALI/FFCV still works.
LOADERS = {
    "torchvision": "loaders.torchvision:TorchvisionLoader",
    "dali": "loaders.dali:DaliLoader",
    "ffcv": "loaders.ffcv:FfcvLoader",
    "resident": "loaders.resident:ResidentLoader",
    "auto": "loaders.auto:AutoLoader",       # picks one of the above for this machine and data
}


@runtime_checkable
class Loader(Protocol):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


@dataclass(frozen=True)
class LoaderOptions:
    """What the engine asks of a loader; every loader takes `(split, spec, options)`."""
    train: bool
    batch_size: int
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 2
    drop_last: bool | None = None     # None: drop the ragged last batch when training

    @property
    def drop(self) -> bool:
        return self.train if self.drop_last is None else self.drop_last


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else from torchrun's env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def epoch_indices(n: int, opts: LoaderOptions, epoch: int) -> np.ndarray:
    """This rank's sample indices for `epoch`.

    Training: a permutation drawn from (seed, epoch), identical on every rank, truncated to
    a multiple of world_size and dealt round-robin, so ranks never share a sample and each
    rank gets the same count. Evaluation: the natural order, dealt the same way but without
    truncation (ranks may differ by one sample)."""
    if opts.train:
        order = np.random.default_rng([opts.seed, epoch]).permutation(n)
        order = order[: n - n % opts.world_size]
    else:
        order = np.arange(n)
    return order[opts.rank::opts.world_size]


def batches_per_epoch(n_rank: int, opts: LoaderOptions) -> int:
    return n_rank // opts.batch_size if opts.drop else -(-n_rank // opts.batch_size)


def loader_class(name: str):
    if name not in LOADERS:
        raise ConfigError(f"unknown loader {name!r}; use one of: {', '.join(LOADERS)}")
    module, cls = LOADERS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ConfigError(f"loader {name!r} is not available here ({e}); "
                          "run `make install` or pick another --loader") from None


def available_loaders() -> list[str]:
    out = []
    for name in LOADERS:
        if name == "auto":
            continue
        try:
            loader_class(name)
            out.append(name)
        except ConfigError:
            pass
    return out


def build_loader(name: str, split, spec, opts: LoaderOptions) -> Loader:
    return loader_class(name)(split, spec, opts)


def to_model_layout(x_nhwc_or_nchw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NCHW view in channels_last memory, in `dtype`. An NHWC tensor is permuted (no copy)."""
    x = x_nhwc_or_nchw
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.to(dtype=dtype, memory_format=torch.channels_last)
