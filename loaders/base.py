"""The Loader protocol every loader implements, epoch sharding, and the loader registry.

Protocol: iterating yields `(images, labels)` on the target device; images float NCHW in
channels_last memory, normalised with the spec's mean/std, in the engine's dtype; labels
int64. `len()` is batches per epoch (per rank). `set_epoch(n)` selects epoch n's order.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
from abc import abstractmethod
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
    shuffle_buffer: int = 1000        # webdataset shards: samples in the shuffle buffer

    @property
    def drop(self) -> bool:
        return self.train if self.drop_last is None else self.drop_last


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else from torchrun's env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=64)
def _key64(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def derive_seed(seed: int, *keys: int | str) -> int:
    """The seed of one random stream: splitmix64 chained over (seed, *keys), 63 bits (a
    valid torch and numpy seed). Keys are ints (epoch, rank, batch, sample index) or short
    stream names ("sample", "augment", ...); every loader derives every seed it uses here,
    so a stream is a pure function of its keys."""
    z = _splitmix64(seed & _M64)
    for k in keys:
        z = _splitmix64(z ^ (_key64(k) if isinstance(k, str) else k & _M64))
    return z >> 1


def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """The augmentation seed of batch `batch` of `epoch` on `rank`, for the loaders that draw
    a batch's parameters at once (resident, FFCV, DALI)."""
    return derive_seed(seed, "augment", rank, epoch, batch)


def epoch_indices(n: int, opts: LoaderOptions, epoch: int) -> np.ndarray:
    """This rank's sample indices for `epoch`: THE sharding rule, used by every loader.

    Training: a permutation drawn from (seed, epoch), identical on every rank, truncated to
    a multiple of world_size and dealt round-robin (rank r gets positions r, r + world,
    ...), so ranks never share a sample and each rank gets the same count. Evaluation: the
    natural order, dealt the same way but without truncation (ranks may differ by one
    sample)."""
    if opts.train:
        order = np.random.default_rng(derive_seed(opts.seed, "order", epoch)).permutation(n)
        order = order[: n - n % opts.world_size]
    else:
        order = np.arange(n)
    return order[opts.rank::opts.world_size]


def rank_count(n: int, opts: LoaderOptions) -> int:
    """len(epoch_indices(n, opts, e)) for every epoch e, without drawing the permutation."""
    return n // opts.world_size if opts.train else len(range(opts.rank, n, opts.world_size))


def batches_per_epoch(n_rank: int, opts: LoaderOptions) -> int:
    return n_rank // opts.batch_size if opts.drop else -(-n_rank // opts.batch_size)


@runtime_checkable
class Loader(Protocol):
    """The loader contract. Every loader (and `AutoLoader`, by delegation) provides:

    - `opts`: the `LoaderOptions` it was built with.
    - `__iter__()`: one epoch's batches, `(images, labels)` on `opts.device`; images float
      NCHW in channels_last memory, normalised with the spec's mean/std, in `opts.dtype`;
      labels int64 of shape (N,). Every batch holds `opts.batch_size` samples except a
      ragged last one when `opts.drop` is False. Iterating again without `set_epoch`
      repeats the same epoch (from batch 0); an iteration left early leaves nothing behind.
    - `__len__()`: batches per epoch for this rank, `batches_per_epoch(rank_count(n), opts)`;
      O(1) (cached; the engine calls it every step), unchanged by `set_epoch`. Every rank
      yields exactly this many batches every epoch, also when a file turns out unreadable
      mid-run (DDP needs ranks in step).
    - `set_epoch(epoch, start_batch=0)`: the next iteration yields exactly batches
      start_batch.. (0-based, 0 <= start_batch <= len) of epoch `epoch`: the same tensors
      an uninterrupted pass of that epoch yields there (resume); later iterations start at
      batch 0 again. O(1).
    - `sample_indices(epoch)`: this rank's sample indices (into the split) of that epoch
      in delivery order, exactly what the epoch's batches hold: `epoch_indices(n, opts,
      epoch)`, without the ragged tail that `opts.drop` drops (FFCV: over the images
      readable at write time; its quasi_random order is its own).

    Unreadable files: a file found unreadable mid-run (changed since the ingest) is
    replaced by the next readable sample of the split (cyclically), with a warning naming
    it (torchvision, DALI; DALI's `sample_indices` shows the replacements, the torchvision
    loader's worker processes cannot report them). The resident and FFCV loaders read
    every file when built: the resident loader stops there, FFCV leaves the file out.

    Randomness: a batch is a pure function of (seed, epoch, its position, rank), every
    stream seeded through `derive_seed`.

    Webdataset shards (`loaders.shards`): the streaming loaders (torchvision, DALI) deal
    shards, not samples: `shards.rank_shards` and `rank_quota` replace `epoch_indices` and
    `rank_count`, and `sample_indices` are global sample ids in delivery order."""

    opts: LoaderOptions

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    @abstractmethod
    def sample_indices(self, epoch: int) -> np.ndarray: ...


class EpochLoader(Loader):
    """The epoch bookkeeping the loaders share: a cached `len()`, `set_epoch` (a one-shot
    start batch) and `sample_indices` by the sharding rule. A subclass calls
    `_init_epochs(n, opts)` and starts its `__iter__` with `epoch, first = self._begin()`."""

    # The backend's own loader over webdataset shards (a class taking (ShardSplit, spec,
    # opts)), or None: loaders/shards.py then unpacks the shards once into files.
    shard_loader = None

    def _init_epochs(self, n: int, opts: LoaderOptions) -> None:
        self.opts, self.n_samples = opts, n
        self._len = batches_per_epoch(rank_count(n, opts), opts)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self._len:
            raise ValueError(f"start_batch {start_batch} outside 0..{self._len} (batches per epoch)")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def sample_indices(self, epoch: int) -> np.ndarray:
        return epoch_indices(self.n_samples, self.opts, epoch)[: self._len * self.opts.batch_size]

    def _begin(self) -> tuple[int, int]:
        """(epoch, first batch) of the iteration starting now; the start batch is used once."""
        first, self.start_batch = self.start_batch, 0
        return self.epoch, first


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
    if hasattr(split, "shards"):              # webdataset shards: loaders/shards.py builds the variant
        from loaders.shards import build_shard_loader
        return build_shard_loader(name, split, spec, opts)
    return loader_class(name)(split, spec, opts)


def to_model_layout(x_nhwc_or_nchw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NCHW view in channels_last memory, in `dtype`. An NHWC tensor is permuted (no copy)."""
    x = x_nhwc_or_nchw
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.to(dtype=dtype, memory_format=torch.channels_last)
