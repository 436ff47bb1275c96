"""Reference loader: torch DataLoader + torchvision.transforms.v2, the baseline everyone knows.

Every other loader is tested and measured against this one. Per sample, in worker
processes: decode (PIL), resize to the training size, then the spec's
augmentations in the report's order, each as its own v2 transform (one resampling per
geometric op, as the report's code did), ToDtype + Normalize. Batches are pinned and copied
to the device with non_blocking=True, then laid out channels_last in the engine's dtype.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from loaders.base import LoaderOptions, batches_per_epoch, epoch_indices, to_model_layout
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


def read_rgb(path: str) -> torch.Tensor:
    """uint8 CHW RGB tensor of an image file (PIL decode, as torchvision's ImageFolder does;
    torchvision.io's decoders are deprecated from 0.29)."""
    with Image.open(path) as im:
        return v2.functional.pil_to_tensor(im.convert("RGB"))


class _Files(torch.utils.data.Dataset):
    def __init__(self, split, transform):
        self.paths, self.labels, self.transform = split.paths, split.labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(read_rgb(self.paths[i])), self.labels[i]


class _EpochSampler(Sampler):
    def __init__(self, n: int, opts: LoaderOptions):
        self.n, self.opts, self.epoch = n, opts, 0

    def __iter__(self):
        return iter(epoch_indices(self.n, self.opts, self.epoch).tolist())

    def __len__(self):
        return len(epoch_indices(self.n, self.opts, self.epoch))


class TorchvisionLoader:
    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions):
        self.opts = opts
        self.sampler = _EpochSampler(len(split), opts)
        self.dataset = _Files(split, reference_transform(spec, opts.train))
        # Seeds each worker's torch RNG (which v2 transforms draw from) from (seed, epoch).
        self._generator = torch.Generator()
        self.set_epoch(0)
        workers = opts.workers
        self.loader = DataLoader(
            self.dataset, batch_size=opts.batch_size, sampler=self.sampler,
            num_workers=workers, pin_memory=opts.device.type == "cuda",
            persistent_workers=workers > 0, drop_last=opts.drop,
            prefetch_factor=4 if workers > 0 else None, generator=self._generator)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch
        self._generator.manual_seed(self.opts.seed * 1_000_003 + self.opts.rank * 10_007 + epoch)

    def __len__(self) -> int:
        return batches_per_epoch(len(self.sampler), self.opts)

    def __iter__(self):
        dev, dtype = self.opts.device, self.opts.dtype
        for x, y in self.loader:
            yield (to_model_layout(x.to(dev, non_blocking=True), dtype),
                   y.to(dev, non_blocking=True))
