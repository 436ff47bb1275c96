"""Reference loader: torch DataLoader + torchvision.transforms.v2, the baseline everyone knows.

Every other loader is tested and measured against this one. Per sample, in worker
processes: decode (PIL), resize to the training size (or the spec's resize policy), then
the spec's augmentations in the report's order, each as its own v2 transform (one
resampling per geometric op, as the report's code did), ToDtype + Normalize. Batches are
pinned and copied to the device with non_blocking=True, then laid out channels_last in the
engine's dtype. Determinism: a
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
from torchvision.transforms import InterpolationMode, v2

from loaders.base import EpochLoader, LoaderOptions, derive_seed, to_model_layout
from loaders.common import die_with_parent, read_rgb
from loaders.spec import AugmentSpec

BILINEAR = InterpolationMode.BILINEAR


def _spec_ops(spec: AugmentSpec, train: bool) -> list:
    """The spec's resize and augmentations as v2 transforms, in the report's order, one
    resampling per geometric op, after the resize policy (Resize, RandomResizedCrop for
    "rrc" training, Resize(short side) + CenterCrop for "center" evaluation). v2 transforms
    take a PIL image or a uint8 tensor alike."""
    s = spec.size
    if train and spec.resize == "rrc":
        ops: list = [v2.RandomResizedCrop(s, scale=spec.rrc_scale, ratio=spec.rrc_ratio,
                                          interpolation=BILINEAR, antialias=True)]
    elif not train and spec.eval_resize == "center":
        ops = [v2.Resize(spec.eval_size, interpolation=BILINEAR, antialias=True), v2.CenterCrop(s)]
    else:
        ops = [v2.Resize((s, s), interpolation=BILINEAR, antialias=True)]
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
    return ops


def _normalise(spec: AugmentSpec) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]


def reference_transform(spec: AugmentSpec, train: bool) -> v2.Compose:
    """THE REFERENCE for the semantic tests: the spec as a torchvision v2 pipeline on a uint8
    CHW tensor (`common.read_rgb`) -> normalised float32. Not what the loader runs by default
    (see `pil_transform`). Validation (train=False) gets resize + normalise only."""
    return v2.Compose(_spec_ops(spec, train) + _normalise(spec))


def pil_transform(spec: AugmentSpec, train: bool) -> v2.Compose:
    """WHAT THE LOADER RUNS (pipeline="pil", the default): the same v2 transforms in the same
    order on the decoded PIL image (PIL's C resampling and colour ops, as the report's code
    and most users write it), then PILToTensor + ToDtype + Normalize. On 128x128 JPEG sources
    it is several times faster than the tensor pipeline (docs/benchmarks.md); its pixels
    differ from `reference_transform` by PIL's integer resampling (tests/test_loader_contract.py
    states the measured tolerance)."""
    return v2.Compose(_spec_ops(spec, train) + [v2.PILToTensor()] + _normalise(spec))


def _read_pil(path: str):
    """The decoded RGB PIL image of a file (what torchvision's ImageFolder hands its transform)."""
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")



class _Files(torch.utils.data.Dataset):
    def __init__(self, split, transform, seed: int = 0, read=read_rgb):
        self.paths, self.labels, self.transform, self.seed = split.paths, split.labels, transform, seed
        self.read = read

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, "sample", epoch, i))
            img, j = self._read(i)
            return self.transform(img), self.labels[j]

    def _read(self, i: int):
        """(image, the index it came from): sample i, or the next readable one."""
        for k in range(min(len(self.paths), 16)):
            j = (i + k) % len(self.paths)
            try:
                img = self.read(self.paths[j])
            except Exception as e:  # noqa: BLE001 - any decode failure: use the next sample
                warnings.warn(f"torchvision loader: cannot read {self.paths[j]} ({type(e).__name__}: {e}); "
                              "using the next sample instead", RuntimeWarning, stacklevel=2)
                continue
            return img, j
        raise RuntimeError(f"torchvision loader: 16 consecutive unreadable files from {self.paths[i]}")


class _Keys(Sampler):
    """The (index, epoch) keys of the pass being delivered (set by the loader per pass)."""

    def __init__(self):
        self.keys: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def _worker_init(worker_id: int) -> None:
    die_with_parent()                    # a SIGKILLed run leaves no DataLoader worker behind


class TorchvisionLoader(EpochLoader):
    """The `base.Loader` contract over a torch DataLoader; each sample's augmentation is
    seeded by `derive_seed(seed, "sample", epoch, index)` in the worker that decodes it.

    `pipeline`: "pil" (default, the baseline every benchmark ratio divides by: PIL images
    through `pil_transform`) or "tensor" (uint8 tensors through `reference_transform`, the
    semantic reference; kept to measure against, `benchmarks/throughput.py` row
    torchvision-tensor)."""

    PIPELINES = {"pil": (pil_transform, _read_pil), "tensor": (reference_transform, read_rgb)}

    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions, pipeline: str = "pil"):
        self._init_epochs(len(split), opts)
        self.sampler = _Keys()
        transform, read = self.PIPELINES[pipeline]
        self.pipeline = pipeline
        self.dataset = _Files(split, transform(spec, opts.train), opts.seed, read)
        # The DataLoader's own base seed (augmentations do not depend on it: _Files reseeds
        # per sample).
        self._generator = torch.Generator()
        workers = opts.workers
        self.loader = DataLoader(
            self.dataset, batch_size=opts.batch_size, sampler=self.sampler,
            num_workers=workers, pin_memory=opts.device.type == "cuda",
            persistent_workers=workers > 0, drop_last=opts.drop,
            prefetch_factor=4 if workers > 0 else None, generator=self._generator,
            worker_init_fn=_worker_init)

    def __iter__(self):
        epoch, first = self._begin()
        o = self.opts
        todo = self.sample_indices(epoch)[first * o.batch_size:]
        self.sampler.keys = [(i, epoch) for i in todo.tolist()]
        self._generator.manual_seed(derive_seed(o.seed, "workers", o.rank, epoch))
        for x, y in self.loader:
            yield (to_model_layout(x.to(o.device, non_blocking=True), o.dtype),
                   y.to(o.device, non_blocking=True))
