"""Device-resident loader (`--loader resident`): the whole decoded split lives on the device.

The split is decoded once (`datasets.decoded`, cached as .npy) and held as ONE uint8
(N,H,W,3) tensor on the target device at its native size when every image shares one size
no larger than the training size (CIFAR-10: 150 MB at 32x32 instead of 2.4 GB at 128x128;
the upscale happens inside the augmentation warp), otherwise decoded at the training size
(`common.storage_view`: stretched, the "rrc" boxes cut from it; or the "center" eval view).
Each batch is an `index_select` of this epoch's indices followed by `loaders.augment` on the
whole batch: no worker processes, no per-sample Python, nothing copied from the host per
batch. Order: `base.epoch_indices`, copied to the device once per epoch. Augmentation
randomness: a device generator reseeded from (seed, rank, epoch, batch) before each batch,
so `set_epoch(epoch, start_batch=k)` yields exactly batches k.. . Capacity: the bytes needed
on the device (images + labels + one batch's working set) are checked first; too few
available is a one-line ConfigError naming both numbers (probe injectable: `free_bytes=`).
Measurements: docs/loaders.md.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from loaders.augment import augment
from loaders.base import EpochLoader, LoaderOptions, batch_seed
from loaders.datasets import decoded
from loaders.common import ConfigError, device_free_bytes, storage_size, storage_view, needed_bytes
from loaders.spec import AugmentSpec

def _fmt(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:.2f} GiB)"


class ResidentLoader(EpochLoader):
    """The `base.Loader` contract over one device tensor holding the whole decoded split;
    batch b of an epoch is augmented with a generator seeded by `base.batch_seed`."""

    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions, *, free_bytes=None,
                 emulate_clipping: bool = False):
        self.spec, self.emulate_clipping = spec, emulate_clipping
        self._init_epochs(len(split), opts)
        dev = torch.device(opts.device)
        need = needed_bytes(split, spec, opts)
        have = int((free_bytes or device_free_bytes)(dev))
        if need > have:
            h, w = storage_size(split, spec.size)
            raise ConfigError(
                f"resident loader: the {split.name} split does not fit on {dev}: it needs "
                f"{_fmt(need)} ({len(split)} images {h}x{w}x3 uint8 + labels + one batch of "
                f"augmentation workspace) but only {_fmt(have)} are available; use "
                "--loader torchvision (or dali/ffcv), a smaller dataset or a smaller --batch-size")
        _, view = storage_view(split, spec, opts.train)
        arr = decoded(split) if view == "native" else decoded(split, spec.size, view, spec)
        if view == "center":                  # stored as the eval view: nothing left to crop
            self.spec = replace(spec, eval_resize="stretch")
        self.images = torch.from_numpy(np.array(arr)).to(dev)        # (N,H,W,3) uint8
        # "rrc" boxes are drawn on the original sizes, whatever size the pixels are kept at.
        self.src_hw = torch.from_numpy(np.asarray(split.sizes, dtype=np.float64)).to(dev) \
            if opts.train and spec.resize == "rrc" else None
        self.labels = torch.tensor(split.labels, dtype=torch.int64, device=dev)
        self.generator = torch.Generator(device=dev)

    def __iter__(self):
        epoch, first = self._begin()
        o, B = self.opts, self.opts.batch_size
        # The epoch's order, drawn on the host, copied to the device once per epoch.
        order = torch.from_numpy(np.ascontiguousarray(self.sample_indices(epoch), dtype=np.int64))
        order = order.to(self.images.device)
        for b in range(first, len(self)):
            self.generator.manual_seed(batch_seed(o.seed, o.rank, epoch, b))
            idx = order[b * B:(b + 1) * B]
            x = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            hw = None if self.src_hw is None else self.src_hw.index_select(0, idx)
            yield (augment(x, self.spec, self.generator, o.dtype, train=o.train,
                           emulate_clipping=self.emulate_clipping, src_hw=hw), y)
