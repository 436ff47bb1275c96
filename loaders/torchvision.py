"""Reference loader: torch DataLoader + torchvision.transforms.v2, the baseline everyone knows.

Every other loader is tested and measured against this one. Per sample, in worker
processes: decode (PIL), resize to the training size, then the spec's augmentations in the
report's order, each as its own v2 transform (one resampling per geometric op, as the
report's code did), ToDtype + Normalize. Batches are pinned and copied to the device with
non_blocking=True, then laid out channels_last in the engine's dtype. Determinism: a
sample's augmentation is a pure function of (seed, epoch, sample index): the worker reseeds
the CPU generator the v2 transforms draw from, per sample, inside `torch.random.fork_rng`
(with workers=0 the training process's RNG stream is untouched), so worker count and start
batch never change a batch (`set_epoch(epoch, start_batch=k)` yields exactly batches k..).
Bad files: a file that fails after ingest is replaced, with a warning naming it, by the
next readable sample of the split (deterministic), so the epoch never dies mid-way.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, Sampler
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from loaders.base import LoaderOptions, batches_per_epoch, epoch_indices, to_model_layout
from loaders.common import read_rgb
from loaders.spec import AugmentSpec

BILINEAR = InterpolationMode.BILINEAR


def reference_transform(spec: AugmentSpec, train: bool) -> v2.Compose:
    """The spec as a torchvision v2 pipeline on a uint8 CHW tensor -> normalised float32.

    Validation (train=False) gets resize + normalise only."""
    s = spec.size
    ops: list = [v2.Resize((s, s), interpolation=BILINEAR, antialias=True)]
    if train:
        if spec.flip:
            ops.append(v2.RandomHorizontalFlip(spec.flip_p))
        if spec.crop:
            ops.append(v2.RandomCrop(s, padding=spec.crop_padding, fill=0))
        if spec.rotate:
            ops.append(v2.RandomRotation(spec.rotate_degrees, interpolation=BILINEAR, fill=0))
        if spec.jitter:
            ops.append(v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue))
        if spec.grayscale:
            ops.append(v2.RandomGrayscale(spec.grayscale_p))
        if spec.translate:
            t = spec.translate_frac
            ops.append(v2.RandomAffine(degrees=0, translate=(t, t), interpolation=BILINEAR, fill=0))
        if spec.perspective:
            ops.append(v2.RandomPerspective(spec.perspective_distortion, p=spec.perspective_p,
                                            interpolation=BILINEAR, fill=0))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(ops)



def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample: splitmix64 of (seed, epoch, index)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 1           # 63 bits: a valid torch seed


class _Files(torch.utils.data.Dataset):
    def __init__(self, split, transform, seed: int = 0):
        self.paths, self.labels, self.transform, self.seed = split.paths, split.labels, transform, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
            img, j = self._read(i)
            return self.transform(img), self.labels[j]

    def _read(self, i: int) -> tuple[torch.Tensor, int]:
        """(image, the index it came from): sample i, or the next readable one."""
        for k in range(min(len(self.paths), 16)):
            j = (i + k) % len(self.paths)
            try:
                img = read_rgb(self.paths[j])
            except Exception as e:  # noqa: BLE001 - any decode failure: use the next sample
                warnings.warn(f"torchvision loader: cannot read {self.paths[j]} ({type(e).__name__}: {e}); "
                              "using the next sample instead", RuntimeWarning, stacklevel=2)
                continue
            return img, j
        raise RuntimeError(f"torchvision loader: 16 consecutive unreadable files from {self.paths[i]}")


class _EpochSampler(Sampler):
    """This rank's (index, epoch) keys for the epoch, from batch `start` on."""

    def __init__(self, n: int, opts: LoaderOptions):
        self.n, self.opts, self.epoch, self.start = n, opts, 0, 0

    def indices(self):
        return epoch_indices(self.n, self.opts, self.epoch)

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.indices()[self.start * self.opts.batch_size:].tolist()])

    def __len__(self):
        return max(0, len(self.indices()) - self.start * self.opts.batch_size)


class TorchvisionLoader:
    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions):
        self.opts = opts
        self.sampler = _EpochSampler(len(split), opts)
        self.dataset = _Files(split, reference_transform(spec, opts.train), opts.seed)
        # The DataLoader's own base seed (augmentations do not depend on it: _Files reseeds
        # per sample).
        self._generator = torch.Generator()
        self.set_epoch(0)
        workers = opts.workers
        self.loader = DataLoader(
            self.dataset, batch_size=opts.batch_size, sampler=self.sampler,
            num_workers=workers, pin_memory=opts.device.type == "cuda",
            persistent_workers=workers > 0, drop_last=opts.drop,
            prefetch_factor=4 if workers > 0 else None, generator=self._generator)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Epoch `epoch`'s batches, from batch `start_batch` on (resume mid-epoch)."""
        self.sampler.epoch, self.sampler.start = epoch, start_batch
        self._generator.manual_seed(self.opts.seed * 1_000_003 + self.opts.rank * 10_007 + epoch)

    def sample_indices(self, epoch: int):
        """This rank's sample indices for `epoch`, in delivery order."""
        return epoch_indices(len(self.dataset), self.opts, epoch)

    def __len__(self) -> int:
        """Batches in a whole epoch (also after set_epoch(n, start_batch=k))."""
        return batches_per_epoch(len(self.sampler.indices()), self.opts)

    def __iter__(self):
        dev, dtype = self.opts.device, self.opts.dtype
        for x, y in self.loader:
            yield (to_model_layout(x.to(dev, non_blocking=True), dtype),
                   y.to(dev, non_blocking=True))
